#!/usr/bin/env bash
# Pre-train on a Cloud TPU VM slice: create it (or reuse it), install this checkout on every
# worker, start the trainer on all workers at once. Rerunning the same command after a
# preemption resumes from the latest checkpoint in the gs:// workdir.
#
#   launch/tpu_vm.sh NAME ZONE ACCELERATOR CONFIG WORKDIR [--config.key=value ...]
#   launch/tpu_vm.sh bert-sym us-central2-b v4-32 configs/sym_base.py gs://my-bucket/sym_base
#
# Environment: PROJECT (default: gcloud's), RUNTIME_VERSION (default tpu-ubuntu2204-base),
# SPOT=1 for a spot slice, JAX_SPEC (default "jax[tpu]>=0.6,<0.13").
# Follow the run: gcloud compute tpus tpu-vm ssh NAME --zone ZONE --worker=0 \
#   --command 'tail -f ~/bert_sym/train.log'      (or point TensorBoard at WORKDIR/tensorboard)
set -euo pipefail

if [[ $# -lt 5 ]]; then
  sed -n '2,15p' "$0"; exit 2
fi
NAME=$1 ZONE=$2 ACCELERATOR=$3 CONFIG=$4 WORKDIR=$5
shift 5
EXTRA_ARGS=("$@")
RUNTIME_VERSION=${RUNTIME_VERSION:-tpu-ubuntu2204-base}
JAX_SPEC=${JAX_SPEC:-"jax[tpu]>=0.6,<0.13"}
if [[ $WORKDIR != gs://* ]]; then
  echo "WORKDIR must be on gs:// (every worker writes checkpoints there)." >&2; exit 2
fi
GCLOUD=(gcloud compute tpus tpu-vm)
COMMON=(--zone "$ZONE" ${PROJECT:+--project "$PROJECT"})
REPO_ROOT=$(cd "$(dirname "$0")/.." && pwd)

# 1. The slice.
if "${GCLOUD[@]}" describe "$NAME" "${COMMON[@]}" >/dev/null 2>&1; then
  echo "Reusing TPU VM $NAME"
else
  echo "Creating TPU VM $NAME ($ACCELERATOR, $RUNTIME_VERSION)"
  "${GCLOUD[@]}" create "$NAME" "${COMMON[@]}" --accelerator-type "$ACCELERATOR" \
    --version "$RUNTIME_VERSION" ${SPOT:+--spot}
fi

# 2. This checkout (tracked files of HEAD plus uncommitted changes) on every worker.
ARCHIVE=$(mktemp /tmp/bert_sym.XXXXXX.tar.gz)
trap 'rm -f "$ARCHIVE"' EXIT
(cd "$REPO_ROOT" && git ls-files -z --cached --others --exclude-standard \
  | tar --null -czf "$ARCHIVE" -T -)
"${GCLOUD[@]}" scp "$ARCHIVE" "$NAME":bert_sym.tar.gz "${COMMON[@]}" --worker=all

# 3. Install (idempotent: the venv is reused on a rerun), then start the run. Stop an older
#    run first so a relaunch never leaves two trainers on one slice.
QUOTED_ARGS=""
if [[ ${#EXTRA_ARGS[@]} -gt 0 ]]; then QUOTED_ARGS=$(printf ' %q' "${EXTRA_ARGS[@]}"); fi
"${GCLOUD[@]}" ssh "$NAME" "${COMMON[@]}" --worker=all --command "
  set -e
  mkdir -p ~/bert_sym && cd ~/bert_sym
  if [[ -f train.pid ]] && kill \$(cat train.pid) 2>/dev/null; then sleep 10; fi
  tar -xzf ~/bert_sym.tar.gz -C ~/bert_sym
  [[ -x .venv/bin/python ]] || python3 -m venv .venv
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -r requirements.txt '$JAX_SPEC'
  nohup .venv/bin/python -m bert_sym.train --distributed --config=$CONFIG \
    --workdir=$WORKDIR $QUOTED_ARGS > train.log 2>&1 < /dev/null &
  echo \$! > train.pid
  echo \"worker \$(hostname): started, log in ~/bert_sym/train.log\"
"
echo "Started $CONFIG on every worker of $NAME; workdir $WORKDIR"

#!/usr/bin/env bash
# Pre-train on a Cloud TPU VM slice: create it (or reuse it), install this checkout on every
# worker, start the trainer on all workers at once. Rerunning the same command after a
# preemption resumes from the latest checkpoint in the gs:// workdir.
#
#   launch/tpu_vm.sh NAME ZONE ACCELERATOR CONFIG WORKDIR [--config.key=value ...]
#   launch/tpu_vm.sh bert-sym us-central2-b v4-32 configs/sym_base.py gs://my-bucket/sym_base \
#     --config.data.shards_dir=gs://my-bucket/c4_512
#
# Environment: PROJECT (default: gcloud's), RUNTIME_VERSION (default: the one Cloud TPU's
# docs name for the generation: v2-alpha-tpuv6e for v6e, v2-alpha-tpuv5 for v5p,
# v2-alpha-tpuv5-lite for v5e, tpu-ubuntu2204-base for v4 and older), SPOT=1 for a spot
# slice, JAX_SPEC (default "jax[tpu]"), PYTHON_VERSION (default 3.11). Workers install
# requirements.txt and JAX_SPEC under constraints.txt: the versions the tests ran (and
# `make` installs here), and the same ones again on a slice recreated after a preemption (a
# newer optax or orbax could refuse the checkpoint). A JAX_SPEC naming a version needs
# UNPINNED=1, which takes the newest of every package within requirements.txt's ranges.
# The trainer needs Python >= 3.11 (jax >= 0.7 dropped 3.10) but the runtimes ship 3.10,
# so each worker installs python$PYTHON_VERSION from the deadsnakes PPA (apt) when its
# python3 is older and builds the venv with it.
# A PREEMPTED / TERMINATED (spot) slice still "describes", so it is deleted and recreated.
# Follow the run: gcloud compute tpus tpu-vm ssh NAME --zone ZONE --worker=0 \
#   --command 'tail -f ~/bert_sym/train.log'      (or point TensorBoard at WORKDIR/tensorboard)
#
# The bert-base/small configs stream C4 from exported shards (bert_sym/input/shard_reader.py).
# Without --config.data.shards_dir=gs://... or EXPORT_TO the preflight stops: every trainer
# would stop as it starts, on a billed slice.
# Prepare them once, on the same slice, by setting EXPORT_TO (a gs:// directory): every
# worker first converts its part of the TFDS corpus there (worker i of N takes parts i,
# i+N, ...; finished parts are skipped on a rerun), waits until all parts are done, then
# trains from it (--config.data.shards_dir=EXPORT_TO is added). Later runs just pass
# --config.data.shards_dir=gs://... themselves.
#   EXPORT_TO=gs://my-bucket/c4_512 TFDS_DATA_DIR=gs://my-bucket/tensorflow_datasets \
#     launch/tpu_vm.sh bert-sym us-central2-b v4-32 configs/sym_base.py gs://my-bucket/sym_base
# EXPORT_TASK (default bert_sym_mlm_c4) and EXPORT_SEQ_LEN (default 512) pick the corpus;
# the preflight refuses an EXPORT_SEQ_LEN or EXPORT_TASK other than the config's
# data.max_seq_len and data.task.
# A worker whose export fails stops the others' wait; one killed without a word does when
# nothing has been written for EXPORT_STALL_MINUTES (default 180).
# TFDS_DATA_DIR must hold the prepared TFDS dataset (`tfds build c4/en --data_dir=...`).
#
# Preflight: before anything is created, the train step is compiled here for ACCELERATOR
# (python -m bert_sym.aot; needs `pip install -r requirements-tpu.txt` on this machine, no
# TPU) and the launch stops if it does not fit in the chips' memory. It prints memory per
# chip and a roofline estimate of the run's speed; bert-base takes a few minutes to compile
# on a laptop (--config.model.scan_layers=True: under a minute). PYTHON (default: this
# checkout's .venv/bin/python, else python3) runs it; SKIP_PREFLIGHT=1 skips it.
set -euo pipefail

if [[ $# -lt 5 ]]; then
  sed -n '2,/^set -euo pipefail/p' "$0" | sed '$d'; exit 2
fi
NAME=$1 ZONE=$2 CONFIG=$4 WORKDIR=$5
# V5E-16 as bert_sym.aot reads it; with tr: bash 4's lowercasing is a bad substitution in
# macOS's /bin/bash (3.2).
ACCELERATOR=$(printf '%s' "$3" | tr '[:upper:]' '[:lower:]')
# SPOT, UNPINNED, SKIP_PREFLIGHT: 1/true/yes is on, empty/0/false/no off (SPOT=0 was a spot
# slice, SKIP_PREFLIGHT=0 no preflight); anything else is refused before any work.
switch() {
  case "${!1:-}" in
    1|true|yes) return 0 ;;
    ""|0|false|no) return 1 ;;
    *) echo "$1=${!1} must be 1 (or true/yes) or 0 (or false/no)." >&2; exit 2 ;;
  esac
}
SPOT_FLAG=() PIN=(-c constraints.txt)
if switch SPOT; then SPOT_FLAG=(--spot); fi
if switch UNPINNED; then PIN=(); fi
if switch SKIP_PREFLIGHT; then SKIP_PREFLIGHT=1; else SKIP_PREFLIGHT=; fi
shift 5
EXTRA_ARGS=("$@")
case "$ACCELERATOR" in
  v6e*) DEFAULT_RUNTIME=v2-alpha-tpuv6e ;;
  v5p*) DEFAULT_RUNTIME=v2-alpha-tpuv5 ;;
  v5litepod*|v5e*) DEFAULT_RUNTIME=v2-alpha-tpuv5-lite ;;
  *) DEFAULT_RUNTIME=tpu-ubuntu2204-base ;;
esac
RUNTIME_VERSION=${RUNTIME_VERSION:-$DEFAULT_RUNTIME}
JAX_SPEC=${JAX_SPEC:-"jax[tpu]"}
if (( ${#PIN[@]} )) && [[ $JAX_SPEC == *[=\<\>~!]* ]]; then
  # pip would refuse it on every worker, after the slice exists and the old run has stopped.
  echo "JAX_SPEC=$JAX_SPEC names a version, and workers install under constraints.txt" \
    "($(grep -E '^jax==' "$(dirname "$0")/../constraints.txt")): drop the version, or set" \
    "UNPINNED=1 to install without the constraints." >&2
  exit 2
fi
PYTHON_VERSION=${PYTHON_VERSION:-3.11}
if [[ $WORKDIR != gs://* ]]; then
  echo "WORKDIR must be on gs:// (every worker writes checkpoints there)." >&2; exit 2
fi
EXPORT_TO=${EXPORT_TO:-} EXPORT_TASK=${EXPORT_TASK:-bert_sym_mlm_c4}
EXPORT_SEQ_LEN=${EXPORT_SEQ_LEN:-512} TFDS_DATA_DIR=${TFDS_DATA_DIR:-}
EXPORT_STALL_MINUTES=${EXPORT_STALL_MINUTES:-180}
if [[ -n $EXPORT_TO && $EXPORT_TO != gs://* ]]; then
  echo "EXPORT_TO must be on gs:// (every worker writes its part there)." >&2; exit 2
fi
PREVIOUS=
for arg in ${EXTRA_ARGS[@]+"${EXTRA_ARGS[@]}"}; do
  # Every worker reads the shards: a path of this machine passed the preflight (which found
  # the files here) and stopped every worker's trainer on a created, billed slice.
  SHARDS=
  if [[ $arg == --config.data.shards_dir=* ]]; then SHARDS=${arg#*=}
  elif [[ $PREVIOUS == --config.data.shards_dir ]]; then SHARDS=$arg; fi
  PREVIOUS=$arg
  if [[ -n $SHARDS && $SHARDS != gs://* && -z $EXPORT_TO ]]; then   # (else: refused below)
    echo "--config.data.shards_dir=$SHARDS is not on gs://, so the workers cannot read it." \
      "Fix: copy the shards to gs://BUCKET/... and pass that, or set EXPORT_TO=gs://..." \
      "to export them on the slice." >&2
    exit 2
  fi
  # The launcher passes its own (absl would say the flag is "defined twice", at start-up on
  # every worker with SKIP_PREFLIGHT=1). absl also takes `--workdir VALUE`, which the
  # preflight ignores and every worker's trainer refuses as given twice.
  if [[ $arg == --config || $arg == --config=* || $arg == --workdir || $arg == --workdir=* ||
        ( -n $EXPORT_TO && ( $arg == --config.data.shards_dir ||
                             $arg == --config.data.shards_dir=* ) ) ]]; then
    echo "$arg: launch/tpu_vm.sh passes that flag itself (from CONFIG, WORKDIR or" \
      "EXPORT_TO); drop it from the arguments." >&2
    exit 2
  fi
  # The preflight accepts bert_sym.aot's own flags; every worker's trainer stops on them.
  case "$arg" in
    --topology|--topology=*|--num_slices|--num_slices=*|--out|--out=*|--eval_step|\
    --eval_step=*|--noeval_step|--require_data|--require_data=*|--norequire_data)
      echo "$arg: a flag of bert_sym.aot, which the trainer does not take; drop it (the" \
        "preflight compiles for ACCELERATOR, one slice)." >&2
      exit 2 ;;
  esac
done
GCLOUD=(gcloud compute tpus tpu-vm)
COMMON=(--zone "$ZONE" ${PROJECT:+--project "$PROJECT"})
REPO_ROOT=$(cd "$(dirname "$0")/.." && pwd -P)
# CONFIG as the workers see it: a file of this checkout (all that is shipped), relative to
# its root (~/bert_sym on a worker), as the trainer resolves it (the current directory
# first, then the checkout). An absolute path, or a file outside the checkout, passed the
# preflight here and stopped every worker's trainer on a created slice.
CONFIG_FILE=${CONFIG%%:*} CONFIG_ARG=${CONFIG#"${CONFIG%%:*}"}   # ':fast' or ''
CONFIG_PATH=
if [[ -f $CONFIG_FILE ]]; then
  CONFIG_PATH=$(cd "$(dirname "$CONFIG_FILE")" && pwd -P)/$(basename "$CONFIG_FILE")
elif [[ $CONFIG_FILE != /* && -f $REPO_ROOT/$CONFIG_FILE ]]; then
  CONFIG_PATH=$REPO_ROOT/$CONFIG_FILE
fi
if [[ -z $CONFIG_PATH ]]; then
  echo "CONFIG=$CONFIG_FILE: no such file (here or in $REPO_ROOT)." >&2; exit 2
elif [[ $CONFIG_PATH != "$REPO_ROOT"/* ]]; then
  echo "CONFIG=$CONFIG_FILE is outside this checkout ($REPO_ROOT), the only files the" \
    "workers get. Fix: copy it into the checkout (e.g. configs/) and pass that path." >&2
  exit 2
elif git -C "$REPO_ROOT" check-ignore -q "${CONFIG_PATH#"$REPO_ROOT"/}" 2>/dev/null; then
  echo "CONFIG=$CONFIG_FILE is ignored by git, so it is not shipped to the workers. Fix:" \
    "move it where git does not ignore it (e.g. configs/)." >&2
  exit 2
fi
CONFIG=${CONFIG_PATH#"$REPO_ROOT"/}$CONFIG_ARG

# 0. Preflight: does CONFIG fit on ACCELERATOR? Compiled here, before any slice exists.
if [[ -z $SKIP_PREFLIGHT ]]; then
  PREFLIGHT_PYTHON=${PYTHON:-}
  if [[ -z $PREFLIGHT_PYTHON ]]; then
    PREFLIGHT_PYTHON=python3
    [[ -x $REPO_ROOT/.venv/bin/python ]] && PREFLIGHT_PYTHON=$REPO_ROOT/.venv/bin/python
  fi
  echo "Preflight: compiling $CONFIG for $ACCELERATOR on this machine (bert_sym.aot)"
  PREFLIGHT_DIR=$(mktemp -d /tmp/bert_sym_preflight.XXXXXX)
  # --require_data: the config must name its data, unless EXPORT_TO is about to make it.
  if ! (cd "$REPO_ROOT" && "$PREFLIGHT_PYTHON" -m bert_sym.aot --config="$CONFIG" \
        --topology="$ACCELERATOR" ${EXPORT_TO:+"--config.data.shards_dir=$EXPORT_TO"} \
        --require_data --out="$PREFLIGHT_DIR/report.json" ${EXTRA_ARGS[@]+"${EXTRA_ARGS[@]}"}); then
    rm -rf "$PREFLIGHT_DIR"
    echo "Preflight failed for $CONFIG on $ACCELERATOR (above); nothing was created." \
      "Fix the config, or set SKIP_PREFLIGHT=1 to launch anyway." >&2
    exit 1
  fi
  # The trainer refuses shards of another length than its config.data.max_seq_len, or of
  # another task than its config.data.task: found only after every worker has spent hours
  # on the export.
  read_report() {
    "$PREFLIGHT_PYTHON" -c 'import json, sys; print(json.load(open(sys.argv[1])).get(sys.argv[2], ""))' \
      "$PREFLIGHT_DIR/report.json" "$1" 2>/dev/null || true
  }
  SEQ_LEN=$(read_report seq_len) TASK=$(read_report task)
  rm -rf "$PREFLIGHT_DIR"
  if [[ -n $EXPORT_TO && -n $TASK && $TASK != "$EXPORT_TASK" ]]; then
    echo "EXPORT_TASK=$EXPORT_TASK, but $CONFIG trains on the task $TASK" \
      "(config.data.task), and the trainer refuses shards of another task." \
      "Fix: EXPORT_TASK=$TASK, or --config.data.task=$EXPORT_TASK; nothing was created." >&2
    exit 2
  fi
  if [[ -n $EXPORT_TO && -n $SEQ_LEN && $SEQ_LEN != "$EXPORT_SEQ_LEN" ]]; then
    echo "EXPORT_SEQ_LEN=$EXPORT_SEQ_LEN, but $CONFIG trains on $SEQ_LEN-token blocks" \
      "(config.data.max_seq_len), and the trainer refuses shards of another length." \
      "Fix: EXPORT_SEQ_LEN=$SEQ_LEN (and an EXPORT_TO for that length); nothing was created." >&2
    exit 2
  fi
fi

# This checkout as it is (tracked files, uncommitted changes, new files not ignored; a
# tracked file deleted from the disk is left out), archived before a slice exists: a
# failure here must not leave a billed slice idle. A directory, not a file name with a
# suffix, from mktemp: BSD mktemp (macOS) replaces only trailing X's.
ARCHIVE_DIR=$(mktemp -d /tmp/bert_sym.XXXXXX)
ARCHIVE=$ARCHIVE_DIR/bert_sym.tar.gz
trap 'rm -rf "$ARCHIVE_DIR"' EXIT
(cd "$REPO_ROOT" && git ls-files -z --cached --others --exclude-standard --deduplicate \
  | while IFS= read -r -d '' file; do if [[ -e $file ]]; then printf '%s\0' "$file"; fi; done \
  | tar --null -czf "$ARCHIVE" -T -)

# 1. The slice. A preempted spot slice keeps its name (describe succeeds) but has no
#    running VMs: only a READY slice can be reused.
slice_state() {   # "STATE ACCELERATOR_TYPE"; empty when there is no such slice
  "${GCLOUD[@]}" describe "$NAME" "${COMMON[@]}" --format='value(state,acceleratorType)' \
    2>/dev/null || true
}
v5e_spelled_once() {   # the API's v5litepod-N (or v5lite-N) as v5e-N, which the preflight took
  printf '%s' "$1" | tr '[:upper:]' '[:lower:]' | sed -e 's/^v5litepod-/v5e-/' -e 's/^v5lite-/v5e-/'
}
create_slice() {
  # The Cloud TPU API names v5e slices v5litepod-N; bert_sym.aot takes both spellings.
  echo "Creating TPU VM $NAME ($ACCELERATOR, $RUNTIME_VERSION)"
  "${GCLOUD[@]}" create "$NAME" "${COMMON[@]}" --accelerator-type "${ACCELERATOR/#v5e-/v5litepod-}" \
    --version "$RUNTIME_VERSION" ${SPOT_FLAG[@]+"${SPOT_FLAG[@]}"}
}
use_slice() {
  local state type
  read -r state type <<< "$(slice_state)"
  for _ in $(seq 180); do
    case "$state" in
      READY)
        # The preflight compiled for $ACCELERATOR: a slice of another size left under this
        # name would run a config nobody checked (or fail its mesh after the install).
        if [[ -n $type && $(v5e_spelled_once "$type") != $(v5e_spelled_once "$ACCELERATOR") ]]; then
          echo "TPU VM $NAME exists as a $type slice, not the $ACCELERATOR this launch asked" \
            "for. Fix: pass another NAME, or delete it (gcloud compute tpus tpu-vm" \
            "delete $NAME --zone $ZONE) and rerun." >&2
          exit 1
        fi
        echo "Reusing TPU VM $NAME"; return ;;
      "")   # none (also once a DELETING one is gone)
        create_slice; return ;;
      PREEMPTED|TERMINATED)
        echo "TPU VM $NAME is $state: deleting and recreating it"
        "${GCLOUD[@]}" delete "$NAME" "${COMMON[@]}" --quiet
        create_slice; return ;;
      STOPPED|SUSPENDED|HIDDEN)   # states a slice does not leave by itself
        echo "TPU VM $NAME is $state; start it (gcloud compute tpus tpu-vm start $NAME" \
          "--zone $ZONE) or delete it, and rerun." >&2
        exit 1 ;;
    esac
    # CREATING / STARTING / RESTARTING / REPAIRING / STOPPING / DELETING ...: wait for it
    # to settle (up to 30 minutes).
    echo "TPU VM $NAME is $state; waiting"
    sleep 10
    read -r state type <<< "$(slice_state)"
  done
  echo "TPU VM $NAME is still $state after 30 minutes; fix or delete it" \
    "(gcloud compute tpus tpu-vm delete $NAME --zone $ZONE) and rerun." >&2
  exit 1
}
use_slice

# 2. This checkout on every worker (its archive was built before step 1).
"${GCLOUD[@]}" scp "$ARCHIVE" "$NAME":bert_sym.tar.gz "${COMMON[@]}" --worker=all

# 3. Three passes over the workers, each ending when every worker is done: stop the
#    previous run (it saves a checkpoint on SIGTERM; waited for, so a relaunch never has two
#    trainers on one slice or reads a checkpoint being written), install, start. The
#    trainers then start within seconds of each other: jax.distributed.initialize waits
#    5 minutes for the others, which a worker still stopping or installing could miss.
# Each pass is single-quoted (nothing expands here); its inputs travel as shell-quoted
# variable assignments in front of it.
# shellcheck disable=SC2016
STOP_PASS='
if [[ -f train.pid ]]; then
  old=$(cat train.pid)
  # Its whole process group (run.sh runs in its own session): during the export, killing
  # only run.sh would leave the exporter running beside the new one. A run.sh started
  # before sessions were used is not a group leader: then the pid alone. Waited for until
  # no process of the group is left (zombies aside), so none outlives this pass.
  running() {
    kill -0 "$old" 2>/dev/null ||
      ps -e -o pgid=,stat= | awk -v g="$old" "\$1 == g && \$2 !~ /^Z/ {f = 1} END {exit !f}"
  }
  if kill -- "-$old" 2>/dev/null || kill "$old" 2>/dev/null; then
    echo "worker $(hostname): stopping the previous trainer (pid $old)"
    for _ in $(seq 600); do running || break; sleep 1; done
    if running; then
      echo "worker $(hostname): pid $old still running after 10 minutes; killing it"
      kill -9 -- "-$old" 2>/dev/null || kill -9 "$old" 2>/dev/null || true
      while running; do sleep 1; done
    fi
  fi
  rm -f train.pid
fi
'
# shellcheck disable=SC2016
INSTALL_PASS='
# The stop pass removes train.pid once the old run is gone: still there, it failed on this
# worker, and nothing may be deleted under a trainer that may still be running.
if [[ -f train.pid ]]; then
  echo "worker $(hostname): the previous run was not stopped (train.pid is still there)" >&2
  exit 1
fi
# This checkout exactly: files deleted since the last launch go too. The venv stays (reused:
# the install below is then quick), and the previous log (train.log.previous).
find . -mindepth 1 -maxdepth 1 ! -name .venv ! -name "train.log*" -exec rm -rf {} +
tar -xzf ~/bert_sym.tar.gz -C ~/bert_sym
PY=python$PYTHON_VERSION
if ! command -v "$PY" >/dev/null; then
  if python3 -c "import sys; sys.exit(sys.version_info < tuple(map(int, \"$PYTHON_VERSION\".split(\".\"))))"; then
    PY=python3
  else
    echo "worker $(hostname): installing $PY (deadsnakes PPA)"
    sudo DEBIAN_FRONTEND=noninteractive apt-get update -qq
    sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq software-properties-common
    sudo add-apt-repository -y ppa:deadsnakes/ppa
    sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
      "python$PYTHON_VERSION" "python$PYTHON_VERSION-venv"
  fi
fi
# A venv left by an older setup may be on the runtime default Python 3.10: rebuild it.
if [[ -x .venv/bin/python ]] && ! .venv/bin/python -c "import sys; sys.exit(sys.version_info < (3, 11))"; then
  rm -rf .venv
fi
[[ -x .venv/bin/python ]] || "$PY" -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q ${PIN[@]+"${PIN[@]}"} -r requirements.txt "$JAX_SPEC"
'
# run.sh: the optional export (this worker converts its share of the corpus), then the trainer
# (exec, so train.pid is the pid of the trainer once training starts).
# shellcheck disable=SC2016
START_PASS='
{
  echo "set -euo pipefail"
  if [[ -n $EXPORT_TO ]]; then
    WORKER_ID=$(curl -s -H "Metadata-Flavor: Google" \
      http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number)
    printf ".venv/bin/python -m bert_sym.shards export"
    printf " %q" "--task=$EXPORT_TASK" "--max_seq_len=$EXPORT_SEQ_LEN" "--out_dir=$EXPORT_TO" \
      "--tfds_data_dir=$TFDS_DATA_DIR" "--num_workers=$NUM_WORKERS" "--worker_index=$WORKER_ID"
    echo
    # finalize exits 3 while parts of other workers are missing: wait for them; any other
    # failure (a DataError, a wrong EXPORT_TO, another worker whose export raised: it
    # leaves a worker-N.failed marker) stops here instead of waiting forever.
    printf "until .venv/bin/python -m bert_sym.shards finalize %q %q; do rc=\$?; " \
      "--out_dir=$EXPORT_TO" "--stalled_after_minutes=$EXPORT_STALL_MINUTES"
    echo "[[ \$rc -eq 3 ]] || exit \$rc; sleep 60; done"
    EXTRA_ARGS+=("--config.data.shards_dir=$EXPORT_TO")
  fi
  printf "exec .venv/bin/python -m bert_sym.train --distributed"
  printf " %q" "--config=$CONFIG" "--workdir=$WORKDIR" "${EXTRA_ARGS[@]}"
  echo
} > run.sh
if [[ -f train.log ]]; then mv -f train.log train.log.previous; fi
setsid nohup bash run.sh > train.log 2>&1 < /dev/null &
echo $! > train.pid
echo "worker $(hostname): started, log in ~/bert_sym/train.log"
'
DECLARATIONS=$(declare -p EXTRA_ARGS PIN)
NUM_WORKERS=1
if [[ -n $EXPORT_TO ]]; then
  NUM_WORKERS=$("${GCLOUD[@]}" describe "$NAME" "${COMMON[@]}" --format=json \
    | python3 -c 'import json, sys; print(len(json.load(sys.stdin)["networkEndpoints"]))')
fi
REMOTE_VARS=$(printf '%s=%q ' PYTHON_VERSION "$PYTHON_VERSION" JAX_SPEC "$JAX_SPEC" \
  CONFIG "$CONFIG" WORKDIR "$WORKDIR" EXPORT_TO "$EXPORT_TO" EXPORT_TASK "$EXPORT_TASK" \
  EXPORT_SEQ_LEN "$EXPORT_SEQ_LEN" TFDS_DATA_DIR "$TFDS_DATA_DIR" NUM_WORKERS "$NUM_WORKERS" \
  EXPORT_STALL_MINUTES "$EXPORT_STALL_MINUTES")
on_every_worker() {   # NAME PASS: runs the pass in ~/bert_sym on all workers at once
  echo "On every worker: $1"
  "${GCLOUD[@]}" ssh "$NAME" "${COMMON[@]}" --worker=all --command "$REMOTE_VARS bash -c $(
    printf %q "$DECLARATIONS; set -euo pipefail; mkdir -p ~/bert_sym && cd ~/bert_sym; $2")"
}
on_every_worker 'stop the previous run' "$STOP_PASS"
on_every_worker 'install' "$INSTALL_PASS"
on_every_worker 'start' "$START_PASS"
echo "Started $CONFIG on every worker of $NAME; workdir $WORKDIR"

#!/bin/bash
# The one command for a session that has an NVIDIA GPU (H100/H200): under 8 minutes, every
# step under a hard limit (SIGKILL) and a shared budget, output flushed as it comes. From
# the repository root:
#
#   bash benchmarks/run_gpu.sh [DIR_WITH_ml_collections_WHEEL]
#
# It stops at once, having measured nothing, if JAX does not run on the GPU. Then, in order
# of importance (a step that no longer fits the budget is reported as skipped):
#   1. the GPU-only tests (marked gpu): cuDNN flash attention equals xla, attention dropout
#      inside cuDNN (rate, fresh masks per step, unbiased, backward uses the forward's
#      mask, all-padding rows, each backward configuration apart), our Pallas dropout
#      kernel against its reference (compiled Triton), the XLA GPU flags the plugin knows;
#   2. the train step at bert-base, standard attention, layers as the trainer lays them
#      out (unscanned), against Hugging Face from the same run: seq 128 x 256 and 512 x 128
#      on the fast recipe (fused: cuDNN, no attention dropout) and the paper recipe, with
#      attention dropout inside our Pallas kernel (pallas_dropout) and on xla;
#   3. the profile: one traced configuration (fast recipe, seq 128 x 256) and its table of
#      the top 30 device ops;
#   4. A/B: the same steps at 128 x 256 with scanned layers, then with JAX autodiff's
#      backward (model.lean_backward=False);
#   5. pairwise on the fast recipe at the shapes of 2., for its step time against standard's;
#   6. with the time left: seq 512 x 32 and 512 x 256 against HF, the paper recipe with
#      attention dropout inside cuDNN (fused_dropout), then the GLUE parallel-seeds benchmark.
# Measured once and dropped for time (benchmarks/RESULTS.md, H100 2026-12-06): the trainer's
# XLA GPU flags off (no effect) and the dropout PRNGs rbg / unsafe_rbg (no gain).
# JAX may take 95% of the GPU's memory (XLA_PYTHON_CLIENT_MEM_FRACTION, default 0.75; each
# configuration, Hugging Face's included, has the GPU to itself): on an H100 the paper
# recipe at 512 x 256 needs 68.6 GiB as compiled, over 75% of its 80 GB.
# Everything (JSON, tables) goes under benchmarks/results/. $OUT gets two files (only the
# log if JAX is not on the GPU): this log, and results.tar with every result so far (rewritten whole after each, so
# a kill leaves the previous one): the device tool hands back at most 8 files, and ten
# loose ones would lose two, maybe the log. `tar -xf results.tar -C benchmarks/results`.
#
# The GPU image has jax[cuda], flax, optax, orbax, torch, transformers but no TensorFlow,
# seqio or ml-collections: ml-collections is installed from a carried wheel (`pip download
# --no-deps ml-collections -d .whl` on a machine with internet; absl-py and PyYAML are in
# the image).
set -u
export PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}
cd "$(dirname "$0")/.."
OUT_DIR=${OUT:-benchmarks/results}
mkdir -p benchmarks/results "$OUT_DIR"
exec > >(tee -a "$OUT_DIR/run_gpu.log") 2>&1
LIMIT_S=${RUN_GPU_LIMIT_S:-460}   # the whole script; 8 minutes minus start-up slack
START=$SECONDS
if ! python3 -c 'import ml_collections' 2>/dev/null; then
  # The newest wheel there: given two versions of one package, pip installs neither.
  WHEEL=$(ls -1 "${1:-.whl}"/ml_collections-*.whl 2>/dev/null | sort -V | tail -n 1)
  [ -n "$WHEEL" ] || { echo "no ml-collections wheel in ${1:-.whl}: pip download --no-deps" \
    "ml-collections -d ${1:-.whl} (on a machine with internet), then carry it"; exit 1; }
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/bert_sym_site \
    "$WHEEL" || { echo "could not install $WHEEL"; exit 1; }
  export PYTHONPATH=/tmp/bert_sym_site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
# Every step below measures a GPU: if JAX came up on the CPU (a CUDA plugin that did not
# load), they would spend the whole budget timing bert-base on the host. RUN_GPU_ALLOW_CPU=1
# runs them anyway (a dry run of this script at --size=base on a CPU machine).
if ! timeout -s KILL 60 python3 -c 'import jax; print("jax", jax.__version__, jax.devices())
raise SystemExit(jax.default_backend() != "gpu")' && [ "${RUN_GPU_ALLOW_CPU:-0}" != 1 ]; then
  echo 'JAX does not run on a GPU here (see the devices above): nothing was measured. Fix:' \
    'install jax[cuda12] or jax[cuda13] matching the driver.'
  exit 1
fi
R=benchmarks/results
SAVED=()
save() {   # FILE... (under $R): adds them to $OUT/results.tar, replaced by a rename
  [ -n "${OUT:-}" ] || return 0
  local f
  for f in "$@"; do SAVED+=("${f#"$R"/}"); done
  tar -cf "$OUT/results.tar.part" -C "$R" "${SAVED[@]}" &&
    mv -f "$OUT/results.tar.part" "$OUT/results.tar"
}

# step NAME MAX_SECONDS COMMAND...: runs COMMAND under min(MAX, time left), SIGKILL after;
# skipped with under STEP_MIN_S (default 30) seconds left.
step() {
  local name=$1 max=$2; shift 2
  local left=$(( LIMIT_S - (SECONDS - START) )) needs=${STEP_MIN_S:-30}
  if [ "$left" -lt "$needs" ]; then
    echo "== $name: SKIPPED (${left}s of the budget left, it needs ${needs}s)"; return
  fi
  [ "$max" -gt "$left" ] && max=$left
  echo "== $name (limit ${max}s, $(( SECONDS - START ))s elapsed)"
  timeout -s KILL "$max" "$@"
  echo "== $name: exit $?"
}
# The benchmark's own budget: 10 s under its kill, so that it still writes its JSON.
bench() {   # NAME MAX_SECONDS OUT_JSON ARGS...
  local name=$1 max=$2 json=$3; shift 3
  local left=$(( LIMIT_S - (SECONDS - START) ))
  [ "$max" -gt "$left" ] && max=$left
  rm -f "$json"   # never hand back an older run's file as this one's
  # 90 s a configuration: unscanned, XLA compiles and autotunes twelve layers (scanned,
  # one: 11 s on the H100).
  step "$name" "$max" python3 benchmarks/accelerator.py --size=base --steps=10 \
    --timeout_s=90 --budget_s=$(( max > 20 ? max - 15 : 5 )) --out="$json" "$@"
  [ -f "$json" ] && save "$json"
}
DATE=$(date -u +%Y-%m-%d)

# Every test file holding a `gpu` test (tests/test_run_gpu_script.py checks the list): not
# `-m gpu tests/`, which would collect modules that import TensorFlow or seqio. One process
# until a test takes it down (cuDNN's dropout backward aborted it, on an H100 with jax
# 0.11.2), then a new one for the tests after it (benchmarks/run_gpu_tests.py).
# cuDNN's dropout tests last: its backward aborted the process on the H100 (2026-12-06); a
# hang there instead would eat the step's time, and the Pallas kernel's tests, never yet
# run on a GPU, come first.
GPU_TESTS="tests/test_flash_dropout.py tests/test_attention.py tests/test_gpu_flags.py tests/test_objectives.py tests/test_cudnn_dropout.py"
# shellcheck disable=SC2086
step 'gpu tests' 150 python3 benchmarks/run_gpu_tests.py --quiet_s=60 $GPU_TESTS

# The profile runs the first configuration of the next step again: a compilation cache,
# emptied here so that the first compile is measured cold, spares it a second compile.
JAX_CACHE=/tmp/bert_sym_run_gpu_jax_cache
rm -rf "$JAX_CACHE"
# Layers as the trainer lays them out (unscanned, configs/common.py) unless --scan_layers=1.
# The paper recipe twice: attention dropout inside our Pallas kernel (pallas_dropout), and
# on xla; Hugging Face with attention dropout is the peer of both.
bench 'train step vs HF: seq 128 x 256 and 512 x 128' 320 "$R/accelerator_gpu_${DATE}.json" \
  --variants=standard --shapes=128x256,512x128 --paths=fused,pallas_dropout,xla \
  --compilation_cache_dir="$JAX_CACHE"
# Before the A/Bs: one short run's material for the offline work (its cache hit spares
# it a compile).
PROFILE_TABLE=$R/profile_standard_fused_128x256/top_ops.txt
rm -f "$PROFILE_TABLE"
bench 'profile: fast recipe, seq 128 x 256' 60 "$R/accelerator_gpu_profile_${DATE}.json" \
  --variants=standard --shapes=128x256 --paths=fused --no_hf --profile \
  --compilation_cache_dir="$JAX_CACHE"
cat "$PROFILE_TABLE" 2>/dev/null && save "$PROFILE_TABLE"

# The H100 run of 2026-12-06 timed scanned layers; its profile's top op was 413
# device-to-device copies (11% of the step), and compiled for a GPU the scanned step slices
# its stacked parameters and residuals per layer: scanned against unscanned, same run.
bench 'A/B: scanned layers (fast and paper, 128 x 256)' 70 \
  "$R/accelerator_gpu_scanned_${DATE}.json" \
  --variants=standard --shapes=128x256 --paths=fused,xla --no_hf --scan_layers=1

# model.lean_backward (the default since 2026-12-06, timed by every step above): GELU's
# backward keeps x alone, xla attention dropout's draws its mask again, the MLM decoder's
# matmuls run in bf16, the cross-entropy's gradient is one pass (bert_sym/lean_backward.py);
# compiled for an H100, 18.07 -> 13.32 GiB (fast) and 21.99 -> 14.56 (paper) at 128 x 256.
# Its speed against JAX autodiff's backward, same run:
bench 'A/B: autodiff backward (lean_backward=0; fast and paper, 128 x 256)' 70 \
  "$R/accelerator_gpu_autodiff_backward_${DATE}.json" \
  --variants=standard --shapes=128x256 --paths=fused,xla --no_hf --lean_backward=0

bench 'pairwise vs standard (fast, 128 x 256 and 512 x 128)' 70 \
  "$R/accelerator_gpu_pairwise_${DATE}.json" \
  --variants=pairwise --shapes=128x256,512x128 --paths=fused --no_hf

bench 'train step vs HF: seq 512 x 32' 90 "$R/accelerator_gpu_512x32_${DATE}.json" \
  --variants=standard --shapes=512x32 --paths=fused,pallas_dropout,xla
# Unscanned, both recipes fit at 512 x 256: compiled for an H200 or an 80 GB H100, 49.0 and
# 68.6 GiB (before model.lean_backward: H200 68.0 and 104.4, H100 59.4 and 63.6, the
# latter after XLA recomputed activations to fit); scanned, neither fit an H100
# (benchmarks/RESULTS.md, "GPU preflight" and "model.lean_backward").
bench 'train step vs HF: seq 512 x 256' 110 "$R/accelerator_gpu_512x256_${DATE}.json" \
  --variants=standard --shapes=512x256 --paths=fused,xla

# cuDNN's in-kernel attention dropout was killed at every shape on an H100 (no step in
# 70 s; unscanned: was it still compiling?): where it stops now is in its line.
bench 'paper recipe on cuDNN (in-kernel dropout, 128 x 256)' 90 \
  "$R/accelerator_gpu_fused_dropout_${DATE}.json" \
  --variants=standard --shapes=128x256 --paths=fused_dropout --no_hf

GLUE_JSON=$R/glue_seeds_gpu_base_${DATE}.json
rm -f "$GLUE_JSON"
# It writes nothing until it has finished (about 165 s on the H200, 2026-11-26): killed
# sooner, its time would be lost.
STEP_MIN_S=180 step 'glue seeds' 200 python3 benchmarks/glue_seeds.py --size=base --seq_len=128 --seeds=3 \
  --steps=60 --rounds=3 --out="$GLUE_JSON"
[ -f "$GLUE_JSON" ] && save "$GLUE_JSON"
echo "== done in $(( SECONDS - START ))s"

#!/bin/bash
# The one command for a session that has an NVIDIA GPU (H100/H200), about 10 minutes: the
# GLUE parallel-seeds benchmark at bert-base, the GPU-only attention tests, then the
# accelerator benchmark at seq 128 x 256. From the repository root:
#
#   bash benchmarks/run_gpu.sh [DIR_WITH_ml_collections_WHEEL]
#
# The GPU image has jax[cuda], flax, optax, orbax, torch, transformers but no TensorFlow,
# seqio or ml-collections: ml-collections is installed from a carried wheel (`pip download
# --no-deps ml-collections -d .whl` on a machine with internet; absl-py and PyYAML are in
# the image). Each step runs under its own hard limit (SIGKILL) and prints as it goes; the
# JSON goes under benchmarks/results/ and is copied to $OUT as soon as it exists.
set -u
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
if ! python3 -c 'import ml_collections' 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/bert_sym_site \
    "${1:-.whl}"/ml_collections-*.whl || { echo 'no ml-collections wheel found'; exit 1; }
  export PYTHONPATH=/tmp/bert_sym_site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c 'import jax; print("jax", jax.__version__, jax.devices())'
save() { if [ -n "${OUT:-}" ]; then cp "$@" "$OUT"/ 2>/dev/null; fi; }

# 1. GLUE: 3 seeds in one vmapped step vs one after the other, bert-base, batch 16, seq 128.
echo '== glue seeds'
timeout -s KILL 200 python3 benchmarks/glue_seeds.py --size=base --seq_len=128 --seeds=3 \
  --steps=60 --rounds=3 --out=benchmarks/results/glue_seeds_gpu_base.json
save benchmarks/results/glue_seeds_gpu_base.json

# 2. GPU-only tests: cuDNN flash attention equals the xla path (forward and gradients, all
#    five variants, right padding), auto picks cudnn on GPU: the tests marked gpu.
echo '== gpu tests'
timeout -s KILL 120 python3 -m pytest -q -rs -p no:cacheprovider tests/test_attention.py \
  -m gpu 2>&1 | tail -15

# 3. The train step: bert-base, seq 128 x 256, standard / symmetric / pairwise on the fast
#    (cuDNN, no attention dropout) and paper (xla, dropout 0.1) recipes, plus the Hugging
#    Face PyTorch peer. Each config is killed after 75 s.
echo '== accelerator'
timeout -s KILL 230 python3 benchmarks/accelerator.py --size=base --shapes=128x256 --budget_s=210
save benchmarks/results/accelerator_*.json

#!/bin/bash
# The one command for a session that has an NVIDIA GPU (H100): GPU-only model tests, then
# the accelerator benchmark (~5 min for bert-base). From the repository root:
#
#   bash benchmarks/run_gpu.sh [DIR_WITH_ml_collections_WHEEL]
#
# The GPU image has jax[cuda], flax, optax, orbax, torch, transformers but no TensorFlow,
# seqio or ml-collections: ml-collections is installed from carried wheels (`pip download
# ml-collections -d wheels/` on a machine with internet fetches it and PyYAML; carry wheels/). Results: the
# test summary and one line per benchmark configuration on stdout, the JSON under
# benchmarks/results/ (and copied to $OUT when set, as on the lent device machines).
set -u
cd "$(dirname "$0")/.."
python -c 'import ml_collections' 2>/dev/null ||
  pip install --no-index --find-links "${1:-wheels}" ml-collections ||
  { echo 'ml-collections is missing and no wheel was found'; exit 1; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python -c 'import jax; print("jax", jax.__version__, jax.devices())'

# 1. GPU-only tests: cuDNN flash attention equals the xla path (forward and gradients, all
#    five variants, right padding), auto picks cudnn on GPU.
timeout -s KILL 180 python -m pytest -q tests/test_attention.py -k 'cudnn or auto' 2>&1 | tail -15

# 2. The benchmark: bert-base, seq 128 x 256 and seq 512 x 32, standard / symmetric /
#    pairwise on the fast (cuDNN, no attention dropout) and paper (xla, dropout 0.1)
#    recipes, plus the Hugging Face PyTorch peer. Each config is killed after 75 s.
timeout -s KILL 330 python benchmarks/accelerator.py --size=base --budget_s=300
if [ -n "${OUT:-}" ]; then cp benchmarks/results/accelerator_*.json "$OUT"/ 2>/dev/null; fi

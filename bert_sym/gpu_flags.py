"""XLA flags the trainer sets on NVIDIA GPUs (config.xla_gpu_flags; listed in the README).

XLA reads XLA_FLAGS once, when the first backend starts, so `set_xla_gpu_flags` runs at
the top of the trainer and of each benchmark worker, before anything asks for a device.
The list is small and each flag is one that the GPU compiler documents for this model's
step; whether each helps is measured by `bash benchmarks/run_gpu.sh` (with and without,
same shape), not assumed:

  --xla_gpu_enable_cudnn_layer_norm   LayerNorm as one cuDNN kernel (BERT has 25)
  --xla_gpu_enable_cublaslt           matmuls through cuBLASLt, which fuses the bias add
                                      and GELU into the GEMM epilogue
  --xla_gpu_enable_latency_hiding_scheduler   overlaps collectives with compute
                                      (data parallelism over several GPUs)

A flag the installed XLA does not know would make XLA abort at start-up, so a flag is set
only if the XLA library names it; one the user already put in XLA_FLAGS is left as it is.
"""

import importlib.util
import mmap
import os
from pathlib import Path

from absl import logging

GPU_FLAGS = {
    'xla_gpu_enable_cudnn_layer_norm': 'true',
    'xla_gpu_enable_cublaslt': 'true',
    'xla_gpu_enable_latency_hiding_scheduler': 'true',
}
CUDA_PLUGINS = ('jax_cuda12_plugin', 'jax_cuda13_plugin')
# The PJRT plugins: the GPU compiler that reads XLA_FLAGS on a GPU lives here
# (jax-cuda1x-pjrt's xla_cuda_plugin.so), not in jaxlib or jax_cuda1x_plugin.
PJRT_PLUGINS = ('jax_plugins.xla_cuda12', 'jax_plugins.xla_cuda13')


def cuda_plugin() -> str | None:
  """The installed JAX CUDA plugin module (None: this JAX has no GPU backend)."""
  for name in CUDA_PLUGINS:
    if importlib.util.find_spec(name) is not None:
      return name
  return None


def _xla_libraries() -> list[Path]:
  """The shared libraries that parse XLA_FLAGS: jaxlib's and the CUDA plugins'."""
  paths = []
  for module in ('jaxlib',) + CUDA_PLUGINS + PJRT_PLUGINS:
    try:
      spec = importlib.util.find_spec(module)
    except ModuleNotFoundError:   # no jax_plugins package at all
      spec = None
    if spec is not None and spec.submodule_search_locations:
      for folder in spec.submodule_search_locations:
        paths += sorted(Path(folder).glob('*.so'))
  return paths


def known_flags(names, libraries=None) -> set[str]:
  """The flags of `names` that every XLA library here that mentions flags at all names."""
  libraries = _xla_libraries() if libraries is None else libraries
  found = None
  for path in libraries:
    with open(path, 'rb') as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
      if data.find(b'xla_dump_to') < 0:   # not a library that parses XLA flags
        continue
      here = {n for n in names if data.find(n.encode()) >= 0}
    found = here if found is None else found & here
  return found or set()


def _platforms_allow_gpu() -> bool:
  platforms = os.environ.get('JAX_PLATFORMS', '') or os.environ.get('JAX_PLATFORM_NAME', '')
  return not platforms or any(p in platforms for p in ('cuda', 'gpu'))


def set_xla_gpu_flags(enabled: bool = True, environ=None, *, force: bool = False) -> list[str]:
  """Adds GPU_FLAGS to XLA_FLAGS when this process will run on an NVIDIA GPU; returns the
  flags added. `force`: add them even without a CUDA plugin (tests)."""
  if not enabled:
    return []
  if not force and (cuda_plugin() is None or not _platforms_allow_gpu()):
    return []
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
  if environ is None and xla_bridge.backends_are_initialized():
    logging.warning('XLA GPU flags not set: the JAX backend was already started.')
    return []
  environ = os.environ if environ is None else environ
  current = environ.get('XLA_FLAGS', '')
  wanted = [n for n in GPU_FLAGS if f'--{n}' not in current]
  known = known_flags(wanted)
  for name in sorted(set(wanted) - known):
    logging.warning('XLA flag --%s is unknown to this XLA; not set.', name)
  added = [f'--{n}={GPU_FLAGS[n]}' for n in wanted if n in known]
  if added:
    environ['XLA_FLAGS'] = ' '.join([current] + added).strip()
    logging.info('XLA_FLAGS for GPU: %s', ' '.join(added))
  return added

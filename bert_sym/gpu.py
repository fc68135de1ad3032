"""NVIDIA GPUs as users name them, their figures, and their devices for compiling only.

`h100`, `h200`, `a100` (one GPU), `h100-8` (the GPUs of one host) or `h100-16` (hosts of
8) -> compile-only
devices of JAX's CUDA plugin, described to XLA's GPU compiler by a target config (the
device description that the plugin would read from a real GPU), so that bert_sym.aot
compiles the trainer's steps for a GPU on a machine that has none, as it does for TPU
slices with libtpu (bert_sym/tpu.py). Needs the CUDA plugin and cuDNN (`make gpu-compiler`
puts them in .venv/gpu-compiler, without the CUDA runtime; `jax[cuda12]` has them too).

What such a compile shows: the kernels the GPU compiler keeps (cuDNN flash attention, with
or without in-kernel dropout, per layer) and its per-GPU memory, which was within 1.5% of
the peak measured on an H200 for bert-base (benchmarks/RESULTS.md, "GPU preflight"). What
it does not: without a GPU, XLA does not autotune (its matmuls are Triton fusions that a
GPU's autotuner may swap for cuBLAS), gives no cost analysis, and cuDNN does not build its
graphs, which only a GPU run checks (benchmarks/run_gpu.sh).
"""

import dataclasses
import math
import re

import jax

from bert_sym import gpu_flags
from bert_sym import tpu


@dataclasses.dataclass(frozen=True)
class Gpu:
  generation: str
  device_kind: str          # what the device reports; MFU's peak FLOP/s is found by it
  hbm_bytes: int            # the memory the GPU reports (nvidia-smi's memory.total)
  hbm_bytes_per_s: float
  compute_capability: tuple[int, int]
  cores: int                # streaming multiprocessors
  clock_ghz: float
  l2_bytes: int
  shared_memory_per_core: int
  fpus_per_core: int
  backend: str = 'gpu'

  @property
  def usable_bytes(self) -> int:
    """The most a step may need: JAX's pool at its largest, less 2% to spare in it."""
    return int(self.hbm_bytes * (MAX_MEMORY_FRACTION - SPARE_FRACTION))


# SXM parts: spec-sheet figures and the memory nvidia-smi reports (the H200's 143,771 MiB is
# the one benchmarks/RESULTS.md recorded), in the fields XLA's GPU compiler reads
# (GpuDeviceInfoProto).
GPUS = {
    'a100': Gpu('a100', 'NVIDIA A100-SXM4-80GB', 81_251 * 2 ** 20, 2039e9, (8, 0), 108, 1.41,
                40 * 2 ** 20, 167_936, 64),
    'h100': Gpu('h100', 'NVIDIA H100 80GB HBM3', 81_559 * 2 ** 20, 3352e9, (9, 0), 132, 1.98,
                50 * 2 ** 20, 233_472, 128),
    'h200': Gpu('h200', 'NVIDIA H200', 143_771 * 2 ** 20, 4800e9, (9, 0), 132, 1.98,
                50 * 2 ** 20, 233_472, 128),
}
MAX_PER_HOST = 8
# JAX's GPU allocator takes this fraction of the memory unless XLA_PYTHON_CLIENT_MEM_FRACTION
# says otherwise (JAX's "GPU memory allocation" docs): a step above it fails on the GPU.
JAX_DEFAULT_MEMORY_FRACTION = 0.75
# The most to give JAX: the CUDA context and cuDNN/cuBLAS workspaces live beside its pool;
# and the share of the pool left to spare above a step's need.
MAX_MEMORY_FRACTION, SPARE_FRACTION = 0.95, 0.02
# The cuDNN and CUDA versions the compiler assumes (those of the jax[cuda12] wheels).
_CUDNN, _CUDA = (9, 8), (12, 8)


def is_gpu(name: str) -> bool:
  """A name for the GPU parser: TPU names start with their generation, v2 to v6e."""
  return not name.strip().lower().startswith('v')


def parse_topology(name: str) -> tpu.Slice:
  """'h100' (one GPU), 'h100-4' (GPUs of one host), 'h100-16' (hosts of 8 GPUs, as
  launch/slurm_gpu.sbatch runs them); a100, h100 and h200."""
  match = re.fullmatch(r'(a100|h100|h200)(?:-(\d+))?', name.strip().lower())
  if not match:
    raise tpu.SliceError(f'--topology={name!r} is not a GPU this knows: use a100, h100 or '
                         f'h200, or several: h100-8 (one host), h100-16 (two hosts of 8) '
                         f'(TPU slices: v5e-16, v4-32, ...).')
  count = int(match.group(2) or 1)
  if count < 1 or (count > MAX_PER_HOST and count % MAX_PER_HOST):
    raise tpu.SliceError(f'--topology={name!r}: give 1 to {MAX_PER_HOST} GPUs (one host) or '
                         f'a multiple of {MAX_PER_HOST} (hosts of {MAX_PER_HOST} GPUs each).')
  hosts, per_host = (1, count) if count <= MAX_PER_HOST else (count // MAX_PER_HOST,
                                                               MAX_PER_HOST)
  return tpu.Slice(name, GPUS[match.group(1)], f'1x{hosts}x{per_host}', count)


def target_config(chip: Gpu) -> str:
  """The device description the CUDA plugin's compiler takes (a GpuTargetConfigProto)."""
  major, minor = chip.compute_capability
  return f"""
gpu_device_info {{
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: {chip.shared_memory_per_core} threads_per_core_limit: 2048
  core_count: {chip.cores} fpus_per_core: {chip.fpus_per_core}
  block_dim_limit_x: 2147483647 block_dim_limit_y: 65535 block_dim_limit_z: 65535
  memory_bandwidth: {int(chip.hbm_bytes_per_s)} l2_cache_size: {chip.l2_bytes}
  clock_rate_ghz: {chip.clock_ghz} device_memory_size: {chip.hbm_bytes}
  shared_memory_per_block_optin: {chip.shared_memory_per_core - 1024}
  cuda_compute_capability {{ major: {major} minor: {minor} }}
  registers_per_core_limit: 65536 registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: {_CUDNN[0]} minor: {_CUDNN[1]} }}
runtime_version {{ major: {_CUDA[0]} minor: {_CUDA[1]} }}
device_description_str: "{chip.device_kind}"
"""


def compile_only_devices(slice_: tpu.Slice, num_slices: int = 1, *,
                         xla_gpu_flags: bool = True) -> list:
  """The GPUs' devices, for compiling only (needs JAX's CUDA plugin and cuDNN, not a GPU).
  The trainer's XLA GPU flags (config.xla_gpu_flags) are set first, as the trainer does."""
  # pylint: disable-next=g-import-not-at-top
  from jax.experimental import topologies
  if num_slices != 1:
    raise tpu.SliceError('--num_slices is for TPU slices; name all the GPUs instead, e.g. '
                         f'--topology={slice_.chip.generation}-16 for two hosts of 8.')
  if gpu_flags.cuda_plugin() is None:
    raise tpu.SliceError('Compiling for an NVIDIA GPU needs JAX\'s CUDA plugin, which is not '
                         'installed. Fix: make gpu-compiler, then run with '
                         'PYTHONPATH=.venv/gpu-compiler (on a GPU machine: pip install '
                         f'"jax[cuda12]=={jax.__version__}").')
  try:   # JAX asks cuDNN its version when it traces a cuDNN attention call
    # pylint: disable-next=g-import-not-at-top
    from jax._src.cudnn import fused_attention_stablehlo
    fused_attention_stablehlo.check_cudnn_version()
  except Exception as e:  # pylint: disable=broad-except  (RuntimeError, ImportError)
    raise tpu.SliceError(f'JAX\'s CUDA plugin is installed but cuDNN is not found ({e}); '
                         'the GPU compiler needs it for cuDNN flash attention. Fix: make '
                         'gpu-compiler, then run with PYTHONPATH=.venv/gpu-compiler.') from None
  gpu_flags.set_xla_gpu_flags(xla_gpu_flags, force=True)
  try:
    topology = topologies.get_topology_desc(
        platform='cuda', target_config=target_config(slice_.chip), topology=slice_.topology)
  except Exception as e:  # pylint: disable=broad-except  (the plugin's error types vary)
    raise tpu.SliceError(f'the CUDA plugin cannot describe {slice_.chips} x '
                         f'{slice_.chip.device_kind}: {str(e).splitlines()[0]}') from None
  return list(topology.devices)


def memory_fraction_needed(total_bytes: int, chip: Gpu) -> float | None:
  """The XLA_PYTHON_CLIENT_MEM_FRACTION a step of `total_bytes` needs, in hundredths with 2%
  to spare: None if JAX's default suffices, infinity if no setting leaves CUDA its share."""
  needed = total_bytes / chip.hbm_bytes
  if needed <= JAX_DEFAULT_MEMORY_FRACTION:
    return None
  fraction = math.ceil(round((needed + SPARE_FRACTION) * 100, 6)) / 100
  return fraction if fraction <= MAX_MEMORY_FRACTION else float('inf')


def memory_fraction_advice(total_bytes: int, chip: Gpu) -> str | None:
  """What the GPU run must set when the step needs more than JAX's allocator takes."""
  fraction = memory_fraction_needed(total_bytes, chip)
  if fraction is None:
    return None
  needs = (f'it needs {total_bytes / chip.hbm_bytes:.1%} of the GPU\'s memory and JAX takes '
           f'{JAX_DEFAULT_MEMORY_FRACTION:.0%} by default')
  if fraction == float('inf'):
    return (f'{needs}, and more than {MAX_MEMORY_FRACTION:.0%} leaves CUDA\'s own buffers no '
            'room: treat it as not fitting')
  return f'{needs}: run it with XLA_PYTHON_CLIENT_MEM_FRACTION={fraction:.2f}'

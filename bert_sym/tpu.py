"""TPU slices as users name them, the chips' figures, and their devices for compiling only.

`v5e-16`, `v5litepod-16`, `v4-32` (TensorCores: 16 chips), `v5p-128`, `v6e-8`, or the chip
grid itself (`v5e:4x4`, `v4:2x2x4`) -> libtpu's topology name and chip count, as MaxText's
accelerator table maps them. `compile_only_devices` asks libtpu (pip install -r
requirements-tpu.txt) for the slice's devices on any host, no TPU needed: what bert_sym.aot
compiles for.
"""

import contextlib
import dataclasses
import math
import os
import re
import sys
import tempfile

import jax
from jax.experimental import topologies

# Compiling for a topology loads libtpu next to whatever else this host runs; libtpu's
# one-process-per-machine lock guards real TPU chips, of which a compile uses none.
os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')


# ---- The chips: what the roofline estimate assumes (public spec sheets, per chip) ----

@dataclasses.dataclass(frozen=True)
class Chip:
  generation: str           # as in accelerator types: v4, v5e, v5p, v6e
  topology_prefix: str      # as libtpu names the topology: 'v5:2x2x1' is a v5p slice
  dims: int                 # torus dimensions (2 for the 'lite' chips)
  cores_in_name: int        # accelerator types of v4/v5p count TensorCores, 2 per chip
  chip_config: str          # 'megacore': the chip's two TensorCores act as one device
  hbm_bytes: int
  hbm_bytes_per_s: float
  compiler_bytes: int       # what the TPU compiler lets a program have of the HBM
  max_chips: int = 256      # the largest slice (pod) Cloud TPU offers
  backend: str = 'tpu'      # the JAX backend its kernels are resolved for

  @property
  def usable_bytes(self) -> int:
    return self.compiler_bytes


GiB = 1024 ** 3
# Peak bf16 FLOP/s comes from metrics_writer.PEAK_FLOPS_BY_DEVICE_KIND (the table MFU uses).
# compiler_bytes: the "available HBM" the TPU compiler (libtpu 0.0.42) names when a program
# does not fit, e.g. '... exceeds available HBM (15.75G)' on v5e; the rest it keeps. The
# v5p figure (95.74G) says its HBM is 96 GiB, not the 95 of some spec sheets.
CHIPS = {
    'v4': Chip('v4', 'v4', 3, 2, 'megacore', 32 * GiB, 1228e9, int(30.75 * GiB), 4096),
    'v5e': Chip('v5e', 'v5e', 2, 1, 'default', 16 * GiB, 819e9, int(15.75 * GiB)),
    'v5p': Chip('v5p', 'v5', 3, 2, 'megacore', 96 * GiB, 2765e9, int(95.74 * GiB), 8960),
    'v6e': Chip('v6e', 'v6e', 2, 1, 'default', 32 * GiB, 1640e9, int(31.25 * GiB)),
}
GENERATION_ALIASES = {'v5litepod': 'v5e', 'v5lite': 'v5e', 'v6lite': 'v6e', 'v5': 'v5p'}


@dataclasses.dataclass(frozen=True)
class Slice:
  name: str                 # as the user typed it
  chip: Chip                # or a gpu.Gpu (bert_sym/gpu.py)
  topology: str             # libtpu's name, e.g. 'v5e:4x4' (GPUs: the CUDA plugin's '1x1x8')
  chips: int


class SliceError(ValueError):
  """A slice name or topology that cannot be compiled for; one line with the fix."""


def _grid(chips: int, dims: int) -> list[int]:
  """The usual slice shape for a power-of-two chip count: 2D 2x2, 2x4, 4x4, 4x8, ...;
  3D (v4, v5p) 2x2x1, 2x2x2, 2x2x4, 2x4x4, 4x4x4, 4x4x8, ... (as the TPU docs list them)."""
  if dims == 2:
    a = 2 ** (int(math.log2(chips)) // 2)
    return [a, chips // a]
  if chips < 4:
    return [1, 1, chips] if chips > 1 else [1, 1, 1]
  shape = [2, 2, 1]
  while math.prod(shape) < chips:
    smallest = min(shape)
    last = max(i for i, s in enumerate(shape) if s == smallest)
    shape[last] *= 2
  return shape


def _example_grid(chips: int, dims: int) -> list[int] | None:
  """A grid of `chips` that libtpu accepts, near-cubic: its first two sides even (a host
  holds 2x2 chips), e.g. 12 -> 2x6 (2-D), 2x2x3 (3-D); None if there is none."""
  even = lambda n: [d for d in range(2, math.isqrt(n) + 1, 2) if n % d == 0] + [
      n // d for d in range(1, math.isqrt(n) + 1) if n % d == 0 and (n // d) % 2 == 0]
  grids = [[a, b] + [chips // (a * b)] * (dims - 2)
           for a in even(chips) for b in even(chips // a) if dims == 3 or a * b == chips]
  return min(grids, key=lambda g: (max(g), g), default=None)


def parse_topology(name: str) -> Slice:
  """'v5e-16', 'v5litepod-16', 'v4-32' (TensorCores: 16 chips), 'v5p-128', 'v6e-8', or
  the chip grid itself: 'v5e:4x4', 'v4:2x2x4', 'v5p:2x2x1'."""
  text = name.strip().lower()
  usage = (f'--topology={name!r} is not a TPU slice. Use an accelerator type (v4-32, '
           f'v5e-16, v5litepod-16, v5p-128, v6e-8) or generation:grid (v5e:4x4, v4:2x2x4); '
           f'or NVIDIA GPUs: a100, h100, h200, h100-8.')
  match = re.fullmatch(r'(v\d+[a-z]*)([-:])([\dx]+)', text)
  if not match:
    raise SliceError(usage)
  generation, separator, size = match.groups()
  generation = GENERATION_ALIASES.get(generation, generation)
  if generation not in CHIPS:
    raise SliceError(f'--topology={name!r}: unknown TPU generation {generation!r}; '
                   f'known: {", ".join(sorted(CHIPS))} (NVIDIA GPUs: a100, h100, h200).')
  chip = CHIPS[generation]
  if separator == ':':
    grid = [int(d) for d in size.split('x') if d]
    if len(grid) != chip.dims or min(grid) < 1:
      raise SliceError(f'--topology={name!r}: a {generation} grid has {chip.dims} '
                     f'dimensions, e.g. {generation}:{"x".join(["2"] * chip.dims)}.')
  else:
    if not size.isdigit() or int(size) % chip.cores_in_name:
      raise SliceError(usage)
    chips = int(size) // chip.cores_in_name
    if chips < 1 or chips & (chips - 1):
      grid = _example_grid(chips, chip.dims)
      example = (f', e.g. {generation}:{"x".join(map(str, grid))}' if grid else
                 ' (its first two sides even: a host holds 2x2 chips)')
      raise SliceError(f'--topology={name!r}: {chips} chips is not a power of two; give '
                       f'the grid instead{example}.')
    grid = _grid(chips, chip.dims)
  if math.prod(grid) > chip.max_chips:
    raise SliceError(f'--topology={name!r}: a {generation} slice has at most '
                     f'{chip.max_chips} chips; for more, join slices with --num_slices.')
  return Slice(name, chip, f'{chip.topology_prefix}:{"x".join(map(str, grid))}',
               math.prod(grid))


_SIZE = r'([\d.]+)\s*([KMGT]?)i?B?'
# The TPU compiler's two ways of saying it: 'Exceeded hbm capacity by 1.25G', and
# 'the total memory required for HLO temporaries (145.25G) exceeds available HBM (15.75G)'.
_OVER_BY = re.compile(r'[Ee]xceeded hbm capacity by ' + _SIZE, re.IGNORECASE)
_NEEDED_VS_AVAILABLE = re.compile(
    r'\(' + _SIZE + r'\) exceeds available HBM \(' + _SIZE + r'\)', re.IGNORECASE)
_UNITS = {'': 1, 'K': 2 ** 10, 'M': 2 ** 20, 'G': 2 ** 30, 'T': 2 ** 40}


def _size(number: str, unit: str) -> int:
  return int(float(number) * _UNITS[unit.upper()])


def vmem_shortage(message: str) -> str | None:
  """What to say when the compiler's out-of-memory is a kernel's scratch in a core's vector
  memory (Mosaic: CompileTimeScopedVmemOom), not HBM: more chips or sharding do not shrink
  it, so the HBM advice would not help. None for any other message."""
  if 'vmem' not in message.lower() or 'hbm' in message.lower():
    return None
  return ('a kernel needs more on-chip vector memory (VMEM) than a core has; this is not '
          f'HBM ({message.splitlines()[0][:300]}). Fix: --config.model.attention_impl=xla, '
          'or a smaller head size (model.hidden_size / model.num_heads).')


def bytes_over_hbm(message: str) -> int | None:
  """How far over HBM the compiler's out-of-memory message says the step is, if it does."""
  found = _OVER_BY.search(message)
  if found:
    return _size(*found.groups())
  found = _NEEDED_VS_AVAILABLE.search(message)
  if found:
    needed, available = _size(*found.groups()[:2]), _size(*found.groups()[2:])
    return max(0, needed - available)
  return None


def compile_only_devices(slice_: Slice, num_slices: int = 1) -> list:
  """The slice's devices, for compiling only (needs libtpu, not a TPU)."""
  try:
    import libtpu  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    raise SliceError('Compiling for a TPU needs libtpu, which is not installed. Fix: '
                   'pip install -r requirements-tpu.txt (the jax[tpu] extra of the '
                   f'installed jax {jax.__version__}).') from None
  kwargs = dict(chip_config_name=slice_.chip.chip_config)
  grid = [int(side) for side in slice_.topology.split(':')[1].split('x')]
  if slice_.chips == 1 or (slice_.chip.dims == 2 and slice_.chips == 8):
    # Cloud TPU's hosts: libtpu assumes 2x2 chips each, but a one-chip slice (v5e-1,
    # v6e-1; refused under that default) and a v5e-8 / v6e-8 are one VM.
    kwargs['chips_per_host_bounds'] = tuple(grid + [1] * (3 - len(grid)))
  if num_slices > 1:
    kwargs['num_slices'] = num_slices
  try:
    with _libtpu_startup_quiet():
      topology = topologies.get_topology_desc(
          topology_name=slice_.topology, platform='tpu', **kwargs)
  except Exception as e:  # pylint: disable=broad-except  (libtpu's error types vary)
    raise SliceError(f'libtpu cannot describe the topology {slice_.topology} '
                   f'(num_slices={num_slices}): {str(e).splitlines()[0]}') from None
  return list(topology.devices)


@contextlib.contextmanager
def _libtpu_startup_quiet():
  """libtpu, loaded off a TPU VM, writes half a dozen lines of 'could not determine TPU
  worker hostnames' to the process's stderr (C++, fd 2): expected here, so they go to a
  temporary file and are dropped, also when the topology is refused (the SliceError
  carries libtpu's own reason in one line)."""
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile(mode='w+') as sink:
    os.dup2(sink.fileno(), 2)
    try:
      yield
    finally:
      os.dup2(saved, 2)
      os.close(saved)


def no_tpu_here() -> bool:
  """libtpu is installed (to compile for TPUs with `bert_sym.aot`) on a machine with no TPU
  and no GPU plugin, and the user has not chosen JAX_PLATFORMS: JAX would try to start a
  TPU at its first use, print half a dozen INVALID_ARGUMENT lines, then take the CPU."""
  import glob  # pylint: disable=import-outside-toplevel
  import importlib.util  # pylint: disable=import-outside-toplevel
  from bert_sym import gpu_flags  # pylint: disable=import-outside-toplevel
  if os.environ.get('JAX_PLATFORMS') or importlib.util.find_spec('libtpu') is None:
    return False
  on_a_tpu_vm = (glob.glob('/dev/accel*') or os.path.exists('/dev/vfio')
                 or os.environ.get('TPU_ACCELERATOR_TYPE'))
  return not on_a_tpu_vm and gpu_flags.cuda_plugin() is None


def use_the_cpu_without_a_tpu() -> None:
  """Skips JAX's TPU probe where `no_tpu_here` (compiling for a TPU topology still works:
  bert_sym.aot asks libtpu for the slice's devices directly)."""
  if no_tpu_here():
    jax.config.update('jax_platforms', 'cpu')

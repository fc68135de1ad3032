r"""Compile the trainer's own steps for a TPU slice or NVIDIA GPUs on any machine, before renting them.

  python -m bert_sym.aot --config=configs/sym_base.py:fast --topology=v5e-16
  python -m bert_sym.aot --config=configs/sym_base.py --topology=v4-32 --out=report.json \
      --config.mesh.fsdp=4
  PYTHONPATH=.venv/gpu-compiler python -m bert_sym.aot --config=configs/sym_base.py:fast \
      --topology=h200

TPUs need `libtpu` (pip install -r requirements-tpu.txt); GPUs JAX's CUDA plugin
(bert_sym/gpu.py). No TPU or GPU. The compiler runs on this host for compile-only devices
(`jax.experimental.topologies`), on the same update and eval steps `bert_sym.train` jits
(train.build_mlm_step: one definition for both), the same mesh, shardings and donation,
with shapes only: nothing is allocated. Kernels are resolved for the target, not the host
(attention_impl auto -> the Mosaic splash kernel on TPU, cuDNN flash attention on GPU;
model.dtype auto -> bfloat16); the compiled program's custom calls show which ran.

It prints, and writes as JSON with --out: the slice, the mesh, the attention kernel,
compile seconds, per-chip memory from the compiler (arguments, temporaries, outputs,
aliases, total) against the chip's HBM, the collectives in the compiled program, the
compiler's per-chip FLOPs and bytes, and a roofline ESTIMATE of the step time, tokens/s
per chip and the wall time of config.total_steps. Exit status 1, with one line naming the
bytes over and the knobs to turn, when the step does not fit in HBM.

The estimate's FLOPs are the model's own count (model.train_flops_per_token): XLA's
cost_analysis() counts a loop body once (the layers of model.scan_layers=True, the
micro-batches of optimizer.grad_accum_steps > 1), so its figures, reported as they are,
are low then, and the estimate's memory term is a lower bound.
"""

import collections
import dataclasses
import json
import re
import sys
import time
from typing import Any

from absl import app
from absl import flags
from etils import epath
import jax
import ml_collections
import numpy as np

from bert_sym import config_check
from bert_sym import files
from bert_sym import gpu
from bert_sym import kernel_choice
from bert_sym import metrics_writer
from bert_sym import model as model_lib
from bert_sym import objectives
from bert_sym import sharding
from bert_sym import steps
from bert_sym import tpu
from bert_sym import train
from bert_sym.input import masking

# --config (and --config.<key>=<value>) is the trainer's own flag: importing bert_sym.train
# defines it, with its other flags, which this command ignores.
_CONFIG = train._CONFIG  # pylint: disable=protected-access
_TOPOLOGY = flags.DEFINE_string(
    'topology', None, 'The TPU slice: a Cloud TPU accelerator type (v4-32, v5e-16, '
    'v5litepod-16, v5p-128, v6e-8) or generation:grid (v5e:4x4, v4:2x2x4); or NVIDIA '
    'GPUs: a100, h100, h200, h100-8 (one host), h100-16 (two hosts of 8).')
_NUM_SLICES = flags.DEFINE_integer(
    'num_slices', 1, 'Slices joined over the data-center network (multi-slice).')
_OUT = flags.DEFINE_string('out', None, 'Write the report as JSON to this file.')
_EVAL_STEP = flags.DEFINE_bool(
    'eval_step', True, 'Also compile the eval step (always smaller than the train step).')
_REQUIRE_DATA = flags.DEFINE_bool(
    'require_data', False, 'Also refuse a config that names no data (exported shards '
    'without --config.data.shards_dir): launch/tpu_vm.sh passes it.')


class AotError(Exception):
  """A problem reported in one line, without a traceback (exit status 1)."""


# ---- The steps, as the trainer builds them, on abstract (shape-only) arguments ----

def abstract_batch(config, batch_sharding) -> dict:
  """ShapeDtypeStructs of one global batch, as bert_sym.train feeds its steps: the
  masking features (masking.FEATURES; mlm_weights float32, the rest int32) plus the
  sparse head's positions when model.sparse_mlm (objectives.host_mlm_positions)."""
  length, rows = config.data.max_seq_len, config.batch_size
  one_row = {k: np.zeros((1, length), np.float32 if k == 'mlm_weights' else np.int32)
             for k in masking.FEATURES}
  if config.model.sparse_mlm:
    one_row = objectives.host_mlm_positions(one_row, config.data.max_predictions_per_seq)
  return {k: jax.ShapeDtypeStruct((rows,) + v.shape[1:], v.dtype, sharding=batch_sharding)
          for k, v in one_row.items()}


@dataclasses.dataclass
class Built:
  mesh: Any
  spec: steps.StateSpec
  batch: dict
  train_step: Any           # jitted, as the trainer's
  eval_step: Any
  kernel: str
  dtype: str


def build_steps(config: ml_collections.ConfigDict, devices) -> Built:
  """The trainer's mesh, state and steps (bert_sym.train.build_mlm_step) on `devices`."""
  mesh = train.checked_mesh(config, devices)
  mlm = train.build_mlm_step(config, mesh)
  dtype = model_lib.compute_dtype(config.model.dtype)
  kernel = config_check.training_kernel(config)
  return Built(mesh, mlm.spec, abstract_batch(config, mlm.batch_sharding), mlm.train_step,
               mlm.eval_step, kernel, np.dtype(dtype).name)


# ---- What the compiler says ----

COLLECTIVES = ('all-reduce', 'all-gather', 'reduce-scatter', 'all-to-all', 'collective-permute')
# An HLO '... = f32[..] all-reduce(...)' or its async '-start' half ('-done' is the same one).
_COLLECTIVE_OP = re.compile(r'\s(' + '|'.join(COLLECTIVES) + r')(?:-start)?\(')
CUSTOM_CALL = re.compile(r'custom_call_target="([^"]+)"')
# A Pallas kernel lowered through Triton (GPU): jaxlib <= 0.10.2's target, then newer's.
TRITON_CALLS = ('__gpu$xla.gpu.triton', 'triton_kernel_call_ffi')


def count_collectives(hlo_text: str) -> dict[str, int]:
  counts = collections.Counter(match.group(1) for match in _COLLECTIVE_OP.finditer(hlo_text))
  return {kind: counts[kind] for kind in COLLECTIVES if counts[kind]}


def memory_report(compiled) -> dict[str, int]:
  """Per-chip bytes of one executable. Donated arguments alias outputs, so the total
  counts them once: arguments + outputs - aliases + temporaries + code."""
  stats = compiled.memory_analysis()
  out = dict(arguments=stats.argument_size_in_bytes, outputs=stats.output_size_in_bytes,
             aliases=stats.alias_size_in_bytes, temporaries=stats.temp_size_in_bytes,
             generated_code=stats.generated_code_size_in_bytes)
  out['total'] = (out['arguments'] + out['outputs'] - out['aliases'] + out['temporaries']
                  + out['generated_code'])
  return {k: int(v) for k, v in out.items()}


def cost_report(compiled) -> dict[str, float] | None:
  """None where the compiler gives none (the GPU compiler without a GPU)."""
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost   # older jax: one per module
  return None if cost is None else {'flops': float(cost.get('flops', 0.0)),
                                    'bytes_accessed': float(cost.get('bytes accessed', 0.0))}


def fit_advice(config, num_slices: int = 1, data_parallel: int = 1) -> str:
  """The knobs that lower per-chip memory, as flags with values to try (only existing keys).
  With several slices the data axis must keep one entry per slice (sharding.make_mesh); a
  micro-batch must still split over the `data_parallel` chips (sharding.check_batch_size)."""
  knobs = []
  if (config.mesh.get('fsdp') is not None and config.mesh.fsdp == 1
      and (data_parallel > 1 or num_slices > 1)):   # (one GPU: nothing to shard over)
    knobs.append(f'--config.mesh.fsdp=-1 --config.mesh.data={num_slices} (shard params and '
                 'Adam state over the chips' + (' of each slice)' if num_slices > 1 else ')'))
  accum, batch = config.optimizer.get('grad_accum_steps'), config.batch_size
  more = next((k for k in range((accum or 1) + 1, batch // data_parallel + 1)
               if batch % (k * data_parallel) == 0), None)   # the next one that splits
  if accum is not None and more:
    knobs.append(f'--config.optimizer.grad_accum_steps={more} (same batch, '
                 f'{accum / more:.2g}x the activations)')
  if not config.model.get('remat', True):
    knobs.append('--config.model.remat=True (recompute activations in the backward pass)')
  # Not scan_layers=True: it shortens the compile, but needs more memory (bert-base on v4-8:
  # 16.5 GiB a chip unscanned, 35.4 GiB scanned).
  step = (accum or 1) * data_parallel   # the smallest batch that splits
  if batch // 2 >= step:
    knobs.append(f'--config.batch_size={batch // 2 // step * step} (changes the recipe)')
  knobs = knobs or ['more chips (a larger --topology), --config.mesh.tensor=2 or more, or a '
                    'smaller model']   # everything that trades speed for memory is on
  return 'Try: ' + '; or '.join(knobs) + '.'


def _duration(hours: float) -> str:
  return (f'{hours / 24:.1f} days' if hours >= 48 else f'{hours:.2f} hours' if hours >= 1
          else f'{hours * 60:.1f} minutes' if hours * 60 >= 1 else f'{hours * 3600:.1f} s')


def _human(n: float) -> str:
  return f'{n / tpu.GiB:.2f} GiB'


def estimate(config, slice_: tpu.Slice, num_slices: int, device, step_bytes: float,
             loops: list[str]) -> dict:
  """Roofline ESTIMATE of one step on one chip: max(FLOPs / peak, bytes / HBM bandwidth).

  FLOPs: the model's own count (model.train_flops_per_token x tokens per chip); bytes:
  the compiler's per-chip bytes accessed: a lower bound if `loops` (loops_counted_once);
  None (no memory term) where the compiler gives no cost analysis.
  """
  chips = slice_.chips * num_slices
  seq_len = config.data.max_seq_len
  tokens_per_chip = config.batch_size * seq_len / chips
  flops_per_token = model_lib.train_flops_per_token(
      config.model, seq_len, model_lib.mlm_predicted_fraction(config))
  peak = metrics_writer.peak_flops_per_device(
      device, override=config.get('peak_flops_per_device', 0.0))
  flops = flops_per_token * tokens_per_chip
  compute_s = flops / peak
  memory_s = None if step_bytes is None else step_bytes / slice_.chip.hbm_bytes_per_s
  step_s = max(compute_s, memory_s or 0.0)
  return {
      'note': 'roofline estimate (not a measurement): max(model FLOPs / peak, compiler '
              'bytes accessed / HBM bandwidth); real steps are slower (MFU < 100%)',
      'peak_flops_per_chip': peak, 'hbm_bytes_per_s': slice_.chip.hbm_bytes_per_s,
      'model_flops_per_token': flops_per_token,
      'model_flops_per_chip_per_step': flops, 'tokens_per_chip_per_step': tokens_per_chip,
      'compute_bound_s': compute_s, 'memory_bound_s': memory_s,
      'memory_bound_is_lower_bound': bool(loops) and memory_s is not None,
      'loops_counted_once': loops,
      'step_s': step_s, 'bound': 'compute' if compute_s >= (memory_s or 0.0) else 'memory',
      'tokens_per_s_per_chip': tokens_per_chip / step_s,
      'total_steps': config.total_steps,
      'total_hours': config.total_steps * step_s / 3600,
  }


def preflight(config: ml_collections.ConfigDict, topology: str, num_slices: int = 1, *,
              eval_step: bool = True, executables: dict | None = None) -> dict:
  """Compiles the train and eval steps of `config` for the slice; returns the report.

  The eval step is compiled when the train step fits (and `eval_step`). `executables`, if
  given, receives the compiled steps by name (for inspection; they cannot run here). A
  step that does not fit is reported (fits False, bytes_over_hbm); AotError (one line)
  is raised for a topology or config that cannot be compiled for."""
  slice_, devices = _slice_devices(config, topology, num_slices)
  report = _report_header(config, slice_, devices, num_slices)
  with kernel_choice.target_backend(slice_.chip.backend):
    try:
      built = build_steps(config, devices)
    except ValueError as e:   # the trainer's own readable mesh / batch / kernel errors
      raise AotError(str(e)) from None
    report.update(mesh=dict(built.mesh.shape), kernel=built.kernel, dtype=built.dtype,
                  data_parallel=sharding.data_parallel_size(built.mesh,
                                                            sharding.logical_rules(config)))
    over = None
    todo = [('train_step', built.train_step, (built.spec.abstract, built.batch))]
    if eval_step:
      todo.append(('eval_step', built.eval_step, (built.spec.abstract['params'], built.batch)))
    for name, jitted, args in todo:
      report[name], over = _compile_report(jitted, args, name, executables)
      memory = report[name].get('memory')
      if memory is None or memory['total'] > slice_.chip.usable_bytes:
        break   # out of memory: the eval step need not be tried
  compiled = [report[name] for name, _, _ in todo if name in report]   # eval: maybe not tried
  totals = [step['memory']['total'] for step in compiled if step.get('memory')]
  unknown = len(totals) < len(compiled)   # the compiler ran out of memory, or said nothing
  report['fits'] = over is None and not unknown and max(totals) <= slice_.chip.usable_bytes
  if over is None and totals and not (unknown and max(totals) <= slice_.chip.usable_bytes):
    over = max(0, max(totals) - slice_.chip.usable_bytes)
  report['bytes_over_hbm'] = over   # None: out of memory without saying by how much
  if slice_.chip.backend == 'gpu' and report['fits']:
    report['memory_fraction_advice'] = gpu.memory_fraction_advice(max(totals), slice_.chip)
  if report['train_step'].get('memory') is not None:
    cost = report['train_step']['compiler_cost']
    report['estimate'] = estimate(config, slice_, num_slices, devices[0],
                                  cost and cost['bytes_accessed'], loops_counted_once(report))
  return report


def loops_counted_once(report, eval_step: bool = False) -> list[str]:
  """The step's loops whose body cost_analysis() counts once (so its figures are low)."""
  accumulates = report['grad_accum_steps'] > 1 and not eval_step
  return [name for name, on in (('scanned layers', report['scan_layers']),
                                ('gradient accumulation', accumulates)) if on]


def _slice_devices(config, topology: str, num_slices: int):
  """The config checked as the trainer checks it, then the slice and its compile-only
  devices; AotError (one line) on any problem."""
  try:
    config_check.check(config)
  except config_check.ConfigError as e:
    raise AotError(str(e)) from None
  if num_slices < 1:
    raise AotError(f'--num_slices={num_slices} must be >= 1.')
  try:
    if gpu.is_gpu(topology):
      slice_ = gpu.parse_topology(topology)
      return slice_, gpu.compile_only_devices(slice_, num_slices,
                                              xla_gpu_flags=config.get('xla_gpu_flags', True))
    slice_ = tpu.parse_topology(topology)
    return slice_, tpu.compile_only_devices(slice_, num_slices)
  except tpu.SliceError as e:
    raise AotError(str(e)) from None


def _report_header(config, slice_, devices, num_slices: int) -> dict[str, Any]:
  return {
      'topology': slice_.name, 'compiler_topology': slice_.topology,
      'device_kind': devices[0].device_kind, 'num_slices': num_slices,
      'chips': len(devices), 'hbm_bytes_per_chip': slice_.chip.hbm_bytes,
      'usable_bytes_per_chip': slice_.chip.usable_bytes,   # the compiler's or JAX's share
      'jax': jax.__version__, 'attention': config.model.attention,
      'attention_impl': config.model.attention_impl, 'task': config.data.task,
      'batch_size': config.batch_size, 'seq_len': config.data.max_seq_len,
      'scan_layers': bool(config.model.get('scan_layers', False)),
      'remat': bool(config.model.get('remat', False)),
      'grad_accum_steps': config.optimizer.grad_accum_steps,
  }


def _compile_report(jitted, args, name: str, executables: dict | None):
  """(the step's report, bytes over HBM if the compiler ran out of memory else None)."""
  try:
    start = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    seconds = time.perf_counter() - start
  except Exception as e:  # pylint: disable=broad-except  (XlaRuntimeError and kin)
    message = str(e)
    if 'RESOURCE_EXHAUSTED' not in message and 'hbm' not in message.lower():
      raise
    if vmem := tpu.vmem_shortage(message):
      raise AotError(f'{name}: {vmem}') from None
    return {'compiler_out_of_memory': message.splitlines()[0][:500]}, tpu.bytes_over_hbm(message)
  if executables is not None:
    executables[name] = compiled
  hlo = compiled.as_text()
  return {
      'compile_s': seconds, 'memory': memory_report(compiled),
      'collectives': count_collectives(hlo),
      # The kernels outside XLA's fusions: Mosaic (splash: tpu_custom_call), cuDNN
      # flash attention (__cudnn$fmhaSoftmax[Dropout][Backward]), Pallas on GPU (Triton).
      'custom_calls': dict(collections.Counter(CUSTOM_CALL.findall(hlo))),
      'compiler_cost': cost_report(compiled),
  }, None


def summary(report: dict) -> str:
  lines = [
      f"{report['topology']} ({report['compiler_topology']}, {report['chips']} x "
      f"{report['device_kind']}, {report['num_slices']} slice(s)); mesh {report['mesh']}; "
      f"attention {report['attention']} with kernel {report['kernel']}, {report['dtype']}; "
      f"batch {report['batch_size']} x seq {report['seq_len']}"]
  for name in ('train_step', 'eval_step'):
    part = report.get(name)
    if not part:
      continue
    if 'memory' not in part:
      lines.append(f'{name}: the compiler ran out of memory: '
                   f"{part['compiler_out_of_memory']}")
      continue
    m, cost = part['memory'], part['compiler_cost']
    lines.append(
        f"{name}: compiled in {part['compile_s']:.1f} s; per chip {_human(m['total'])} of "
        f"{_human(report['hbm_bytes_per_chip'])} HBM (arguments {_human(m['arguments'])}, "
        f"temporaries {_human(m['temporaries'])}, outputs {_human(m['outputs'])}, "
        f"aliased {_human(m['aliases'])}); collectives {part['collectives'] or 'none'}; "
        f"custom calls {part['custom_calls'] or 'none'}; " + (
            f"compiler cost per chip {cost['flops']:.3g} FLOPs, {cost['bytes_accessed']:.3g} "
            f"bytes" if cost else 'no compiler cost analysis (none without the device)') + (
            ' (a loop body counted once: low)'
            if cost and loops_counted_once(report, eval_step=name == 'eval_step') else ''))
  lines.append(f"fits: {report['fits']}" + (f"; but {report['memory_fraction_advice']}"
                                            if report.get('memory_fraction_advice') else ''))
  est = report.get('estimate')
  if est:
    loops = ' and '.join(est['loops_counted_once'])
    lower = (f'; the memory term is a lower bound: the compiler counts the loop body of '
             f'{loops} once' if est['memory_bound_is_lower_bound'] else '')
    if est['memory_bound_s'] is None:
      lower = '; FLOPs only: no memory term without the compiler\'s cost analysis'
    lines.append(
        f"ESTIMATE (roofline, not measured): {est['step_s'] * 1e3:.1f} ms/step "
        f"({est['bound']}-bound{lower}), {est['tokens_per_s_per_chip']:,.0f} tokens/s per "
        f"chip, {est['total_steps']:,} steps in {_duration(est['total_hours'])}")
  return '\n'.join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if _CONFIG.value is None or not _TOPOLOGY.value:
    raise app.UsageError('--config and --topology are required, e.g. '
                         '--config=configs/sym_base.py --topology=v5e-16')
  metrics_writer.quiet_logs(flags.FLAGS['verbosity'].present, import_tf=False)
  # Nothing runs on this host: keep JAX off any local accelerator (a TPU VM's chips stay
  # free for its trainer); the target's devices come from libtpu or the CUDA plugin, for
  # compiling only. Their executables cannot be loaded from a persistent compilation cache
  # (no client to load them into: a warning per step), nor are they ever run: no cache.
  jax.config.update('jax_platforms', 'cpu')
  jax.config.update('jax_enable_compilation_cache', False)
  config = _CONFIG.value
  if _OUT.value:   # checked before compiling, which can take minutes (local or gs://)
    out = epath.Path(_OUT.value)
    if out.is_dir():
      raise app.UsageError(f'--out={_OUT.value} is a directory; give the report a file '
                           f'name, e.g. --out={out / "aot.json"}.')
    try:
      files.check_writable(out.parent, f'the directory of --out={_OUT.value}')
    except ValueError as e:
      raise app.UsageError(str(e)) from None
  try:
    if _REQUIRE_DATA.value:
      config_check.check_data_named(config)
    report = preflight(config, _TOPOLOGY.value, _NUM_SLICES.value,
                       eval_step=_EVAL_STEP.value)
  except (AotError, config_check.ConfigError) as e:
    print(f'bert_sym.aot: error: {e}', file=sys.stderr, flush=True)
    sys.exit(1)
  print(summary(report), flush=True)
  if _OUT.value:
    files.write_atomically(_OUT.value, json.dumps(report, indent=2))
  if not report['fits']:
    over = report['bytes_over_hbm']
    over_text = f'{_human(over)} over' if over else 'over (the compiler gave no figure)'
    owner = 'the TPU compiler' if report['device_kind'].startswith('TPU') else 'JAX'
    print(f"bert_sym.aot: error: does not fit on {report['topology']}: {over_text} the "
          f"{_human(report['usable_bytes_per_chip'])} (of {_human(report['hbm_bytes_per_chip'])})"
          f" that {owner} can have of the HBM of a {report['device_kind']} chip. "
          f"{fit_advice(config, _NUM_SLICES.value, report['data_parallel'])}", file=sys.stderr)
    sys.exit(1)


if __name__ == '__main__':
  from bert_sym import cli  # pylint: disable=g-import-not-at-top
  cli.run(main, prog='bert_sym.aot', flags_parser=config_check.parse_flags)

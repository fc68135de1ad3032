"""bert_sym.aot: the trainer's steps compiled for TPU slices on this CPU host (libtpu).

Every compile is the real TPU compiler (Mosaic for splash) on compile-only devices, so
these run in CI without a TPU. Compiles take tens of seconds on a loaded 2-core machine:
the splash variants use scanned layers (one layer body compiled) and the train step only.
"""

import json
import math
import os
import re
import subprocess
import sys
import types

import numpy as np
import pytest

# Before anything loads libtpu: its one-process lock guards real chips, of which none is used.
os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')

from bert_sym import aot  # pylint: disable=g-import-not-at-top
from bert_sym import kernel_choice
from bert_sym import model as model_lib
from bert_sym import sharding
from bert_sym import tpu
from bert_sym import train
from configs import tiny

pytest.importorskip('libtpu', reason='needs libtpu: pip install -r requirements-tpu.txt')

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEQ = 128


@pytest.fixture(autouse=True)
def _no_persistent_compilation_cache():
  """As `python -m bert_sym.aot` runs: a compile-only executable cannot be read back from
  JAX's persistent cache (no client to load it into: a warning), so none is used."""
  import jax  # pylint: disable=g-import-not-at-top
  before = jax.config.jax_enable_compilation_cache
  jax.config.update('jax_enable_compilation_cache', False)
  yield
  jax.config.update('jax_enable_compilation_cache', before)


def tiny_config(**model):
  config = tiny.get_config()
  config.data.max_seq_len = SEQ
  config.model.max_position_embeddings = SEQ
  config.data.max_predictions_per_seq = 20
  config.model.update(model)
  return config


# ---- Topology names (no compile) ----

@pytest.mark.parametrize('name, topology, chips', [
    # Cloud TPU accelerator types: v4 and v5p count TensorCores (2 per chip).
    ('v4-8', 'v4:2x2x1', 4), ('v4-32', 'v4:2x2x4', 16), ('v4-128', 'v4:4x4x4', 64),
    ('v5p-8', 'v5:2x2x1', 4), ('v5p-128', 'v5:4x4x4', 64), ('v5p-256', 'v5:4x4x8', 128),
    ('v5e-4', 'v5e:2x2', 4), ('v5e-16', 'v5e:4x4', 16), ('v5litepod-16', 'v5e:4x4', 16),
    ('v5e-8', 'v5e:2x4', 8), ('v5e-256', 'v5e:16x16', 256), ('v6e-8', 'v6e:2x4', 8),
    ('v5e:4x4', 'v5e:4x4', 16), ('v4:2x2x4', 'v4:2x2x4', 16), ('V5E-16', 'v5e:4x4', 16),
])
def test_topology_names_map_to_libtpu_slices(name, topology, chips):
  slice_ = tpu.parse_topology(name)
  assert (slice_.topology, slice_.chips) == (topology, chips)
  # libtpu agrees: one compile-only device per chip (megacore on v4/v5p).
  assert len(tpu.compile_only_devices(slice_)) == chips


@pytest.mark.parametrize('name, hosts', [
    ('v5e-1', 1), ('v6e-1', 1), ('v4-2', 1),   # were refused: "not divisible by ... 2x2x1"
    ('v5e-8', 1), ('v6e-8', 1),                # one VM of 8 chips (was compiled as 2 hosts)
    ('v5e-4', 1), ('v5e-16', 4), ('v4-32', 4)])
def test_compile_only_slices_have_cloud_tpus_hosts(name, hosts, capfd):
  devices = tpu.compile_only_devices(tpu.parse_topology(name))
  assert len({d.process_index for d in devices}) == hosts
  # A topology libtpu refuses is one line, without its start-up noise on stderr.
  capfd.readouterr()
  with pytest.raises(tpu.SliceError, match='libtpu cannot describe'):
    tpu.compile_only_devices(tpu.Slice('v5e:1x2', tpu.CHIPS['v5e'], 'v5e:1x2', 2))
  assert capfd.readouterr().err == ''


@pytest.mark.parametrize('name, peak', [('v4-8', 275e12), ('v5e-4', 197e12),
                                        ('v5p-8', 459e12), ('v6e-8', 918e12)])
def test_each_tpu_generation_gets_its_own_peak_for_mfu(name, peak):
  """The device kind as libtpu names it ('TPU v5 lite', 'TPU v5', ...) finds the chip's
  bf16 peak of the public spec sheet: the table is matched by substring, so an entry in the
  wrong order gave v5e the v5p peak (MFU 2.3x too low) without a test noticing."""
  from bert_sym import metrics_writer  # pylint: disable=g-import-not-at-top
  device = tpu.compile_only_devices(tpu.parse_topology(name))[0]
  assert metrics_writer.peak_flops_per_device(device) == peak, device.device_kind


@pytest.mark.parametrize('name, message', [
    ('v5e16', 'is not a TPU slice'), ('v7x-8', 'unknown TPU generation'),
    ('v4-7', 'is not a TPU slice'), ('v5e-12', 'not a power of two'),
    ('v4:4x4', 'grid has 3 dimensions'),
    ('v5e-512', 'at most 256 chips'), ('v6e:32x16', 'at most 256 chips')])
def test_bad_topology_names_are_one_line_errors(name, message):
  with pytest.raises(tpu.SliceError, match=message) as error:
    tpu.parse_topology(name)
  assert '\n' not in str(error.value)


@pytest.mark.parametrize('name, chips', [('v5e-12', 12), ('v4-24', 12), ('v6e-24', 24)])
def test_the_grid_offered_for_a_chip_count_not_a_power_of_two_is_a_slice(name, chips):
  """It was 'e.g. v5e:4x4x12' for every generation and count: a 3-D grid for a 2-D
  chip, and 192 chips for 12."""
  with pytest.raises(tpu.SliceError, match='not a power of two') as error:
    tpu.parse_topology(name)
  grid = str(error.value).split('e.g. ')[1].rstrip('.')
  slice_ = tpu.parse_topology(grid)
  assert slice_.chips == chips and len(tpu.compile_only_devices(slice_)) == chips


def test_multi_slice_mesh_spans_slices_on_the_data_axis_only():
  devices = tpu.compile_only_devices(tpu.parse_topology('v5e-4'), num_slices=2)
  assert len(devices) == 8 and {d.slice_index for d in devices} == {0, 1}
  config = tiny_config()
  config.mesh.update(data=-1, fsdp=2, tensor=1)
  mesh = sharding.make_mesh(config.mesh, devices)
  assert dict(mesh.shape) == {'data': 4, 'fsdp': 2, 'tensor': 1}
  slice_of = np.vectorize(lambda d: d.slice_index)(mesh.devices)
  # Each fsdp group lies inside one slice; the data axis crosses from slice 0 to slice 1.
  assert (slice_of == slice_of[:, :1, :]).all()
  assert list(slice_of[:, 0, 0]) == [0, 0, 1, 1]
  # What aot's "does not fit" advice said with 2 slices (fsdp=-1 data=1), and then the
  # advice here (data=-1 beside fsdp=-1: "at most one axis may be -1"); both now work.
  config.mesh.update(data=1, fsdp=-1)
  with pytest.raises(ValueError, match=r'multiple of the 2 slices.*mesh.data=2 or'):
    sharding.make_mesh(config.mesh, devices)
  advice = aot.fit_advice(tiny_config(), num_slices=2)   # its mesh: data=-1, fsdp=1
  assert '--config.mesh.fsdp=-1 --config.mesh.data=2' in advice, advice
  config.mesh.update(data=2, fsdp=-1)
  assert dict(sharding.make_mesh(config.mesh, devices).shape) == {'data': 2, 'fsdp': 4,
                                                                  'tensor': 1}


def test_a_mesh_the_slices_hosts_would_refuse_is_refused_here():
  """v5e-16 is 4 hosts of 4 chips. data=2 x tensor=8 passed the preflight (this process
  alone was counted) and stopped every trainer of the rented slice at start-up."""
  devices = tpu.compile_only_devices(tpu.parse_topology('v5e-16'))
  assert len({d.process_index for d in devices}) == 4
  config = tiny_config()
  config.mesh.update(data=2, fsdp=1, tensor=8)
  with pytest.raises(ValueError, match='data-parallel size 2 is not a multiple of the 4 '
                                       'processes'):
    train.checked_mesh(config, devices)
  config.mesh.update(data=-1, fsdp=1, tensor=1)   # 16-way data parallel: 4 rows per host
  config.batch_size = 32
  assert dict(train.checked_mesh(config, devices).shape)['data'] == 16


@pytest.mark.parametrize('batch, accum, data_parallel, offered', [
    (16384, 1, 4, ('grad_accum_steps=2', 'batch_size=8192')),
    (24, 2, 4, ('grad_accum_steps=3', 'batch_size=8')),
    (4, 1, 4, ())])   # nothing smaller splits over 4 chips
def test_fit_advice_offers_only_batches_that_split_over_the_chips(batch, accum,
                                                                   data_parallel, offered):
  """A batch or accumulation that sharding.check_batch_size refuses is no advice: it
  offered grad_accum_steps=2 and batch_size=2 for a batch of 4 on 4 chips."""
  config = tiny_config()
  config.batch_size, config.optimizer.grad_accum_steps = batch, accum
  advice = aot.fit_advice(config, data_parallel=data_parallel)
  for knob in offered:
    assert f'--config.optimizer.{knob} ' in advice or f'--config.{knob} ' in advice, advice
  values = re.findall(r'--config\.(?:optimizer\.)?(grad_accum_steps|batch_size)=(\d+)', advice)
  assert len(values) == len(offered), advice
  for knob, value in values:   # each change on its own, as the advice offers them
    tried = {'batch_size': batch, 'grad_accum_steps': accum, knob: int(value)}
    assert tried['batch_size'] % (tried['grad_accum_steps'] * data_parallel) == 0, tried


def test_a_kernel_out_of_vector_memory_is_not_called_out_of_hbm():
  """Splash at a large head size ran out of a core's VMEM: it was reported as 'does not fit
  in HBM', with advice (fsdp, remat) that cannot help."""
  class Jitted:
    def lower(self, *args):
      return self

    def compile(self):
      raise RuntimeError('RESOURCE_EXHAUSTED: E1001: CompileTimeScopedVmemOom: Ran out of '
                         'memory in memory space vmem while allocating on stack.')
  with pytest.raises(aot.AotError, match=r'train_step: a kernel needs more on-chip vector '
                                         r'memory \(VMEM\).*attention_impl=xla'):
    aot._compile_report(Jitted(), (), 'train_step', None)  # pylint: disable=protected-access


def test_the_fit_advice_is_never_empty():
  config = tiny_config(remat=True)
  config.mesh.update(fsdp=-1, data=1)
  config.batch_size, config.optimizer.grad_accum_steps = 4, 1
  advice = aot.fit_advice(config, data_parallel=4)   # was 'Try: .'
  assert advice.startswith('Try: more chips') and '--config.mesh.tensor' in advice


def test_hbm_overflow_messages_are_parsed():
  assert tpu.bytes_over_hbm('Exceeded hbm capacity by 1.25G') == int(1.25 * 2 ** 30)
  assert tpu.bytes_over_hbm('the total memory required for HLO temporaries (145.25G) exceeds '
                        'available HBM (15.75G).') == int(129.5 * 2 ** 30)
  assert tpu.bytes_over_hbm('INTERNAL: something else') is None


# ---- The must-show command: tiny, splash, 4-chip v5e, through the command line ----

def run_aot(*flags):
  env = dict(os.environ, ALLOW_MULTIPLE_LIBTPU_LOAD='1')
  return subprocess.run([sys.executable, '-m', 'bert_sym.aot', *flags], cwd=REPO_ROOT,
                        env=env, capture_output=True, text=True, timeout=900)


def test_tiny_splash_compiles_for_v5e_4_from_the_command_line(tmp_path):
  """auto without attention dropout: the Mosaic splash kernel in the train and eval steps
  (with dropout, neither: test_the_eval_step_runs_the_kernel_the_train_step_runs). The
  tiny model at a batch of 8, 2 rows a chip: the TPU compiler's time grows with the batch
  (32: 57 CPU-s, 8: 24 CPU-s), which the kernel, the mesh and the command line do not need."""
  out = tmp_path / 'r.json'
  result = run_aot('--config=configs/tiny.py', '--topology=v5e-4', '--config.batch_size=8',
                   f'--config.data.max_seq_len={SEQ}',
                   '--config.data.max_predictions_per_seq=20',
                   f'--config.model.max_position_embeddings={SEQ}',
                   '--config.model.attention_impl=auto',
                   '--config.model.attention_dropout_rate=0', f'--out={out}')
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(out.read_text())
  assert report['chips'] == 4 and report['kernel'] == 'splash' and report['fits'] is True
  assert report['mesh'] == {'data': 4, 'fsdp': 1, 'tensor': 1}
  for step in ('train_step', 'eval_step'):
    assert report[step]['memory']['total'] > 0
    # The real Mosaic kernel (interpret mode would leave no TPU custom call): forward
    # and backward (dq, dkv) per layer in training.
    mosaic_kernels = report[step]['custom_calls'].get('tpu_custom_call', 0)
    assert mosaic_kernels >= (3 * 2 if step == 'train_step' else 2)
  # Data parallelism: the gradients are summed over the 4 chips.
  assert report['train_step']['collectives'].get('all-reduce', 0) >= 1
  assert report['estimate']['tokens_per_s_per_chip'] > 0
  assert 'ESTIMATE' in result.stdout and 'fits: True' in result.stdout


@pytest.mark.parametrize('variant, num_slices', [
    ('symmetric', 1), ('pairwise_diagonal', 1),
    ('standard_syminit', 2)])   # two v5e-4 slices over DCN: multi-slice, at no extra compile
def test_every_attention_variant_compiles_with_splash(variant, num_slices):
  # pairwise: the command-line test above. standard: standard_syminit's program (they
  # differ only in how W_k is initialised), so one compile covers both. The variants
  # differ in the attention's lines only: a 1024-token vocabulary and a batch of 8 (one row
  # a chip over two slices) compile in a third of the time of 30522 and 32 (8 vs 31 CPU-s).
  config = tiny_config(attention=variant, attention_impl='splash',
                       attention_dropout_rate=0.0, scan_layers=True, vocab_size=1024)
  config.batch_size = 8
  report = aot.preflight(config, 'v5e-4', num_slices, eval_step=False)
  assert report['kernel'] == 'splash' and report['fits']
  assert report['chips'] == 4 * num_slices and report['num_slices'] == num_slices
  assert report['mesh'] == {'data': 4 * num_slices, 'fsdp': 1, 'tensor': 1}
  assert report['train_step']['custom_calls'].get('tpu_custom_call', 0) >= 3
  # The trap the estimate avoids: with scanned layers the compiler counts one layer.
  assert (report['train_step']['compiler_cost']['flops']
          < report['estimate']['model_flops_per_chip_per_step'])


# ---- The paper recipe (xla attention, dropout), unscanned: memory and FLOPs checked ----

@pytest.fixture(scope='module')
def paper_recipe():
  config = tiny_config(attention_impl='xla', attention_dropout_rate=0.1, scan_layers=False)
  assert config.model.attention == 'pairwise'
  executables = {}
  report = aot.preflight(config, 'v5e-4', executables=executables)   # train and eval steps
  return config, report, executables['train_step']


@pytest.mark.xdist_group('aot_paper_recipe')   # one compile, shared
def test_paper_recipe_compiles_with_xla(paper_recipe):
  _, report, _ = paper_recipe
  assert report['kernel'] == 'xla' and report['fits']
  for step in ('train_step', 'eval_step'):
    assert report[step]['custom_calls'].get('tpu_custom_call', 0) == 0, (step, report[step])


def lowered_steps(config) -> tuple[str, str, str]:
  """(the trainer's kernel, the train step's and the eval step's programs as lowered for a
  v5e-4): what the TPU compiler is given, without compiling it."""
  devices = tpu.compile_only_devices(tpu.parse_topology('v5e-4'))
  with kernel_choice.target_backend('tpu'):
    built = aot.build_steps(config, devices)
    return (built.kernel, built.train_step.lower(built.spec.abstract, built.batch).as_text(),
            built.eval_step.lower(built.spec.abstract['params'], built.batch).as_text())


@pytest.mark.xdist_group('aot_paper_recipe')   # one compile, shared
def test_the_eval_step_runs_the_kernel_the_train_step_runs(paper_recipe):
  """auto with attention dropout trains on xla (splash has no dropout), and the trainer
  names xla; the eval step (no dropout) resolved splash: another kernel, compiled apart,
  whose failure would first show at the first eval. auto's two steps are the very programs
  of the paper recipe (xla named), whose compiled train and eval steps (the shared compile
  above) hold no Mosaic kernel: the TPU compiler gives the same program the same result."""
  config = tiny_config(attention_impl='auto', attention_dropout_rate=0.1)
  kernel, train_step, eval_step = lowered_steps(config)
  assert kernel == 'xla'
  for step, text in (('train_step', train_step), ('eval_step', eval_step)):
    assert 'tpu_custom_call' not in text, step
  paper_config, report, _ = paper_recipe
  assert (kernel, train_step, eval_step) == lowered_steps(paper_config)
  for step in ('train_step', 'eval_step'):
    assert 'tpu_custom_call' not in report[step]['custom_calls'], (step, report[step])
  # Without dropout auto runs splash in both steps: the command-line test.


def tpu_bytes(shape, itemsize, layout) -> int:
  """Bytes of an array in a TPU layout: dimensions in major-to-minor order, the minor ones
  padded to the layout's tile (e.g. (8, 128)); a scalar is stored as one element."""
  dims = [shape[i] for i in layout.major_to_minor] or [1]
  tile = layout.tiling[0] if layout.tiling else ()
  for k, size in enumerate(reversed(tile)):
    if k < len(dims):
      dims[-1 - k] = -(-dims[-1 - k] // size) * size
  return math.prod(dims) * itemsize


@pytest.mark.xdist_group('aot_paper_recipe')   # one compile, shared
def test_argument_bytes_are_the_shards_of_the_state_and_batch(paper_recipe):
  """The report's per-chip argument bytes = one chip's shard of every array of the state
  and batch, summed here from the abstract arrays' shardings. The compiler stores each in
  a tiled TPU layout (its `input_formats`), which pads small dimensions; an input the step
  never reads (the dense mlm_targets, when the sparse head reads its own) is dropped."""
  config, report, compiled = paper_recipe
  devices = tpu.compile_only_devices(tpu.parse_topology('v5e-4'))
  with kernel_choice.target_backend('tpu'):
    built = aot.build_steps(config, devices)
  leaves = aot.jax.tree.leaves((built.spec.abstract, built.batch))
  formats = aot.jax.tree.leaves(compiled.input_formats)
  assert len(formats) == len(leaves)
  used = [(x, f.layout) for x, f in zip(leaves, formats) if f.layout is not None]
  assert len(leaves) - len(used) == 1   # mlm_targets
  shards = [(x.sharding.shard_shape(x.shape), x.dtype.itemsize, layout) for x, layout in used]
  # Not trivially the replicated size: the batch is split over the 4 chips.
  assert any(shape != x.shape for (shape, _, _), (x, _) in zip(shards, used))
  reported = report['train_step']['memory']['arguments']
  assert reported == sum(tpu_bytes(*s) for s in shards)
  unpadded = sum(math.prod(shape) * itemsize for shape, itemsize, _ in shards)
  assert unpadded <= reported <= 1.01 * unpadded


@pytest.mark.xdist_group('aot_paper_recipe')   # one compile, shared
def test_model_flop_count_agrees_with_the_unscanned_compile(paper_recipe):
  """The estimate takes FLOPs from model.train_flops_per_token, because the compiler counts
  a scanned layer loop once (see the splash test); unscanned, the compiler's count is the
  independent check. The model's count is matmuls only (the MFU convention); what it
  leaves out (dropout's random bits, softmax, GELU, LayerNorm, AdamW) is about a fifth of
  this 128-wide model's step and a few percent of bert-base's. A lost backward pass
  (x 1/3) or a per-layer term counted once would fall far outside."""
  config, report, _ = paper_recipe
  compiler = report['train_step']['compiler_cost']['flops']
  model = report['estimate']['model_flops_per_chip_per_step']
  assert model == pytest.approx(
      model_lib.train_flops_per_token(config.model, SEQ, 20 / SEQ) * 32 * SEQ / 4)
  assert 1.0 <= compiler / model <= 1.3, (compiler, model)


def test_with_gradient_accumulation_the_memory_term_is_a_lower_bound():
  """The compiler counts the micro-batch loop's body once, like a scanned layer loop, so
  its figures are a fraction of the step's; the estimate said nothing and took its bytes
  as the whole step's (a faster estimate for the same work). A 1024-token vocabulary and 4
  micro-batches of 4 (one row a chip): the loop, not the size, is the point (9 vs 20 CPU-s)."""
  config = tiny_config(attention_impl='xla', attention_dropout_rate=0.0, scan_layers=False,
                       vocab_size=1024)
  config.batch_size, config.optimizer.grad_accum_steps = 16, 4
  report = aot.preflight(config, 'v5e-4', eval_step=False)
  estimate = report['estimate']
  assert estimate['memory_bound_is_lower_bound']
  assert estimate['loops_counted_once'] == ['gradient accumulation']
  assert (report['train_step']['compiler_cost']['flops']
          < 0.5 * estimate['model_flops_per_chip_per_step'])   # the trap, as it stands
  text = aot.summary(report)
  assert 'counts the loop body of gradient accumulation once' in text
  assert 'bytes (a loop body counted once: low)' in text


# ---- Not fitting: exit 1, one line naming the bytes over and the knobs ----

def test_oversized_config_exits_non_zero_with_one_readable_line(tmp_path):
  result = run_aot('--config=configs/tiny.py', '--topology=v5e-4', f'--out={tmp_path}/report.json',
                   '--config.batch_size=16384', '--config.data.max_seq_len=512',
                   '--config.data.max_predictions_per_seq=77',
                   '--config.model.max_position_embeddings=512')
  assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
  assert 'Traceback' not in result.stderr
  errors = [l for l in result.stderr.splitlines() if l.strip()]
  assert len(errors) == 1 and errors[0].startswith('bert_sym.aot: error: does not fit'), errors
  # Over what the TPU compiler lets a program have of a v5e chip's HBM (its message says
  # 'available HBM (15.75G)'), named as such: the figure was against all 16 GiB.
  assert 'GiB over the 15.75 GiB (of 16.00 GiB) that the TPU compiler can have' in errors[0]
  report = json.loads((tmp_path / 'report.json').read_text())
  total = report['train_step'].get('memory', {}).get('total')
  if total is not None:   # the compiler gave a figure: the excess is over 15.75 GiB
    assert report['bytes_over_hbm'] == total - int(15.75 * 2 ** 30)
  for knob in ('mesh.fsdp', 'optimizer.grad_accum_steps', 'model.remat', 'batch_size'):
    assert f'--config.{knob}=' in errors[0]
  assert 'scan_layers' not in errors[0]   # it shortens the compile, not the memory
  assert 'fits: False' in result.stdout


def test_tpu_vm_launcher_stops_before_creating_a_slice_that_would_not_fit(tmp_path):
  """launch/tpu_vm.sh runs the preflight first: gcloud (a stub here) is never called."""
  calls = tmp_path / 'gcloud_calls'
  stub = tmp_path / 'bin' / 'gcloud'
  stub.parent.mkdir()
  stub.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
  stub.chmod(0o755)
  env = dict(os.environ, PATH=f'{stub.parent}:{os.environ["PATH"]}', PYTHON=sys.executable,
             ALLOW_MULTIPLE_LIBTPU_LOAD='1')
  result = subprocess.run(
      ['bash', 'launch/tpu_vm.sh', 'bert-sym', 'us-central1-a', 'v5litepod-4',
       'configs/tiny.py', 'gs://bucket/run', '--config.batch_size=16384',
       '--config.data.max_seq_len=512', '--config.data.max_predictions_per_seq=77',
       '--config.model.max_position_embeddings=512'],
      cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
  assert 'bert_sym.aot: error: does not fit on v5litepod-4' in result.stderr
  assert 'nothing was created' in result.stderr
  assert not calls.exists()


def test_kernels_and_dtype_resolve_for_the_target_not_the_host():
  resolve = lambda: kernel_choice.resolve_implementation(
      'auto', training_dropout=False, return_weights=False, seq_len=SEQ)
  assert aot.jax.default_backend() == 'cpu'
  assert resolve() == 'xla' and model_lib.compute_dtype('auto') == np.float32
  with kernel_choice.target_backend('tpu'):
    assert resolve() == 'splash' and model_lib.compute_dtype('auto') == aot.jax.numpy.bfloat16
    # Named splash: the real kernel, no interpret mode needed on this CPU host.
    assert kernel_choice.resolve_implementation(
        'splash', training_dropout=False, return_weights=False, seq_len=SEQ) == 'splash'
  with kernel_choice.target_backend('gpu'):   # tensor cores: bfloat16 too
    assert model_lib.compute_dtype('auto') == aot.jax.numpy.bfloat16
  assert resolve() == 'xla'


def test_a_compiled_step_over_hbm_says_by_how_much(monkeypatch):
  """The TPU compiler may compile a step whose buffers exceed HBM (it then fails at run
  time): the eval step is not tried, and the train step's overage is the figure. It was
  None ('the compiler gave no figure') because the untried eval step counted as infinite."""
  config = tiny_config(attention_impl='xla', attention_dropout_rate=0.0, scan_layers=True)
  hbm = 16 * 2**30   # a v5e chip
  tried = []

  def compile_report(jitted, args, name, executables):
    del jitted, args, executables
    tried.append(name)
    return {'memory': {'total': hbm + 3 * 2**30},
            'compiler_cost': {'flops': 1.0, 'bytes_accessed': 1.0}}, None
  monkeypatch.setattr(aot, '_compile_report', compile_report)
  report = aot.preflight(config, 'v5e-4')
  assert tried == ['train_step'] and report['hbm_bytes_per_chip'] == hbm
  # Over the 15.75 GiB the compiler gives a program, as its own messages count.
  assert not report['fits'] and report['bytes_over_hbm'] == int(3.25 * 2**30)


def test_the_command_line_errors_are_one_line_and_help_exits_0(tmp_path):
  """bert_sym.aot bypassed the CLI's error handling: --help exited 1 and a bad config key
  (launch/tpu_vm.sh passes the user's own) came out as a traceback."""
  assert run_aot('--help').returncode == 0
  for flags, message in (
      (('--config=configs/tiny.py', '--topology=v5e-4', '--config.nonexist=1'),
       "unknown config key 'nonexist'"),
      (('--config=configs/nope.py', '--topology=v5e-4'), 'cannot be loaded'),
      (('--config=configs/tiny.py',), '--config and --topology are required'),
      # Before compiling (minutes at scale), not after: it was "[Errno 21] Is a directory".
      (('--config=configs/tiny.py', '--topology=v5e-4', f'--out={tmp_path}'),
       f'--out={tmp_path} is a directory; give the report a file name'),
      (('--config=configs/tiny.py', '--topology=v5e-4', f'--out={tmp_path}/a_file/r.json'),
       f'Cannot write to the directory of --out={tmp_path}/a_file/r.json')):
    (tmp_path / 'a_file').write_text('')
    result = run_aot(*flags)
    assert result.returncode == 1 and 'Traceback' not in result.stderr, result.stderr[-2000:]
    [line] = result.stderr.strip().splitlines()
    assert line.startswith('bert_sym.aot: error: ') and message in line, line


def test_memory_counts_donated_state_once():
  """Donated buffers are both arguments and outputs (aliases): a total that added them
  instead of subtracting made the preflight say 'does not fit' and tpu_vm.sh refuse."""
  stats = types.SimpleNamespace(argument_size_in_bytes=10, output_size_in_bytes=8,
                                alias_size_in_bytes=6, temp_size_in_bytes=3,
                                generated_code_size_in_bytes=1)
  compiled = types.SimpleNamespace(memory_analysis=lambda: stats)
  assert aot.memory_report(compiled)['total'] == 10 + 8 - 6 + 3 + 1


def _known_peak_config():
  config = tiny.get_config()
  config.peak_flops_per_device = 1e12
  return config


def test_the_estimate_is_the_slower_roofline_bound_over_every_slices_chips():
  config = _known_peak_config()
  slice_ = tpu.parse_topology('v5e-4')
  one = aot.estimate(config, slice_, 1, None, step_bytes=1.0, loops=[])
  two = aot.estimate(config, slice_, 2, None, step_bytes=1.0, loops=[])
  assert two['tokens_per_chip_per_step'] == one['tokens_per_chip_per_step'] / 2
  assert one['bound'] == 'compute' and one['step_s'] == one['compute_bound_s']
  slow = aot.estimate(config, slice_, 1, None, step_bytes=1e15, loops=[])
  assert slow['bound'] == 'memory'
  assert slow['step_s'] == max(slow['compute_bound_s'], slow['memory_bound_s'])


def test_only_accumulation_or_scanned_layers_count_a_loop_body_once():
  assert aot.loops_counted_once({'grad_accum_steps': 1, 'scan_layers': False}) == []
  assert aot.loops_counted_once({'grad_accum_steps': 2, 'scan_layers': False})


def test_halving_the_batch_down_to_one_split_per_device_is_offered():
  config = _known_peak_config()
  config.batch_size, config.optimizer.grad_accum_steps = 16, 2
  assert '--config.batch_size=8 ' in aot.fit_advice(config, data_parallel=4)


def test_a_compiler_out_of_memory_without_a_figure_is_a_report_not_a_crash(monkeypatch):
  config = tiny.get_config()
  config.data.max_seq_len = config.model.max_position_embeddings = 128
  config.data.max_predictions_per_seq = 20
  config.model.attention_impl, config.model.attention_dropout_rate = 'xla', 0.0
  monkeypatch.setattr(aot, '_compile_report', lambda *a: (
      {'compiler_out_of_memory': 'RESOURCE_EXHAUSTED: no figure'}, None))
  report = aot.preflight(config, 'v5e-4')
  assert report['fits'] is False and report['bytes_over_hbm'] is None


def test_async_collectives_are_counted_once():
  hlo = (' %a = f32[8] all-reduce-start(%x)\n %b = f32[8] all-reduce-done(%a)\n'
         ' %c = f32[8] all-gather(%y)\n')
  assert aot.count_collectives(hlo) == {'all-reduce': 1, 'all-gather': 1}


def test_a_grid_with_a_zero_side_is_a_slice_error():
  with pytest.raises(tpu.SliceError, match='dimensions'):
    tpu.parse_topology('v5e:0x4')


def test_a_gpu_host_with_libtpu_installed_is_not_sent_to_the_cpu(monkeypatch):
  """libtpu (for this file's compiles) on a GPU machine: no_tpu_here() made the trainer
  force jax_platforms=cpu, and conftest too, so the GPU tests would skip, not fail."""
  from bert_sym import gpu_flags  # pylint: disable=g-import-not-at-top
  pytest.importorskip('libtpu')   # (without it no_tpu_here() is False whatever the GPU)
  monkeypatch.delenv('JAX_PLATFORMS', raising=False)
  monkeypatch.delenv('TPU_ACCELERATOR_TYPE', raising=False)
  monkeypatch.setattr(gpu_flags, 'cuda_plugin', lambda: 'jax_cuda12_plugin')
  assert tpu.no_tpu_here() is False


def test_the_training_time_is_said_in_a_unit_that_shows_it():
  """A tiny config's 300 steps read '0.00 hours'."""
  duration = aot._duration  # pylint: disable=protected-access
  assert [duration(h) for h in (100.0, 2.5, 0.5, 300 * 0.004 / 3600)] == [
      '4.2 days', '2.50 hours', '30.0 minutes', '1.2 s']

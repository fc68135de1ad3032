r"""Pre-trains BertForMaskedLM (standard / symmetric / pairwise attention) with masked LM.

  python -m bert_sym.train --config=configs/tiny.py --workdir=/tmp/bert_sym_tiny
  python -m bert_sym.train --config=configs/sym_base.py --dry_run
  python -m bert_sym.train --config=configs/sym_base.py --workdir=gs://BUCKET/sym_base \
      --config.data.shards_dir=gs://BUCKET/c4_512 --config.mesh.fsdp=4   # README: Data

Any config value can be overridden with --config.a.b=value. The resolved config is written to
{workdir}/config.json; the same command resumes from {workdir}/checkpoints' latest step.

Reading order follows the data (big_vision style): logging -> mesh -> input -> model &
optimizer -> shard & init -> update step -> checkpoint restore -> evals -> train loop.
`build_mlm_step` is the step that bert_sym.aot, the benchmark and the parity test build too.
"""

import contextlib
import dataclasses
import functools
import os
import sys
from typing import Any, Callable

from bert_sym import early_signals

if __name__ == '__main__':   # before JAX and TensorFlow import (seconds): exit 42, not 143
  early_signals.take_them_until_started()

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app
from absl import flags
from absl import logging
from etils import epath
import jax
import ml_collections
from ml_collections import config_flags
import numpy as np

from bert_sym import checkpoint
from bert_sym import cli
from bert_sym import config_check
from bert_sym import distributed
from bert_sym import files
from bert_sym import gpu_flags
from bert_sym import loop
from bert_sym import metrics_writer
from bert_sym import model as model_lib
from bert_sym import objectives
from bert_sym import optim
from bert_sym import pretrain_loop
from bert_sym import sharding
from bert_sym import steps

_CONFIG = config_flags.DEFINE_config_file(
    'config', None,
    'Experiment config: a Python file with get_config() (configs/*.py). Override any '
    'value with --config.<key>=<value>, e.g. --config.model.attention=standard.',
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    'workdir', None,
    'Output directory (local or gs://): config.json, checkpoints/, tensorboard/, '
    'metrics.jsonl. An existing workdir is resumed from its latest checkpoint.')
_DRY_RUN = flags.DEFINE_bool(
    'dry_run', False,
    'Print parameter counts per module, FLOPs per token and the variant, then exit. '
    'Nothing is allocated and no data is read; --workdir is not needed.')
_START_OVER = flags.DEFINE_bool(
    'start_over', False,
    'Train from step 0 when --workdir holds checkpoints none of which restores (all '
    'damaged; see damaged_checkpoints/). Without it such a workdir stops the trainer '
    'instead of silently throwing its progress away.')
_DISTRIBUTED_FLAGS = distributed.define_flags()
flags.adopt_module_key_flags(distributed)   # --help lists them (absl: this module's only)


# Exit codes (bert_sym.preemption): 0 finished; 1 input problem or non-finite stop; saved
# and stopped: 42 preempted (rerun to resume, as launch/slurm_gpu.sbatch does), 130 Ctrl-C.
PREEMPTED_EXIT_CODE, INTERRUPTED_EXIT_CODE = loop.PREEMPTED_EXIT_CODE, loop.INTERRUPTED_EXIT_CODE
Preempted = loop.Preempted


class RunError(Exception):
  """A problem with the run's inputs (config, workdir, checkpoint): reported, no traceback."""


@contextlib.contextmanager
def _user_errors(what: str):
  """Turns the readable ValueErrors raised by our own checks into a RunError."""
  try:
    yield
  except (ValueError, FileNotFoundError, PermissionError) as e:
    raise RunError(f'{what}: {e}') from e


# ---- The MLM update step ----

def make_mlm_train_step(config, model, tx, schedule, mesh, batch_sharding):
  """The update step (not yet jitted): (state, global batch) -> (new state, metrics).

  build_mlm_step jits it for the trainer, bert_sym.aot, the benchmark and the tests, so
  each sees exactly what training runs (forward, backward, clipping, AdamW).
  """
  return steps.make_train_step(
      objectives.mlm_loss_fn(model, sparse=bool(config.model.sparse_mlm),
                             num_predictions=config.data.max_predictions_per_seq),
      tx, schedule, weight_fn=objectives.mlm_weight,
      accum=config.optimizer.grad_accum_steps, mesh=mesh, batch_sharding=batch_sharding,
      prng_impl=config.get('prng_impl', 'threefry'))


@dataclasses.dataclass
class MlmStep:
  """What pre-training runs on one mesh. The trainer trains it, bert_sym.aot compiles it
  for a TPU slice, benchmarks/accelerator.py times it, tests/test_step_parity.py checks it
  against PyTorch: one definition, so that each looks at exactly what the trainer runs."""
  model: model_lib.BertForMaskedLM
  rules: Any
  batch_sharding: jax.sharding.NamedSharding
  spec: steps.StateSpec   # the state's shapes and shardings; spec.init(keys) creates it
  update: Callable        # (state, global batch) -> (state, metrics), not jitted
  train_step: Callable    # `update` jitted with the state's shardings, the state donated
  eval_step: Callable     # jitted (params, global batch) -> [loss sum, correct, weight]


def checked_mesh(config, devices=None) -> jax.sharding.Mesh:
  """config.mesh over `devices` (default: every device), the batch checked to split."""
  mesh = sharding.make_mesh(config.mesh, devices)
  rules = sharding.logical_rules(config)
  sharding.check_batch_size(config.batch_size, mesh, rules)
  sharding.check_batch_size(config.batch_size // config.optimizer.grad_accum_steps, mesh,
                            rules, 'batch_size / optimizer.grad_accum_steps')
  return mesh


def build_mlm_step(config, mesh) -> MlmStep:
  """Model and optimizer, the state's shapes (nothing allocated; the state is created
  already sharded), and the steps: one jit each, micro-batches scanned for accumulation."""
  rules = sharding.logical_rules(config)
  batch_sharding = sharding.batch_sharding(mesh, rules)
  model = model_lib.BertForMaskedLM(config.model)
  tx, schedule = optim.make_optimizer(config.optimizer, config.total_steps)
  spec = steps.create_state(
      lambda key: model.init(key, *model_lib.dummy_inputs(1, config.data.max_seq_len))['params'],
      tx, mesh, rules, prng_impl=config.get('prng_impl', 'threefry'))
  replicated = sharding.replicated(mesh)
  update = make_mlm_train_step(config, model, tx, schedule, mesh, batch_sharding)
  train_step = steps.jit_train_step(update, spec.shardings, batch_sharding, replicated, rules)
  eval_step = steps.make_eval_step(
      functools.partial(objectives.mlm_sums, model, sparse=bool(config.model.sparse_mlm),
                        num_predictions=config.data.max_predictions_per_seq),
      spec.param_shardings, batch_sharding, replicated, rules)
  return MlmStep(model, rules, batch_sharding, spec, update, train_step, eval_step)


def eval_batch_count(num_blocks: int | None, config, console=print) -> int:
  """config.eval_steps, or fewer so that an eval reads each validation block at most once
  (the validation iterator wraps around): a warning says so."""
  whole = config.eval_steps if num_blocks is None else num_blocks // config.batch_size
  if whole >= config.eval_steps:
    return config.eval_steps
  console(f'WARNING: eval reads {max(whole, 1)} batches, not config.eval_steps='
          f'{config.eval_steps}: the validation split has {num_blocks} blocks, '
          f'{whole} whole batches of {config.batch_size}'
          + (' (fewer than one batch: some blocks count twice)' if not whole else '') + '.')
  return max(whole, 1)


# ---- The trainer: one screen that calls a named piece per section ----

def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, make_iterator=None,
                       *, start_over: bool = False):
  """Trains to config.total_steps (resuming if possible); returns the final eval metrics.

  Raises `Preempted` (after saving) when stopped early by SIGTERM / preemption. With
  `start_over`, a workdir whose checkpoints are all damaged starts again from step 0.
  Signal handlers and hooks are as before when this returns or raises."""
  with loop.PreemptionFlag(starting=True) as preemption:   # SIGTERM in start-up was 143
    config = checkpoint.inputs_checked_on_every_host(   # every input, before any side effect
        lambda: _check_inputs(config, make_iterator), 'run')
    preemption.stop_if_raised()   # (which launchers do not requeue): exit 42 now, untrained
    loop.enable_compilation_cache(config.get('compilation_cache_dir', ''),
                                  config.get('compilation_cache_max_gb', 0.0))
    with checkpoint.checked_on_every_host('run'):   # a workdir one host cannot write
      workdir = _prepare_workdir(workdir)
    with checkpoint.workdir_lock(workdir):
      run = _open_run(workdir)                   # logging: console line, metrics writer
      try:
        mesh = _build_mesh(config, run)
        data = checkpoint.inputs_read_alike_on_every_host(   # one corpus on every host
            lambda: _build_input(config, mesh, make_iterator, run))
        mlm = build_mlm_step(config, mesh)     # model, optimizer, state shapes, steps
        manager, latest, state = _restore_or_init(config, workdir, mlm.spec, data, run,
                                                  start_over)
        evaluate = _build_evaluator(config, mlm.eval_step, data, run)
        step = pretrain_loop.run_to_total_steps(config, state, latest, mlm.train_step, data,
                                                evaluate, manager, preemption, run)
      finally:
        run.writer.close()
  run.console(pretrain_loop.closing_summary(workdir, step, run))
  return run.eval_metrics


def _check_inputs(config, make_iterator):
  """Every input checked before the workdir exists (config_check.preflight: values, backend,
  mesh, data), so a bad one leaves nothing behind; returns the config with absolute paths."""
  config = config_check.preflight(config, data=make_iterator is None)
  skips = config.get('max_consecutive_nonfinite', 10)
  if not isinstance(skips, int) or isinstance(skips, bool) or skips < 1:
    raise RunError(f'config.max_consecutive_nonfinite={skips!r} must be an integer >= 1 '
                   '(the skipped non-finite steps in a row after which the run stops).')
  return config


def _prepare_workdir(workdir: str) -> epath.Path:
  # The shell leaves `--workdir=~/x` as typed: unexpanded, the run went to ./~/x.
  workdir = workdir if '://' in str(workdir) else os.path.expanduser(workdir)
  # Before anything is written (a blocked checkpoints/ failed at the first save, hours in).
  if problem := checkpoint.workdir_problem(workdir):
    raise RunError(problem)
  try:
    return files.check_writable(workdir, f'--workdir={workdir}')
  except ValueError as e:
    raise RunError(str(e)) from e


@dataclasses.dataclass
class _Run:
  """What every section reports to: the console (process 0 only) and the metrics."""
  workdir: epath.Path
  console: Callable[..., None]
  writer: metrics_writer.MetricWriter
  eval_metrics: dict = dataclasses.field(default_factory=dict)
  last_saved: int | None = None
  saved: dict | None = None   # the restored step's record: {'meter', 'lineage'} (restore)
  keep_good: checkpoint.KeepNewestGood = dataclasses.field(   # the loop says which are good
      default_factory=checkpoint.KeepNewestGood)


def _open_run(workdir) -> _Run:
  is_chief = jax.process_index() == 0
  return _Run(workdir, print if is_chief else (lambda *a, **k: None),
              metrics_writer.MetricWriter(workdir, enabled=is_chief))


def _build_mesh(config, run: _Run):
  with _user_errors('Mesh'):
    mesh = checked_mesh(config)
  run.console(f'Mesh {dict(mesh.shape)} over {jax.device_count()} {jax.devices()[0].device_kind} '
              f'device(s), {jax.process_count()} process(es); attention={config.model.attention}, '
              f'kernel {config_check.training_kernel(config)}')
  return mesh


@dataclasses.dataclass
class _Input:
  train_iter: Any
  eval_iter: Any
  eval_start: Any          # every eval reads the same first eval_batches batches
  eval_batches: int        # config.eval_steps, or fewer: each validation block at most once
  to_global: Callable      # host numpy batch -> global arrays split over (data, fsdp)


def _default_iterator(config):
  from bert_sym.input import iterator  # pylint: disable=g-import-not-at-top
  make_iterator = iterator.make_mlm_iterator
  if config.data.source == 'seqio':   # read through the registered seqio task
    from bert_sym.input import seqio_tasks  # pylint: disable=g-import-not-at-top
    make_iterator = functools.partial(make_iterator, documents=seqio_tasks.task_documents)
  return make_iterator   # the data's vocabulary was checked against the model's in preflight


def _build_input(config, mesh, make_iterator, run: _Run) -> _Input:
  """Per-process numpy batches (this process's rows of each global batch) -> global arrays."""
  rules = sharding.logical_rules(config)
  with _user_errors('Input pipeline'):
    from bert_sym.input import iterator  # pylint: disable=g-import-not-at-top
    make_iterator = make_iterator or _default_iterator(config)
    kwargs = dict(batch_size=sharding.check_batch_size(config.batch_size, mesh, rules),
                  seed=config.seed, process_index=jax.process_index(),
                  process_count=jax.process_count())
    train_iter = make_iterator(config.data, split='train', **kwargs)
    eval_iter = config.eval_steps and make_iterator(config.data, split='validation', **kwargs)
    for line in iterator.describe_corpus(train_iter, config):   # size, epochs, warning
      run.console(line)
  host_to_global = functools.partial(sharding.host_batch_to_global, mesh=mesh,
                                     global_batch_size=config.batch_size, rules=rules)
  to_global = host_to_global
  if config.model.sparse_mlm:   # the step's targets found on the host, not the device
    to_global = lambda batch: host_to_global(objectives.host_mlm_positions(
        batch, config.data.max_predictions_per_seq))
  if not config.eval_steps:   # no eval: an export without a validation split trains too
    return _Input(train_iter, None, None, 0, to_global)
  eval_batches = eval_batch_count(getattr(eval_iter, 'num_blocks', None), config, run.console)
  return _Input(train_iter, eval_iter, eval_iter.get_state(), eval_batches, to_global)


def _restore_or_init(config, workdir, spec, data: _Input, run: _Run, start_over: bool):
  """The newest step that restores (checkpoint.restore_latest's rules), else a new state."""
  init_key, dropout_base_key = jax.random.split(jax.random.key(config.seed))
  dropout_base_key = steps.dropout_key(dropout_base_key, config.get('prng_impl', 'threefry'))
  with _user_errors(f'Checkpoint in {checkpoint.checkpoint_dir(workdir)}'):
    manager, latest, state, data_state, run.saved = checkpoint.restore_latest(
        workdir, config.checkpoint, spec.abstract, log=run.console, config=config,
        start_over=start_over, keep_good=run.keep_good)
  if latest is not None:
    with _user_errors('Resuming'):
      checkpoint.check_same_prng_impl(workdir, config)
    with _user_errors('Resuming the input pipeline'):   # the changed keys as flags: an md5 is none
      data.train_iter.set_state(data_state, fix=checkpoint.data_config_hint(workdir, config))
    run.console(f'Resumed from step {latest} ({checkpoint.checkpoint_dir(workdir)})')
    run.writer.drop_rows_after(latest)   # rows after it belong to a timeline redone now
  else:
    state = spec.init(init_key, dropout_base_key)
    run.console(f'Initialised {model_lib.count_params(spec.abstract_params):,} parameters '
                f'(fresh run in {workdir})')
    run.writer.set_aside_rows()   # an earlier attempt's rows are kept, beside the new ones
  run.last_saved = latest
  if (latest or 0) < config.total_steps or not (workdir / checkpoint.CONFIG_FILE).exists():
    with _user_errors('Writing the config'):
      _write_config(workdir, config)
  return manager, latest, state


def _write_config(workdir: epath.Path, config) -> None:
  """config.json, once the workdir holds a compatible run (a finished one's, if lost)."""
  if jax.process_index() != 0:
    return
  old = workdir / checkpoint.CONFIG_FILE
  if old.exists() and (changed := checkpoint.config_differences(checkpoint.read_config(workdir),
                                                                 config)):
    logging.warning('Config differs from the previous %s in: %s', old, ', '.join(changed))
  checkpoint.write_config(workdir, config)


def _build_evaluator(config, eval_step, data: _Input, run: _Run):
  """evaluate(state, step, write=True): MLM loss and accuracy on the first eval_steps
  validation batches, or None when config.eval_steps == 0 (no eval at all)."""
  if not config.eval_steps:
    return None

  def evaluate(state, step, write=True):
    data.eval_iter.set_state(data.eval_start)
    totals = np.zeros(3)
    for _ in range(data.eval_batches):
      try:
        batch = next(data.eval_iter)
      except StopIteration:
        break
      totals += np.asarray(jax.device_get(eval_step(state['params'], data.to_global(batch))))
    weight = max(totals[2], 1.0)
    run.eval_metrics = {'eval/loss': totals[0] / weight,
                        'eval/mlm_accuracy': totals[1] / weight}
    if write:
      run.writer.write_scalars(step, run.eval_metrics)
    run.console(f'eval step {step}: loss {run.eval_metrics["eval/loss"]:.4f} | '
                f'acc {run.eval_metrics["eval/mlm_accuracy"]:.3f}')
  return evaluate


def main(argv, make_iterator=None):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  config = _CONFIG.value
  if config is None:
    raise app.UsageError('--config is required, e.g. --config=configs/tiny.py')
  try:
    # Before anything is written or compiled: a bad value costs a second, not a run.
    config_check.check(config)
  except config_check.ConfigError as e:
    print(f'bert_sym.train: error: {e}', file=sys.stderr, flush=True)
    sys.exit(1)
  if _DRY_RUN.value:
    metrics_writer.quiet_logs(flags.FLAGS['verbosity'].present, import_tf=False)
    print(model_lib.summary(config))
    return
  if not _WORKDIR.value:
    raise app.UsageError('--workdir is required (or pass --dry_run).')
  gpu_flags.set_xla_gpu_flags(bool(config.get('xla_gpu_flags', True)))   # before the backend
  # TF (5 s to import) only for the seqio pipeline, not for shards or an iterator passed in.
  metrics_writer.quiet_logs(flags.FLAGS['verbosity'].present,
                            import_tf=config.data.source == 'seqio' and make_iterator is None)
  try:
    distributed.initialize(_DISTRIBUTED_FLAGS)
    train_and_evaluate(config, _WORKDIR.value, make_iterator=make_iterator,
                       start_over=_START_OVER.value)
  except (RunError, loop.NonFiniteError, checkpoint.WorkdirBusy,
          checkpoint.CheckpointSaveError) as e:   # said in one line, no traceback
    print(f'bert_sym.train: error: {e}', file=sys.stderr, flush=True)
    sys.exit(1)
  except KeyboardInterrupt as e:   # one process: a second Ctrl-C (the first saves) or one
    # before/after the loop's handler; several: no handler there: nothing was saved.
    several = cli.one_of_several_processes()
    what = ('Ctrl-C on a multi-process run (it saves on SIGTERM only: send SIGTERM to any '
            'process to save at one step on all)' if several else (e.args or ['Ctrl-C'])[0])
    print(f'\nbert_sym.train: stopped by {what} without saving; rerun the same command to '
          'resume from the last checkpoint.', file=sys.stderr, flush=True)
    if not several:   # at once: a normal exit finalised the abandoned async save's asyncio
      sys.stdout.flush()   # loop, which printed a traceback (several: cli leaves together)
      os._exit(INTERRUPTED_EXIT_CODE)  # pylint: disable=protected-access
    sys.exit(INTERRUPTED_EXIT_CODE)
  except Preempted as e:
    loop.exit_on(e)


parse_flags = config_check.parse_flags   # absl parsing; --help lists the config keys


if __name__ == '__main__':
  early_signals.hand_ctrl_c_back()   # the imports are done: KeyboardInterrupt from here on
  cli.run(main, prog='bert_sym.train', flags_parser=parse_flags)

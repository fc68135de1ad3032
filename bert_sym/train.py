r"""Pre-trains BertForMaskedLM (standard / symmetric / pairwise attention) with masked LM.

  python -m bert_sym.train --config=configs/tiny.py --workdir=/tmp/bert_sym_tiny
  python -m bert_sym.train --config=configs/sym_base.py --dry_run
  python -m bert_sym.train --config=configs/sym_base.py --workdir=gs://BUCKET/sym_base \
      --config.batch_size=512 --config.mesh.fsdp=4

Any config value can be overridden with --config.a.b=value. The resolved config is written
to {workdir}/config.json; rerunning the same command resumes from the latest checkpoint in
{workdir}/checkpoints (step, params, optimizer state, RNG, input position).

Reading order follows the data (big_vision style): logging -> mesh -> input -> model &
optimizer -> shard & init -> update step -> checkpoint restore -> evals -> train loop.
"""

import contextlib
import functools
import os
import re
import sys

from absl import app
from absl import flags
from absl import logging
from etils import epath
import jax
import ml_collections
from ml_collections import config_flags
import numpy as np

from bert_sym import checkpoint
from bert_sym import config_check
from bert_sym import distributed
from bert_sym import loop
from bert_sym import metrics_writer
from bert_sym import model as model_lib
from bert_sym import objectives
from bert_sym import optim
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
_DISTRIBUTED_FLAGS = distributed.define_flags()


# Exit codes of `python -m bert_sym.train` (0 finished; 1 input problem or non-finite stop;
# 42 preempted after saving: rerun to resume; 130 Ctrl-C after saving), from bert_sym.loop.
# launch/slurm_gpu.sbatch requeues on PREEMPTED_EXIT_CODE.
PREEMPTED_EXIT_CODE = loop.PREEMPTED_EXIT_CODE
INTERRUPTED_EXIT_CODE = loop.INTERRUPTED_EXIT_CODE
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


# ---- Dry run: the model's size and cost from shapes only ----

def model_summary(config: ml_collections.ConfigDict) -> str:
  cfg = config.model
  mlm_params = model_lib.abstract_params(model_lib.BertForMaskedLM(cfg))
  per_module = model_lib.params_per_module(mlm_params, depth=2)
  seq_len = config.data.max_seq_len
  flops = model_lib.train_flops_per_token(cfg, seq_len, model_lib.mlm_predicted_fraction(config))
  width = max(len(k) for k in per_module)
  lines = [
      f'BertForMaskedLM, attention variant: {cfg.attention}',
      f'  layers {cfg.num_layers}, hidden {cfg.hidden_size}, heads {cfg.num_heads}, '
      f'mlp {cfg.mlp_dim}, vocab {cfg.vocab_size}, max positions '
      f'{cfg.max_position_embeddings}',
      'Parameters per module (MLM model):']
  natural = lambda name: [int(t) if t.isdigit() else t for t in re.split(r'(\d+)', name)]
  lines += [f'  {name:<{width}}  {per_module[name]:>13,}'
            for name in sorted(per_module, key=natural)]
  lines += [
      f'Total, encoder + pooler (paper / HF BertModel convention): '
      f'{model_lib.encoder_plus_pooler_params(cfg):,}',
      f'Total, MLM model (encoder + MLM head, decoder tied to embeddings): '
      f'{model_lib.count_params(mlm_params):,}',
      f'Training FLOPs per token: {flops:,.0f} (seq_len {seq_len}, '
      f'{"sparse" if cfg.sparse_mlm else "dense"} MLM head, predicted fraction '
      f'{model_lib.mlm_predicted_fraction(config):.4f})',
      f'  = {flops * config.batch_size * seq_len:.3e} FLOPs per step at batch '
      f'{config.batch_size}',
      f'  formula: {model_lib.FLOPS_FORMULA}',
  ]
  return '\n'.join(lines)


# ---- The MLM update step ----

def make_train_step(config, model, tx, schedule, mesh, batch_sharding):
  """The update step (not yet jitted): (state, global batch) -> (new state, metrics).

  One definition for the trainer and benchmarks/accelerator.py, so that the benchmark
  times exactly what training runs (forward, backward, clipping, AdamW).
  """
  return steps.make_train_step(
      objectives.mlm_loss_fn(model, sparse=bool(config.model.sparse_mlm),
                             num_predictions=config.data.max_predictions_per_seq),
      tx, schedule, weight_fn=objectives.mlm_weight,
      accum=config.optimizer.grad_accum_steps, mesh=mesh, batch_sharding=batch_sharding)


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


# ---- The trainer ----

def _prepare_workdir(workdir: str) -> epath.Path:
  path = epath.Path(workdir)
  try:
    path.mkdir(parents=True, exist_ok=True)
    probe = path / f'.write-probe-{jax.process_index()}-{os.getpid()}'
    probe.write_text('')
    probe.unlink()
  except OSError as e:
    raise RunError(f'Cannot write to --workdir={workdir}: {e}. Pass a writable '
                   f'directory (local path or gs://bucket/path).') from e
  return path


def _write_config(workdir: epath.Path, config) -> None:
  """config.json, written once the workdir is known to hold a compatible run."""
  if jax.process_index() != 0:
    return
  old = workdir / checkpoint.CONFIG_FILE
  if old.exists():
    changed = checkpoint.config_differences(checkpoint.read_config(workdir), config)
    if changed:
      logging.warning('Config differs from the previous %s in: %s', old, ', '.join(changed))
  checkpoint.write_config(workdir, config)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, make_iterator=None):
  """Trains to config.total_steps (resuming if possible); returns the final eval metrics.

  Raises `Preempted` (after saving) when stopped early by SIGTERM / preemption.
  """
  # Every input checked before the workdir exists: a bad one leaves nothing behind.
  config = config_check.preflight(config, data=make_iterator is None)
  cache_dir = loop.enable_compilation_cache(config.get('compilation_cache_dir', ''))

  # ---- Logging ----
  is_chief = jax.process_index() == 0
  workdir = _prepare_workdir(workdir)
  writer = metrics_writer.MetricWriter(workdir, enabled=is_chief)
  preemption = loop.PreemptionFlag()
  console = print if is_chief else (lambda *a, **k: None)

  # ---- Mesh ----
  with _user_errors('Mesh'):
    mesh = sharding.make_mesh(config.mesh)
    rules = sharding.logical_rules(config)
    per_process_batch = sharding.check_batch_size(config.batch_size, mesh, rules)
    sharding.check_batch_size(config.batch_size // config.optimizer.grad_accum_steps, mesh,
                              rules, 'batch_size / optimizer.grad_accum_steps')
  console(f'Mesh {dict(mesh.shape)} over {jax.device_count()} {jax.devices()[0].device_kind} '
          f'device(s), {jax.process_count()} process(es); attention={config.model.attention}')
  replicated = sharding.replicated(mesh)
  batch_sharding = sharding.batch_sharding(mesh, rules)
  if cache_dir:
    logging.info('JAX persistent compilation cache: %s', cache_dir)

  # ---- Input pipeline: per-process numpy batches -> global arrays split over (data, fsdp) ----
  with _user_errors('Input pipeline'):
    from bert_sym.input import iterator  # pylint: disable=g-import-not-at-top
    if make_iterator is None:
      make_iterator = iterator.make_mlm_iterator
      if config.data.source == 'seqio':   # read through the registered seqio task
        from bert_sym.input import seqio_tasks  # pylint: disable=g-import-not-at-top
        make_iterator = functools.partial(make_iterator, documents=seqio_tasks.task_documents)
      data_vocab = iterator.vocab_size(config.data)
      if data_vocab > config.model.vocab_size:
        raise ValueError(f'the data vocabulary has {data_vocab} tokens but '
                         f'config.model.vocab_size={config.model.vocab_size}.')
    # The iterator yields this process's rows of each global batch.
    iterator_kwargs = dict(batch_size=per_process_batch, seed=config.seed,
                           process_index=jax.process_index(),
                           process_count=jax.process_count())
    train_iter = make_iterator(config.data, split='train', **iterator_kwargs)
    # Every eval reads the same first eval_steps validation batches (rewound each time).
    eval_iter = make_iterator(config.data, split='validation', **iterator_kwargs)
    eval_start = eval_iter.get_state()
    eval_batches = eval_batch_count(getattr(eval_iter, 'num_blocks', None), config, console)
    for line in iterator.describe_corpus(train_iter, config):   # size, epochs, warning
      console(line)
  host_to_global = functools.partial(sharding.host_batch_to_global, mesh=mesh,
                                     global_batch_size=config.batch_size, rules=rules)
  sparse = bool(config.model.sparse_mlm)
  num_predictions = config.data.max_predictions_per_seq
  if sparse:   # the step's targets found on the host, not the device
    to_global = lambda batch: host_to_global(
        objectives.host_mlm_positions(batch, num_predictions))
  else:
    to_global = host_to_global
  seq_len = config.data.max_seq_len

  # ---- Model & optimizer ----
  model = model_lib.BertForMaskedLM(config.model)
  tx, schedule = optim.make_optimizer(config.optimizer, config.total_steps)

  # ---- Shard & init: shapes first (nothing allocated), then create state already sharded ----
  init_key, dropout_base_key = jax.random.split(jax.random.key(config.seed))
  spec = steps.create_state(
      lambda key: model.init(key, *model_lib.dummy_inputs(1, seq_len))['params'],
      tx, mesh, rules)

  # ---- Update step: one jit, state donated, micro-batches scanned for gradient accumulation ----
  train_step = steps.jit_train_step(
      make_train_step(config, model, tx, schedule, mesh, batch_sharding),
      spec.shardings, batch_sharding, replicated, rules)

  # ---- Checkpoint restore (automatic: the latest finished step in the workdir) ----
  with _user_errors(f'Checkpoint in {checkpoint.checkpoint_dir(workdir)}'):
    manager, latest, state, data_state = checkpoint.restore_latest(
        workdir, config.checkpoint, spec.abstract, spec.abstract_params, log=console)
  if latest is not None:
    with _user_errors('Resuming the input pipeline'):
      train_iter.set_state(data_state)
    console(f'Resumed from step {latest} ({checkpoint.checkpoint_dir(workdir)})')
  else:
    state = spec.init(init_key, dropout_base_key)
    console(f'Initialised {model_lib.count_params(spec.abstract_params):,} parameters '
            f'(fresh run in {workdir})')
  # Rows logged after the restored step belong to a timeline that is being redone.
  writer.drop_rows_after(latest if latest is not None else -1)
  _write_config(workdir, config)

  # ---- Evals: MLM loss and accuracy on a fixed slice of the validation split ----
  eval_step = steps.make_eval_step(
      functools.partial(objectives.mlm_sums, model, sparse=sparse,
                        num_predictions=num_predictions),
      spec.param_shardings, batch_sharding, replicated, rules)
  eval_metrics = {}

  def run_eval(state, step):
    nonlocal eval_metrics
    eval_iter.set_state(eval_start)
    totals = np.zeros(3)
    for _ in range(eval_batches):
      try:
        batch = next(eval_iter)
      except StopIteration:
        break
      totals += np.asarray(jax.device_get(eval_step(state['params'], to_global(batch))))
    weight = max(totals[2], 1.0)
    eval_metrics = {'eval/loss': totals[0] / weight, 'eval/mlm_accuracy': totals[1] / weight}
    writer.write_scalars(step, eval_metrics)
    console(f'eval step {step}: loss {eval_metrics["eval/loss"]:.4f} | '
            f'acc {eval_metrics["eval/mlm_accuracy"]:.3f}')

  # ---- Train loop (bert_sym.loop: compile once, progress line, non-finite policy, preemption) ----
  step = int(jax.device_get(state['step']))
  meter = loop.Meter(
      config.total_steps, config.batch_size * seq_len,
      model_lib.train_flops_per_token(config.model, seq_len, model_lib.mlm_predicted_fraction(config)),
      metrics_writer.peak_flops_per_device(override=config.peak_flops_per_device),
      config.on_nonfinite, what='The run')
  meter.last_saved = latest
  prefetcher = None

  def save(state, step):
    # The position of the next batch the step consumes, not what was prefetched.
    data_state = prefetcher.state if prefetcher else train_iter.get_state()
    checkpoint.save(manager, step, state, data_state, force=True)

  hooks = loop.Hooks(
      log=loop.progress_logger(writer, console, config.total_steps), save=save,
      log_every=config.log_every_steps, save_every=config.checkpoint.every_steps,
      evaluate=run_eval, eval_every=config.eval_every_steps, console=console)
  if step == 0:
    run_eval(state, 0)
  elif step >= config.total_steps:
    console(f'Already trained to step {step} (config.total_steps={config.total_steps}); '
            f'nothing to do. Raise --config.total_steps to train further.')
  preempted = False
  try:
    if step < config.total_steps:
      prefetcher = loop.Prefetcher(train_iter, to_global, depth=2)
      state, step, preempted = loop.run(state, step, config.total_steps, train_step,
                                        prefetcher, meter, hooks, preemption, manager)
  finally:
    if prefetcher:
      prefetcher.close()
    # Finish any in-flight (good) save before leaving, whatever happened.
    manager.wait_until_finished()
    manager.close()
    writer.close()
  if preempted:
    raise Preempted(step, preemption.signal_name)
  console(closing_summary(workdir, step, eval_metrics, meter.last_saved))
  return eval_metrics


def closing_summary(workdir, step: int, eval_metrics: dict, saved_step) -> str:
  """The run's last words: where it ended, where the model is, what to run next."""
  lines = [f'Done: step {step}.']
  if eval_metrics:
    lines[0] += (f' Final eval MLM loss {eval_metrics["eval/loss"]:.4f}, '
                 f'accuracy {eval_metrics["eval/mlm_accuracy"]:.3f}.')
  if saved_step is not None:
    lines.append(f'Checkpoint: {checkpoint.checkpoint_dir(workdir) / str(saved_step)}')
  lines += [
      f'Metrics: {workdir}/metrics.jsonl; tensorboard --logdir {workdir}/tensorboard',
      'Next:',
      f'  python -m bert_sym.export --checkpoint={workdir} --out_dir=EXPORT_DIR   '
      '# Hugging Face BERT',
      f'  python -m bert_sym.glue --checkpoint={workdir} --output_dir=GLUE_DIR '
      '--glue_dir=../shared/data/glue --tasks=rte --seeds=1   # GLUE fine-tuning',
  ]
  return '\n'.join(lines)


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
    print(model_summary(config))
    return
  if not _WORKDIR.value:
    raise app.UsageError('--workdir is required (or pass --dry_run).')
  metrics_writer.quiet_logs(flags.FLAGS['verbosity'].present,
                            import_tf=config.data.source == 'seqio')
  try:
    distributed.initialize(_DISTRIBUTED_FLAGS)
    train_and_evaluate(config, _WORKDIR.value, make_iterator=make_iterator)
  except (RunError, loop.NonFiniteError) as e:   # said in one line, no traceback
    print(f'bert_sym.train: error: {e}', file=sys.stderr, flush=True)
    sys.exit(1)
  except Preempted as e:
    logging.warning('%s; exiting with code %d.', e, e.exit_code)
    sys.stdout.flush()
    sys.exit(e.exit_code)


parse_flags = config_check.parse_flags   # absl parsing; --help lists the config keys


if __name__ == '__main__':
  from bert_sym import cli  # pylint: disable=g-import-not-at-top
  cli.run(main, prog='bert_sym.train', flags_parser=parse_flags)

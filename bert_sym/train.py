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
import json
import os
import re
import signal
import sys
import threading
import time

from absl import app
from absl import flags
from absl import logging
from etils import epath
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_flags
import numpy as np
import optax

from bert_sym import checkpoint
from bert_sym import config_check
from bert_sym import distributed
from bert_sym import metrics_writer
from bert_sym import model as model_lib
from bert_sym import optim
from bert_sym import sharding

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


# Exit codes of `python -m bert_sym.train`, for launchers (launch/slurm_gpu.sbatch requeues
# on PREEMPTED_EXIT_CODE):
#   0   finished: trained to config.total_steps (or already there)
#   1   a problem with the inputs (config, workdir, checkpoint) or a non-finite stop
#   42  stopped early by SIGTERM / preemption after saving a checkpoint: rerun to resume
#   130 stopped by Ctrl-C after saving a checkpoint: rerun to resume
PREEMPTED_EXIT_CODE = 42
INTERRUPTED_EXIT_CODE = 130


class RunError(Exception):
  """A problem with the run's inputs (config, workdir, checkpoint): reported, no traceback."""


class Preempted(Exception):
  """Raised after a SIGTERM / preemption stop once the checkpoint of `step` is saved."""

  def __init__(self, step: int, signal_name: str | None = 'SIGTERM'):
    super().__init__(f'stopped by {signal_name or "preemption"} at step {step} '
                     f'(checkpoint saved)')
    self.step = step
    self.exit_code = (INTERRUPTED_EXIT_CODE if signal_name == 'SIGINT'
                      else PREEMPTED_EXIT_CODE)


class NonFiniteError(RunError):
  pass


@contextlib.contextmanager
def _user_errors(what: str):
  """Turns the readable ValueErrors raised by our own checks into a RunError."""
  try:
    yield
  except (ValueError, FileNotFoundError, PermissionError) as e:
    raise RunError(f'{what}: {e}') from e


# ----------------------------------------------------------------------------------------
# Dry run: the model's size and cost from shapes only.
# ----------------------------------------------------------------------------------------

def predicted_fraction(config) -> float:
  """Share of positions reaching the MLM head (for FLOPs): P / L sparse, 1 dense."""
  if config.model.sparse_mlm:
    return min(config.data.max_predictions_per_seq / config.data.max_seq_len, 1.0)
  return 1.0


def model_summary(config: ml_collections.ConfigDict) -> str:
  cfg = config.model
  mlm_params = model_lib.abstract_params(model_lib.BertForMaskedLM(cfg))
  per_module = model_lib.params_per_module(mlm_params, depth=2)
  seq_len = config.data.max_seq_len
  flops = model_lib.train_flops_per_token(cfg, seq_len, predicted_fraction(config))
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
      f'{predicted_fraction(config):.4f})',
      f'  = {flops * config.batch_size * seq_len:.3e} FLOPs per step at batch '
      f'{config.batch_size}',
      f'  formula: {model_lib.FLOPS_FORMULA}',
  ]
  return '\n'.join(lines)


# ----------------------------------------------------------------------------------------
# Preemption.
# ----------------------------------------------------------------------------------------

class PreemptionFlag:
  """Set on SIGTERM (Cloud TPU preemption, SLURM time limit) or Ctrl-C: save, then exit
  with PREEMPTED_EXIT_CODE (INTERRUPTED_EXIT_CODE for Ctrl-C) so that a launcher can tell
  "resume me" from "finished". A second Ctrl-C stops at once, without saving.

  Multi-process runs use JAX's preemption sync point instead (through orbax), which makes
  every process stop at the same step; a local handler would only stop one of them.
  """

  def __init__(self):
    self._event = threading.Event()
    self.signal_name = None
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      signal.signal(signal.SIGTERM, self._handle)
      signal.signal(signal.SIGINT, self._handle)

  def _handle(self, signum, frame):
    del frame
    if signum == signal.SIGINT:
      if self._event.is_set():
        raise KeyboardInterrupt
      print('\nCtrl-C: saving a checkpoint at the end of this step (Ctrl-C again to '
            'quit without saving).', flush=True)
    self.signal_name = signal.Signals(signum).name
    self._event.set()

  def reached(self, manager, step: int) -> bool:
    if jax.process_count() > 1:
      return manager.reached_preemption(step)
    return self._event.is_set()


# ----------------------------------------------------------------------------------------
# Losses (shared by the update step and the evals).
# ----------------------------------------------------------------------------------------

def masked_positions(mlm_weights, num_predictions: int):
  """The first `num_predictions` positions with weight > 0, in order, per row.

  top_k on (weight - small position penalty) keeps selected positions first and in
  sequence order; rows with fewer selected positions pad with weight-0 positions.
  """
  length = mlm_weights.shape[-1]
  score = (mlm_weights > 0).astype(jnp.float32) - jnp.arange(length) / (2.0 * length)
  _, positions = jax.lax.top_k(score, num_predictions)
  return positions


def host_mlm_positions(batch, num_predictions: int):
  """Adds original BERT's sparse MLM features, computed on the host in NumPy:

  mlm_positions [B, P] int32 (the first P positions with weight > 0, in order, then 0),
  mlm_position_targets / mlm_position_weights [B, P] (0 at the padding), P =
  num_predictions. The same selection as `masked_positions`, so the update step needs no
  top_k or gather to find its targets. The dense features stay (total weight, evals).
  """
  weights = np.asarray(batch['mlm_weights'])
  length = weights.shape[-1]
  selected = weights > 0
  # Stable sort of "not selected": selected positions first, each group in order.
  order = np.argsort(~selected, axis=-1, kind='stable')[:, :num_predictions]
  if order.shape[-1] < num_predictions:   # P > L: pad with weight-0 slots
    order = np.pad(order, ((0, 0), (0, num_predictions - length)))
  keep = np.take_along_axis(selected, order, axis=-1) & (np.arange(num_predictions) < length)
  out = dict(batch)
  out['mlm_positions'] = np.where(keep, order, 0).astype(np.int32)
  out['mlm_position_targets'] = np.where(
      keep, np.take_along_axis(np.asarray(batch['mlm_targets']), order, axis=-1),
      0).astype(np.int32)
  out['mlm_position_weights'] = np.where(
      keep, np.take_along_axis(weights, order, axis=-1), 0).astype(np.float32)
  return out


def mlm_sums(model, params, batch, *, sparse: bool, num_predictions: int, dropout_key=None):
  """(sum of weighted cross-entropy, sum of weighted correct, sum of weights)."""
  targets, weights = batch['mlm_targets'], batch['mlm_weights']
  positions = None
  if sparse and 'mlm_positions' in batch:   # computed on the host (host_mlm_positions)
    positions = batch['mlm_positions']
    targets, weights = batch['mlm_position_targets'], batch['mlm_position_weights']
  elif sparse:   # fallback for batches without them: found on the device
    positions = masked_positions(weights, num_predictions)
    targets = jnp.take_along_axis(targets, positions, axis=1)
    weights = jnp.take_along_axis(weights, positions, axis=1)
  logits = model.apply(
      {'params': params}, batch['input_ids'], batch['token_type_ids'],
      batch['attention_mask'], masked_positions=positions,
      deterministic=dropout_key is None,
      rngs=None if dropout_key is None else {'dropout': dropout_key})
  cross_entropy = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
  return (jnp.sum(cross_entropy * weights), jnp.sum(correct * weights), jnp.sum(weights))


def make_train_step(config, model, tx, schedule, mesh, batch_sharding):
  """The update step (not yet jitted): (state, global batch) -> (new state, metrics).

  One definition for the trainer and benchmarks/accelerator.py, so that the benchmark
  times exactly what training runs (forward, backward, clipping, AdamW).
  """
  accum = config.optimizer.grad_accum_steps
  sparse = bool(config.model.sparse_mlm)
  num_predictions = config.data.max_predictions_per_seq

  def train_step(state, batch):
    params, step = state['params'], state['step']
    # Dropout depends on (seed, step) only: a resumed run draws the same masks.
    step_key = jax.random.fold_in(jax.random.wrap_key_data(state['rng']), step)
    # The loss is normalised by the whole batch's number of targets, so accumulating
    # per-micro-batch sums gives the big-batch loss and gradient (up to fp order).
    total_weight = jnp.maximum(jnp.sum(batch['mlm_weights']), 1.0)

    def micro_grads(micro_batch, index):
      def loss_fn(p):
        loss_sum, correct, weight = mlm_sums(
            model, p, micro_batch, sparse=sparse, num_predictions=num_predictions,
            dropout_key=jax.random.fold_in(step_key, index))
        return loss_sum / total_weight, (correct, weight)
      (loss, (correct, _)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
      return grads, loss, correct

    if accum == 1:
      grads, loss, correct = micro_grads(batch, 0)
    else:
      # [B, ...] -> [accum, B/accum, ...] taking rows accum apart, so that every
      # micro-batch stays split over the same devices as the batch (no resharding).
      def split(x):
        x = x.reshape((x.shape[0] // accum, accum) + x.shape[1:])
        return jax.lax.with_sharding_constraint(
            jnp.swapaxes(x, 0, 1),
            jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(
                None, *batch_sharding.spec)))
      micro_batches = jax.tree.map(split, batch)

      def body(carry, inputs):
        micro_batch, index = inputs
        grads, loss, correct = micro_grads(micro_batch, index)
        return jax.tree.map(jnp.add, carry, (grads, loss, correct)), None

      zeros = (jax.tree.map(jnp.zeros_like, params), jnp.float32(0), jnp.float32(0))
      (grads, loss, correct), _ = jax.lax.scan(
          body, zeros, (micro_batches, jnp.arange(accum)))

    grad_norm = optax.global_norm(grads)
    updates, new_opt_state = tx.update(grads, state['opt_state'], params)
    new_params = optax.apply_updates(params, updates)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    # A non-finite update is never applied: 'skip' carries on, 'stop' ends the run with
    # the last good checkpoint untouched (the host checks `finite`).
    keep_if_bad = lambda new, old: jnp.where(finite, new, old)

    def keep_opt_state_if_bad(new, old):
      # The learning-rate schedule's counter still advances on a skipped step: the
      # schedule is a function of the training step, so the lr applied at step s stays
      # schedule(s) (what we log) and reaches 0 at total_steps. Adam's moments and its
      # bias-correction count stay as they were, as if the bad batch had not been seen.
      if isinstance(new, optax.ScaleByScheduleState):
        return new
      return jax.tree.map(keep_if_bad, new, old)

    new_state = {
        'params': jax.tree.map(keep_if_bad, new_params, params),
        'opt_state': jax.tree.map(
            keep_opt_state_if_bad, new_opt_state, state['opt_state'],
            is_leaf=lambda x: isinstance(x, optax.ScaleByScheduleState)),
        'step': step + 1,
        'rng': state['rng'],
    }
    metrics = {'train/loss': loss, 'train/mlm_accuracy': correct / total_weight,
               'train/learning_rate': schedule(step), 'train/grad_norm': grad_norm,
               'train/finite': finite.astype(jnp.float32)}
    return new_state, metrics
  return train_step


# ----------------------------------------------------------------------------------------
# Performance plumbing: compilation cache, input prefetch, compile once and time it.
# ----------------------------------------------------------------------------------------

def enable_compilation_cache(cache_dir: str) -> str | None:
  """JAX's persistent compilation cache at `cache_dir` ('' = off): a rerun or a resumed
  run loads its compiled steps instead of compiling them again."""
  if not cache_dir:
    return None
  path = os.path.expanduser(cache_dir)
  jax.config.update('jax_compilation_cache_dir', path)
  return path


class Prefetcher:
  """Reads host batches and `jax.device_put`s them (via `to_global`) in a background
  thread, `depth` batches ahead of the update step.

  `state` is the input position after the last batch handed out, i.e. of the next batch
  the step will consume, not what the thread has read ahead: that is what a checkpoint
  must store for an exact resume.
  """

  def __init__(self, iterator, to_global, depth: int = 2):
    import queue  # pylint: disable=g-import-not-at-top
    self._iterator, self._to_global = iterator, to_global
    self.state = iterator.get_state()
    self._queue = queue.Queue(maxsize=max(depth, 1))
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._work, daemon=True, name='prefetch')
    self._thread.start()

  def _work(self):
    while not self._stop.is_set():
      try:
        host = next(self._iterator)
        item = (self._to_global(host), self._iterator.get_state(), None)
      except BaseException as e:  # pylint: disable=broad-except
        item = (None, None, e)    # re-raised in the consumer's thread
      while not self._stop.is_set():
        try:
          self._queue.put(item, timeout=0.1)
          break
        except Exception:  # pylint: disable=broad-except  (queue.Full)
          continue
      if item[2] is not None:
        return

  def __next__(self):
    batch, state, error = self._queue.get()
    if error is not None:
      raise error
    self.state = state
    return batch

  def close(self):
    self._stop.set()
    self._thread.join(timeout=10)


def compile_step(jitted, *args):
  """Lowers and compiles `jitted` for `args` once; returns (executable, seconds)."""
  start = time.perf_counter()
  compiled = jitted.lower(*args).compile()
  return compiled, time.perf_counter() - start


# ----------------------------------------------------------------------------------------
# The trainer.
# ----------------------------------------------------------------------------------------

def _validate(config):
  try:
    config_check.check(config)
  except config_check.ConfigError as e:
    raise RunError(str(e)) from None


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
    changed = _diff(checkpoint.read_config(workdir).to_dict(), json.loads(config.to_json()))
    if changed:
      logging.warning('Config differs from the previous %s in: %s', old, ', '.join(changed))
  checkpoint.write_config(workdir, config)


def _diff(a, b, prefix=''):
  keys = sorted(set(a) | set(b))
  out = []
  for k in keys:
    if isinstance(a.get(k), dict) and isinstance(b.get(k), dict):
      out += _diff(a[k], b[k], f'{prefix}{k}.')
    elif a.get(k) != b.get(k):
      out.append(f'{prefix}{k}')
  return out


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, make_iterator=None):
  """Trains to config.total_steps (resuming if possible); returns the final eval metrics.

  Raises `Preempted` (after saving) when stopped early by SIGTERM / preemption.
  """
  _validate(config)
  cache_dir = enable_compilation_cache(config.get('compilation_cache_dir', ''))

  # ======================================================================================
  # Logging
  # ======================================================================================
  is_chief = jax.process_index() == 0
  workdir = _prepare_workdir(workdir)
  writer = metrics_writer.MetricWriter(workdir, enabled=is_chief)
  preemption = PreemptionFlag()
  console = print if is_chief else (lambda *a, **k: None)

  # ======================================================================================
  # Mesh
  # ======================================================================================
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

  # ======================================================================================
  # Input pipeline: per-process numpy batches -> global arrays split over (data, fsdp)
  # ======================================================================================
  with _user_errors('Input pipeline'):
    if make_iterator is None:
      from bert_sym.input import iterator as data_lib  # pylint: disable=g-import-not-at-top
      make_iterator = data_lib.make_mlm_iterator
      data_vocab = data_lib.vocab_size(config.data)
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
    from bert_sym.input import iterator  # pylint: disable=g-import-not-at-top
    for line in iterator.describe_corpus(train_iter, config):   # size, epochs, warning
      console(line)
  host_to_global = functools.partial(sharding.host_batch_to_global, mesh=mesh,
                                     global_batch_size=config.batch_size, rules=rules)
  if config.model.sparse_mlm:   # the step's targets found on the host, not the device
    to_global = lambda batch: host_to_global(
        host_mlm_positions(batch, config.data.max_predictions_per_seq))
  else:
    to_global = host_to_global
  seq_len = config.data.max_seq_len
  tokens_per_step = config.batch_size * seq_len

  # ======================================================================================
  # Model & optimizer
  # ======================================================================================
  model = model_lib.BertForMaskedLM(config.model)
  tx, schedule = optim.make_optimizer(config.optimizer, config.total_steps)
  flops_per_token = model_lib.train_flops_per_token(
      config.model, seq_len, predicted_fraction(config))
  peak_flops = metrics_writer.peak_flops_per_device(override=config.peak_flops_per_device)

  # ======================================================================================
  # Shard & init: shapes first (nothing allocated), then create state already sharded
  # ======================================================================================
  init_key, dropout_base_key = jax.random.split(jax.random.key(config.seed))

  def init_params(key):
    return model.init(key, *model_lib.dummy_inputs(1, seq_len))['params']

  boxed_params = jax.eval_shape(init_params, init_key)
  param_shardings = sharding.logical_to_shardings(boxed_params, mesh, rules)
  abstract_params = nn.meta.unbox(boxed_params)
  # Adam's moments shard like their parameters; counters are replicated.
  opt_shardings = sharding.opt_state_shardings(tx, abstract_params, param_shardings, mesh)
  state_shardings = {'params': param_shardings, 'opt_state': opt_shardings,
                     'step': replicated, 'rng': replicated}

  @functools.partial(jax.jit, out_shardings=state_shardings)
  def init_state():
    params = nn.meta.unbox(init_params(init_key))
    return {'params': params, 'opt_state': tx.init(params), 'step': jnp.int32(0),
            'rng': jax.random.key_data(dropout_base_key)}

  abstract_state = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      jax.eval_shape(init_state), state_shardings)

  # ======================================================================================
  # Update step: one jit, state donated, micro-batches scanned for gradient accumulation
  # ======================================================================================
  train_step = make_train_step(config, model, tx, schedule, mesh, batch_sharding)
  sparse = bool(config.model.sparse_mlm)
  num_predictions = config.data.max_predictions_per_seq

  train_step = jax.jit(
      train_step, in_shardings=(state_shardings, batch_sharding),
      out_shardings=(state_shardings, replicated), donate_argnums=(0,))

  # ======================================================================================
  # Checkpoint restore (automatic: the latest finished step in the workdir)
  # ======================================================================================
  with _user_errors(f'Checkpoint in {checkpoint.checkpoint_dir(workdir)}'):
    manager, latest, state, data_state = checkpoint.restore_latest(
        workdir, config.checkpoint, abstract_state, abstract_params, log=console)
  if latest is not None:
    with _user_errors('Resuming the input pipeline'):
      train_iter.set_state(data_state)
    console(f'Resumed from step {latest} ({checkpoint.checkpoint_dir(workdir)})')
  else:
    state = init_state()
    console(f'Initialised {model_lib.count_params(abstract_params):,} parameters '
            f'(fresh run in {workdir})')
  # Rows logged after the restored step belong to a timeline that is being redone.
  writer.drop_rows_after(latest if latest is not None else -1)
  _write_config(workdir, config)

  # ======================================================================================
  # Evals: MLM loss and accuracy on a fixed slice of the validation split
  # ======================================================================================
  @functools.partial(jax.jit, in_shardings=(param_shardings, batch_sharding),
                     out_shardings=replicated)
  def eval_step(params, batch):
    return mlm_sums(model, params, batch, sparse=sparse, num_predictions=num_predictions)

  def evaluate(params) -> dict:
    eval_iter.set_state(eval_start)
    totals = np.zeros(3)
    for _ in range(config.eval_steps):
      try:
        batch = next(eval_iter)
      except StopIteration:
        break
      totals += np.asarray(jax.device_get(eval_step(params, to_global(batch))))
    weight = max(totals[2], 1.0)
    return {'eval/loss': totals[0] / weight, 'eval/mlm_accuracy': totals[1] / weight}

  def run_eval(step):
    eval_metrics = evaluate(state['params'])
    writer.write_scalars(step, eval_metrics)
    console(f'eval step {step}: loss {eval_metrics["eval/loss"]:.4f} | '
            f'acc {eval_metrics["eval/mlm_accuracy"]:.3f}')
    return eval_metrics

  # ======================================================================================
  # Train loop
  # ======================================================================================
  step = int(jax.device_get(state['step']))
  last_saved = latest
  pending = []                 # (step, metrics on device), fetched at log/save time
  interval = []                # fetched metrics since the last console line
  timing = None                # (time, step) once the first step has compiled and run
  eval_metrics = {}

  def fetch_pending():
    """Brings metrics to the host; raises on a non-finite step when on_nonfinite=stop."""
    nonlocal pending
    fetched = jax.device_get(pending)
    pending = []
    for at_step, m in fetched:
      if not m['train/finite']:
        if config.on_nonfinite == 'stop':
          raise NonFiniteError(
              f'Non-finite loss or gradient at step {at_step} (loss {m["train/loss"]}, '
              f'grad norm {m["train/grad_norm"]}). The run stops; the update was not '
              f'applied and the last good checkpoint (step {last_saved}) is kept. Lower '
              f'the learning rate, or set --config.on_nonfinite=skip to skip such updates.')
        logging.warning('Non-finite loss or gradient at step %d: update skipped.', at_step)
    interval.extend(fetched)

  def save(step):
    nonlocal last_saved
    fetch_pending()   # never save after a non-finite step in 'stop' mode
    # The position of the next batch the step consumes, not what was prefetched.
    data_state = prefetcher.state if prefetcher else train_iter.get_state()
    checkpoint.save(manager, step, state, data_state, force=True)
    last_saved = step

  @contextlib.contextmanager
  def clock_paused():
    """Evals and saves do not count in steps/s, tokens/s and MFU (big_vision style)."""
    nonlocal timing
    if timing is not None:
      jax.block_until_ready(state)   # the steps already dispatched still count
    start = time.perf_counter()
    yield
    if timing is not None:
      timing = (timing[0] + time.perf_counter() - start, timing[1])


  preempted = False
  if step == 0:
    eval_metrics = run_eval(0)
  elif step >= config.total_steps:
    console(f'Already trained to step {step} (config.total_steps={config.total_steps}); '
            f'nothing to do. Raise --config.total_steps to train further.')
  prefetcher = None
  compiled_step = None
  compile_seconds = None
  try:
    if step < config.total_steps:
      prefetcher = Prefetcher(train_iter, to_global, depth=2)
    while step < config.total_steps:
      with jax.profiler.StepTraceAnnotation('train', step_num=step):
        batch = next(prefetcher)
        if compiled_step is None:   # compile exactly once, and say how long it took
          compiled_step, seconds = compile_step(train_step, state, batch)
          console(f'compiled train step in {seconds:.1f} s')
          compile_seconds = seconds   # written with the next logged row
        state, metrics = compiled_step(state, batch)
      step += 1
      pending.append((step, metrics))

      if timing is None:
        jax.block_until_ready(metrics)   # exclude compilation from the throughput
        timing = (time.perf_counter(), step)

      if step % config.log_every_steps == 0 or step == config.total_steps:
        fetch_pending()
        scalars = {k: float(np.mean([m[k] for _, m in interval])) for k in interval[0][1]
                   if k != 'train/finite'}
        scalars['train/nonfinite_steps'] = sum(1 for _, m in interval if not m['train/finite'])
        scalars['train/learning_rate'] = float(interval[-1][1]['train/learning_rate'])
        interval = []
        now = time.perf_counter()
        eta = 0.0
        if step > timing[1]:
          steps_per_sec = (step - timing[1]) / (now - timing[0])
          scalars['perf/steps_per_sec'] = steps_per_sec
          scalars['perf/tokens_per_sec'] = steps_per_sec * tokens_per_step
          scalars['perf/tflops_per_device'] = (
              steps_per_sec * tokens_per_step * flops_per_token / jax.device_count() / 1e12)
          if peak_flops:
            scalars['perf/mfu'] = scalars['perf/tflops_per_device'] * 1e12 / peak_flops
          eta = (config.total_steps - step) / steps_per_sec
          timing = (now, step)
        if compile_seconds is not None:
          scalars['perf/compile_seconds'], compile_seconds = compile_seconds, None
        writer.write_scalars(step, scalars)
        console(metrics_writer.format_progress(step, config.total_steps, scalars, eta))

      if step % config.eval_every_steps == 0 or step == config.total_steps:
        with clock_paused():
          eval_metrics = run_eval(step)

      # A SIGTERM on the last step is just a finished run (exit 0, nothing to resume).
      preempted = preemption.reached(manager, step) and step < config.total_steps
      if (step % config.checkpoint.every_steps == 0 or step == config.total_steps
          or preempted):
        with clock_paused():
          save(step)
      if preempted:
        stop = Preempted(step, preemption.signal_name)
        console(f'Stopped by {preemption.signal_name or "preemption"}: saved step {step}, '
                f'exiting with code {stop.exit_code} (rerun the same command to resume).')
        break
  finally:
    if prefetcher:
      prefetcher.close()
    # Finish any in-flight (good) save before leaving, whatever happened.
    manager.wait_until_finished()
    manager.close()
    writer.close()
  if preempted:
    raise Preempted(step, preemption.signal_name)
  console(closing_summary(workdir, step, eval_metrics, last_saved))
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
  except RunError as e:
    print(f'bert_sym.train: error: {e}', file=sys.stderr, flush=True)
    sys.exit(1)
  except Preempted as e:
    logging.warning('%s; exiting with code %d.', e, e.exit_code)
    sys.stdout.flush()
    sys.exit(e.exit_code)


def config_keys_help(config) -> str:
  """Every `--config.KEY=VALUE` that `config` accepts, with its current value."""
  def flatten(d, prefix=''):
    for key, value in d.items():
      if isinstance(value, dict):
        yield from flatten(value, f'{prefix}{key}.')
      else:
        yield f'{prefix}{key}', value
  rows = list(flatten(config.to_dict()))
  width = max(len(k) for k, _ in rows)
  return '\n'.join([
      'Config keys (override any with --config.KEY=VALUE; values of the given --config, '
      'else configs/sym_base.py):'] + [f'  --config.{k:<{width}} {v!r}' for k, v in rows])


_HELP_FLAGS = ('--help', '-help', '-h', '--helpshort', '--helpfull', '-?')


def parse_flags(argv):
  """absl flag parsing, with config_flags' unknown-key traceback turned into one line.

  `--help` also lists the config keys, which absl cannot know (they come from a file).
  """
  try:
    return flags.FLAGS(argv)
  except SystemExit:
    if any(a in _HELP_FLAGS for a in argv[1:]):
      _print_config_keys(argv)
    raise
  except (KeyError, AttributeError) as e:
    found = re.search(r"([A-Za-z_]\w*)", str(e).replace('\\', ''))
    key = found.group(1) if found else str(e)
    culprits = [a for a in argv[1:] if a.startswith('--config.') and key and key in a]
    print(f'FATAL Flags parsing error: unknown config key {key!r}'
          f'{" in " + ", ".join(culprits) if culprits else ""}. Every key must exist in '
          f'the config file (see configs/common.py, or --help for the list).',
          file=sys.stderr)
    sys.exit(1)
  except flags.Error as e:
    print(f'FATAL Flags parsing error: {e}\nPass --helpfull to see help on flags.',
          file=sys.stderr)
    sys.exit(1)


def _print_config_keys(argv) -> None:
  config_file = next((a.split('=', 1)[1] for a in argv if a.startswith('--config=')),
                     'configs/sym_base.py')
  try:
    config = config_flags.config_flags._LoadConfigModule(  # pylint: disable=protected-access
        'help', config_file.split(':', 1)[0]).get_config(
            *config_file.split(':', 1)[1:2])
  except Exception as e:  # pylint: disable=broad-except
    print(f'(cannot list the config keys of {config_file}: {e})')
    return
  print(config_keys_help(config))


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)

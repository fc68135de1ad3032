"""Fine-tuning one GLUE task on the shared core (bert_sym.steps + bert_sym.loop).

A task's seeds train as one group: all in one jax.vmap'ped step over a leading seed axis
(config.parallel_seeds), else one at a time; seed k has the same init, dropout and data
order either way, so both give the same model (see `_Batches`). A group checkpoints to
{output_dir}/runs/{task}/checkpoints every config.checkpoint_every_steps and on SIGTERM /
Ctrl-C (exit 42 / 130); the data order is a function of (seed, step), so the step alone
resumes it.
"""

import dataclasses
import json
import math
from typing import Any

from absl import logging
from etils import epath
import jax
import ml_collections
import numpy as np

from bert_sym import checkpoint as checkpoint_lib
from bert_sym import files
from bert_sym import loop
from bert_sym import metrics_writer
from bert_sym import model as model_lib
from bert_sym import objectives
from bert_sym import optim
from bert_sym import pretrain_loop
from bert_sym import sharding
from bert_sym import steps
from bert_sym.glue import data as glue_data
from bert_sym.glue import hosts


@dataclasses.dataclass
class Pretrained:
  config: ml_collections.ConfigDict    # the training config from {workdir}/config.json
  encoder: dict                        # host numpy BertForMaskedLM params['encoder']
  step_dir: str
  step: int


def load_pretrained_encoder(path) -> Pretrained:
  """The encoder of a pre-training checkpoint and its config, read as export reads it
  (checkpoint.load_pretrained_step): a newest step whose arrays do not restore is skipped."""
  # A workdir's finished steps, which a running trainer can change between two hosts'
  # listings: process 0 lists them for everyone. Every host then reads them together (the
  # restore is collective), whole: a step chosen from its metadata alone could still have a
  # truncated array file.
  step_dirs = hosts.on_process_0(
      lambda: [str(d) for d in checkpoint_lib.candidate_step_dirs(path)])
  step_dir, config, params = checkpoint_lib.load_pretrained_step(path, step_dirs=step_dirs)
  if 'encoder' not in params:
    raise ValueError(f'{step_dir} holds no BertForMaskedLM encoder (top-level params: '
                     f'{sorted(params)}).')
  # Checked now, before --output_dir is touched (an earlier run's results set aside for
  # this checkpoint), not when the first task's training starts. Shapes only; the xla
  # kernel, which every backend can trace (the kernel does not change the parameters).
  model_cfg = ml_collections.ConfigDict(config.model.to_dict())
  model_cfg.attention_impl = 'xla'
  fresh = model_lib.abstract_params(
      model_lib.BertForSequenceClassification(model_cfg, num_labels=1))['bert']['encoder']
  checkpoint_lib.check_encoder(fresh, params['encoder'], step_dir)
  return Pretrained(config, params['encoder'], str(step_dir), int(step_dir.name))


def check_vocab(pretrained: Pretrained, tokenizer) -> None:
  """The tokenizer must emit exactly the ids the embedding table was trained on: the same
  vocabulary (its md5, as the checkpoint recorded it), in a table at least that large (the
  trainer accepts a table padded past the vocabulary, say 30528 rows for 30522 tokens)."""
  fix = ('Pass the vocabulary it was pre-trained with: --config.vocab_path=PATH/vocab.txt '
         '(the run\'s config.json names it as data.vocab_path).')
  checkpoint_lib.check_trained_vocab(pretrained.step_dir, tokenizer.vocab_file, tokenizer.md5,
                                     fix)
  table_rows = pretrained.encoder['embeddings']['word_embeddings']['embedding'].shape[0]
  config_size = pretrained.config.model.vocab_size
  if not tokenizer.vocab_size <= config_size == table_rows:
    raise ValueError(
        f'Vocabulary mismatch: the tokenizer ({tokenizer.vocab_file}) has '
        f'{tokenizer.vocab_size} tokens, but the checkpoint {pretrained.step_dir} has '
        f'model.vocab_size={config_size} and a {table_rows}-row embedding table. {fix}')


def num_train_steps(num_train, batch_size, epochs) -> int:
  return max(1, math.ceil(epochs * math.ceil(num_train / batch_size)))


def train_batches(n, batch_size, epochs, seed):
  """Index lists of every step: a fresh shuffle per epoch, the last partial batch kept."""
  total_steps = num_train_steps(n, batch_size, epochs)
  rng = np.random.default_rng(seed)
  batches = []
  while len(batches) < total_steps:
    order = rng.permutation(n)
    batches.extend(order[i:i + batch_size] for i in range(0, n, batch_size))
  return batches[:total_steps]


def global_batch(batch: dict, mesh, rules, stacked: bool = False) -> dict:
  """A batch every process built identically -> global arrays split over the batch axes
  (axis 1 when `stacked` over seeds), in the batch's own row order.

  Every process passes the whole batch and each device reads its own rows of it. Handing
  each process a contiguous share instead would put that share on the process's devices,
  which on TPU pod meshes are not contiguous (v4-16: processes 0,1,0,1,... along the
  batch): the global rows come out permuted, and dev predictions would be paired with the
  wrong examples."""
  axis = 1 if stacked else 0
  return sharding.host_batch_to_global(
      batch, mesh, jax.tree.leaves(batch)[0].shape[axis], rules, batch_axis=axis)


def _optimizer_config(config, total_steps):
  return ml_collections.ConfigDict(dict(
      learning_rate=config.learning_rate, b1=config.b1, b2=config.b2, eps=config.eps,
      weight_decay=config.weight_decay, grad_clip_norm=config.grad_clip_norm,
      # Hugging Face: warmup_steps = ceil(warmup_ratio * total_steps).
      warmup_steps=math.ceil(config.warmup_ratio * total_steps)))


@dataclasses.dataclass
class TaskSetup:
  """What every seed of one task shares: the state layout and the jitted steps.

  Built once per task so that later seeds (and a sweep's later checkpoints) reuse the
  compilations.
  """
  spec: glue_data.TaskSpec
  total_steps: int
  state: steps.StateSpec
  rules: Any                 # the training config's logical-axis rules (batch included)
  train_step: Any            # jitted (state, batch) -> (state, metrics), state donated
  parallel_step: Any         # the same, vmapped over a leading seed axis
  predict_step: Any


def setup_task(pretrained, spec, num_train, config, mesh, rules) -> TaskSetup:
  model = model_lib.BertForSequenceClassification(pretrained.config.model,
                                                  num_labels=spec.num_labels)
  total_steps = num_train_steps(num_train, config.batch_size, config.epochs)
  tx, schedule = optim.make_optimizer(_optimizer_config(config, total_steps), total_steps)
  state = steps.create_state(
      lambda key: model.init(key, *model_lib.dummy_inputs(1, 8))['params'], tx, mesh, rules)
  batch_sharding = sharding.batch_sharding(mesh, rules)
  train_step = steps.make_train_step(
      objectives.classifier_loss_fn(model, regression=spec.is_regression), tx, schedule,
      weight_fn=objectives.example_weight, accum=config.get('grad_accum_steps', 1),
      mesh=mesh, batch_sharding=batch_sharding, fold_micro_index=False)
  replicated = sharding.replicated(mesh)
  # Pinning the shardings keeps step 2's arguments identical to step 1's, so jit compiles
  # once per padded length.
  jitted = steps.jit_train_step(train_step, state.shardings, batch_sharding, replicated, rules)
  parallel = steps.jit_train_step(jax.vmap(train_step), steps.stacked(state.shardings),
                                  steps.stacked(batch_sharding), replicated, rules)

  def predict(params, batch):
    logits = objectives.classifier_logits(model, params, batch)
    return objectives.predictions(logits, spec.is_regression)
  # Replicated predictions: every process can read them (and they are tiny).
  predict_step = jax.jit(steps.in_mesh_context(predict, mesh, rules), out_shardings=replicated)
  return TaskSetup(spec, total_steps, state, rules, jitted, parallel, predict_step)


class _Batches:
  """The host batches of a group at step `state['step']`: seed k's rows are
  train_batches(seed=k)[step], stacked over the group's seeds.

  Every seed's batch at a step is padded to one length: the longest bucket among the
  batches of ALL the task's seeds (`length_seeds`) at that step. Dropout masks depend on
  the padded shape, so this is what makes a seed's run the same whether it trains alone
  (parallel_seeds=False, or a resumed subset) or vmapped with the others.
  """

  def __init__(self, train, config, seeds, pad_id, stacked, step, length_seeds=None):
    per_seed = {s: train_batches(len(train), config.batch_size, config.epochs, s)
                for s in sorted(set(seeds) | set(length_seeds or ()))}
    self._per_seed = [per_seed[s] for s in seeds]
    self._all = list(per_seed.values())
    self._lengths = train.lengths
    self._train, self._config, self._pad_id = train, config, pad_id
    self._stacked, self.step = stacked, step

  def get_state(self):
    return {'step': self.step}

  def __next__(self):
    c = self._config
    length = c.max_seq_len
    if c.length_buckets:
      length = max(glue_data.bucket_length(int(self._lengths[b[self.step]].max()),
                                           c.max_seq_len) for b in self._all)
    batches = [glue_data.pad_batch(self._train, b[self.step], c.batch_size, length,
                                   self._pad_id, bucket=False)
               for b in self._per_seed]
    self.step += 1
    if not self._stacked:
      return batches[0]
    return {k: np.stack([b[k] for b in batches]) for k in batches[0]}


def _group_dir(output_dir, task_name):
  return epath.Path(output_dir) / 'runs' / task_name


def _metric_writer(run_dir, resume_step) -> metrics_writer.MetricWriter:
  """TensorBoard + metrics.jsonl for one (task, seed); a fresh run replaces old curves,
  a resumed one drops the rows after its step."""
  primary = jax.process_index() == 0
  if primary:
    run_dir = epath.Path(run_dir)
    if not resume_step:
      run_dir.rmtree(missing_ok=True)
    run_dir.mkdir(parents=True, exist_ok=True)
  writer = metrics_writer.MetricWriter(run_dir, enabled=primary)
  if resume_step:
    writer.drop_rows_after(resume_step)
  return writer


def finetune_group(pretrained, task: TaskSetup, train, config, seeds, mesh, pad_id,
                   output_dir, identity: dict, preemption=None, length_seeds=None) -> list:
  """Fine-tunes one model per seed from the checkpoint; returns their params (in order).

  Resumes from {output_dir}/runs/{task}/checkpoints when it holds this group (same
  seeds, checkpoint and recipe: `identity`); raises loop.Preempted after saving on SIGTERM.
  """
  stacked = len(seeds) > 1
  group_dir = _group_dir(output_dir, task.spec.name)
  # The seeds whose batches set the padded lengths are part of it too: resumed with another
  # --seeds list, a run would change its lengths, so its dropout masks, midway.
  _claim_group_dir(group_dir, dict(identity, seeds=list(seeds), parallel=stacked,
                                   length_seeds=sorted(set(length_seeds or seeds))))
  desc = f'{task.spec.name} seed{"s" if stacked else ""} {",".join(map(str, seeds))}'
  manager, latest, state, record = _restore_or_init(pretrained, task, seeds, group_dir, desc)
  step = latest or 0
  writers = [_metric_writer(epath.Path(output_dir) / 'runs' / f'{task.spec.name}_seed{s}',
                            step) for s in seeds]
  meter = _meter(pretrained, task, config, len(seeds), desc, latest)
  # The steps since the last row, as the save kept them: without them the first row after
  # a resume averaged fewer steps than the uninterrupted run's row at that step.
  pretrain_loop.load_meter_state(meter, record.get('meter'))
  hooks = _hooks(task, config, writers, manager, desc, meter)
  batches = _Batches(train, config, seeds, pad_id, stacked, step, length_seeds)
  to_global = lambda b: global_batch(b, mesh, task.rules, stacked)
  prefetcher = loop.Prefetcher(batches, to_global, depth=2)
  try:
    state, step, preempted = loop.run(
        state, step, task.total_steps, task.parallel_step if stacked else task.train_step,
        prefetcher, meter, hooks, preemption, manager)
  finally:
    prefetcher.close()
    manager.wait_until_finished()
    manager.close()
    for writer in writers:
      writer.close()
  if preempted:
    raise loop.Preempted(step, preemption.signal_name)
  return steps.unstack(state['params'], len(seeds)) if stacked else [state['params']]


def _claim_group_dir(group_dir, identity: dict) -> None:
  """A checkpoint of another group (other seeds, checkpoint or recipe) is removed, never
  resumed; process 0 decides for every host."""
  marker = group_dir / 'group.json'

  def same_group():
    try:
      return json.loads(marker.read_text()) == identity
    except (FileNotFoundError, ValueError):   # none yet, or cut short by a crash: not ours
      return False
  same = hosts.on_process_0(same_group)
  if jax.process_index() == 0 and not same:
    checkpoint_lib.checkpoint_dir(group_dir).rmtree(missing_ok=True)
    files.write_atomically(str(marker), json.dumps(identity))


def _restore_or_init(pretrained, task: TaskSetup, seeds, group_dir, desc):
  """(checkpoint manager, restored step or None, state, the save's record {'meter', ...}):
  the group's last checkpoint, else a fresh pooler and classifier (N(0, 0.02)) around the
  pre-trained encoder per seed."""
  stacked = len(seeds) > 1
  ckpt = ml_collections.ConfigDict(dict(keep_last=1, keep_every=0, async_save=False))
  abstract = task.state.abstract
  if stacked:
    lead = lambda a, s=None: jax.ShapeDtypeStruct((len(seeds),) + a.shape, a.dtype,
                                                  sharding=s)
    abstract = jax.tree.map(lead, abstract, steps.stacked(task.state.shardings))
  # start_over: a task whose checkpoints are all damaged is fine-tuned again from the
  # pre-trained encoder (minutes; refusing would stop this output directory for good).
  manager, latest, state, _, record = checkpoint_lib.restore_latest(
      group_dir, ckpt, abstract, log=logging.warning, start_over=True)
  if latest is not None:
    logging.info('%s: resuming from step %d of %d (%s)', desc, latest, task.total_steps,
                 checkpoint_lib.checkpoint_dir(group_dir))
    print(f'{desc}: resuming from step {latest} of {task.total_steps}', flush=True)
    return manager, latest, state, record
  states = []
  for seed in seeds:
    init_key, dropout_key = jax.random.split(jax.random.key(seed))
    params = checkpoint_lib.with_pretrained_encoder(
        task.state.init_params(init_key), pretrained.encoder, pretrained.step_dir)
    params = jax.device_put(params, task.state.param_shardings)
    states.append(task.state.from_params(params, dropout_key))
  if stacked:
    return manager, None, jax.device_put(steps.stack(states),
                                         steps.stacked(task.state.shardings)), {}
  return manager, None, states[0], {}


def _meter(pretrained, task: TaskSetup, config, num_seeds, desc, last_saved) -> loop.Meter:
  seq_len = config.max_seq_len
  meter = loop.Meter(
      task.total_steps, num_seeds * config.batch_size * seq_len,
      lambda length: model_lib.train_flops_per_token(pretrained.config.model, length, 0.0),
      metrics_writer.peak_flops_per_device(override=config.get('peak_flops_per_device', 0.0)),
      config.get('on_nonfinite', 'stop'),
      what=f'GLUE {desc}')
  meter.last_saved = last_saved
  meter.health.max_consecutive_skips = config.get('max_consecutive_nonfinite', 10)
  return meter


def _hooks(task: TaskSetup, config, writers, manager, desc, meter) -> loop.Hooks:
  """Per-seed metrics every config.log_every_steps; a checkpoint every
  config.checkpoint_every_steps and on SIGTERM, except after the last step."""
  console = print if config.progress_bar and jax.process_index() == 0 else (lambda *a: None)

  def log(step, scalars, eta, per_run):
    for i, writer in enumerate(writers):   # per_run holds one value per seed
      row = {k: np.reshape(per_run[k], -1)[i] for k in ('train/loss', 'train/grad_norm')}
      writer.write_scalars(step, {**row, 'train/learning_rate': scalars['train/learning_rate']})
    console(f'{desc}: {metrics_writer.format_progress(step, task.total_steps, scalars, eta)}')

  def save(state, step):
    if step < task.total_steps:   # a finished group is scored, not resumed
      checkpoint_lib.save(manager, step, state, {'step': step}, force=True,
                          meter_state=pretrain_loop.meter_state(meter))

  return loop.Hooks(log=log, save=save, log_every=config.log_every_steps,
                    save_every=config.get('checkpoint_every_steps', 0), console=console,
                    name=f'GLUE {task.spec.name}',
                    row_at_preemption=False)   # the save keeps the steps since the last row


def finish_group(output_dir, task_name) -> None:
  """The group's results are written: its checkpoints are no longer needed."""
  if jax.process_index() == 0:
    group_dir = _group_dir(output_dir, task_name)
    checkpoint_lib.checkpoint_dir(group_dir).rmtree(missing_ok=True)
    (group_dir / checkpoint_lib.DAMAGED_DIR).rmtree(missing_ok=True)   # of a finished task
    (group_dir / 'group.json').unlink(missing_ok=True)
    if group_dir.exists() and not any(group_dir.iterdir()):
      group_dir.rmdir()   # no empty runs/<task>/ left beside the runs/<task>_seed<k>/ logs


def discard_finished_group(output_dir, task_name, finished_seeds) -> None:
  """A run killed after a group's results were written, before finish_group, left its
  checkpoints; a rerun with nothing left to train never reached finish_group again. They
  go once every seed of that group is finished (a group still to resume stays)."""
  marker = _group_dir(output_dir, task_name) / 'group.json'

  def finished():
    try:
      return set(json.loads(marker.read_text())['seeds']) <= set(finished_seeds)
    except (FileNotFoundError, ValueError, KeyError, TypeError):   # none, or not ours
      return False
  if hosts.on_process_0(finished):
    finish_group(output_dir, task_name)


def predict(params, task: TaskSetup, dev, config, mesh, pad_id):
  """Dev predictions in the dev set's order (batches formed by length, then restored)."""
  order = np.argsort(dev.lengths, kind='stable')
  out = []
  for start in range(0, len(order), config.eval_batch_size):
    indices = order[start:start + config.eval_batch_size]
    batch = glue_data.pad_batch(dev, indices, config.eval_batch_size, config.max_seq_len,
                                pad_id, bucket=config.length_buckets)
    batch.pop('labels'), batch.pop('weights')
    batch = global_batch(batch, mesh, task.rules)
    out.append(np.asarray(jax.device_get(task.predict_step(params, batch)))[:len(indices)])
  predictions = np.empty(len(dev), out[0].dtype if out else np.float32)
  predictions[order] = np.concatenate(out) if out else []
  return predictions


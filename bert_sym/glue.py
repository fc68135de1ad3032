r"""GLUE: fine-tune a pre-trained bert_sym checkpoint on every task and score the dev sets.

The paper's recipe (configs/glue.py): per task and seed, a fresh pooler + classifier
(N(0, 0.02)) on the pre-trained encoder, 5 epochs of AdamW at lr 1e-5 (10% warm-up, then
linear decay), batch 16, length 128; the dev score after the last epoch. The model (size,
attention variant, vocabulary) is read from the checkpoint's workdir, never retyped.

  # All nine tasks from TFDS glue/*, seeds 1-5 (the paper's table):
  python -m bert_sym.glue --checkpoint=WORKDIR --output_dir=/tmp/glue

  # Local files in the GLUE download-script layout, a few tasks, one seed:
  python -m bert_sym.glue --checkpoint=WORKDIR/checkpoints/600 --output_dir=/tmp/glue \
      --glue_dir=/path/to/glue_data --tasks=cola,mrpc,rte --seeds=1

  # GLUE vs pre-training step (every checkpoint in WORKDIR), and the first step that
  # reaches 95% of a reference score (the paper's "half the training steps"):
  python -m bert_sym.glue --checkpoint=WORKDIR --output_dir=/tmp/sweep --sweep \
      --seeds=1 --reference_score=79.36

  # The tiny-model CPU run reported in the README: the six complete tasks of a local
  # GLUE copy, one seed, 1 epoch, length 64 (the tiny model's pre-training length),
  # lr 1e-4 (a 128-wide model needs a larger step); about 10 min on 2 CPU cores.
  # Pre-train first: python -m bert_sym.train --config=configs/tiny.py --workdir=/tmp/tiny_glue_ckpt
  python -m bert_sym.glue --checkpoint=/tmp/tiny_glue_ckpt --output_dir=/tmp/tiny_glue \
      --glue_dir=../shared/data/glue --tasks=cola,sst2,mrpc,stsb,rte,wnli --seeds=1 \
      --config.epochs=1 --config.max_seq_len=64 --config.learning_rate=1e-4

Outputs in --output_dir, local or gs:// (each written to a temporary file, then renamed
over the old one; on gs:// the rename is a copy of the complete file, then a delete):
  glue_results.json   every metric per task and seed, GLUE per seed, mean +- std
  glue_results.md     the paper's table: one row per seed, then mean +- std
  predictions/<name>_seed<k>.tsv   idx, label, prediction per dev example
                                   (MNLI: mnli_m_seed<k>.tsv and mnli_mm_seed<k>.tsv)
  runs/<task>_seed<k>/             TensorBoard events (train loss, learning rate, dev
                                   metrics) and the same scalars in metrics.jsonl
With --sweep: step_<N>/ (the above per checkpoint) and glue_vs_step.{json,md,png}.

GLUE is the unweighted mean of MRPC, CoLA, MNLI-m, MNLI-mm, QQP, RTE, STS-B, QNLI, SST-2
(WNLI excluded); "GLUE full" adds WNLI. A task not run is shown as missing; then GLUE is not
reported, and a mean over the tasks present is reported instead, labelled "partial (k/9)".
STS-B's Pearson and Spearman are 0.0 (not NaN) when the model predicts one constant value.

Multi-host: every process fine-tunes; process 0 alone reads the output directory to decide
what is already finished (and lists the checkpoints of a sweep), then shares its decision,
so per-host local output directories cannot send the hosts down different paths.
"""

import dataclasses
import functools
import json
import io
import math
import os
from pathlib import Path
import time
import types
from typing import Any

from absl import app
from absl import flags
from absl import logging
from etils import epath
import flax.linen as nn
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import ml_collections
import numpy as np
import optax

from bert_sym import checkpoint as checkpoint_lib
from bert_sym import distributed
from bert_sym import glue_data
from bert_sym import glue_metrics
from bert_sym import model as model_lib
from bert_sym import metrics_writer
from bert_sym import optim
from bert_sym import sharding

_REFERENCE_FRACTION = 0.95


# ----------------------------------------------------------------------------------------
# Pre-trained model and tokenizer.
# ----------------------------------------------------------------------------------------


@dataclasses.dataclass
class Pretrained:
  config: ml_collections.ConfigDict    # the training config from {workdir}/config.json
  encoder: dict                        # host numpy BertForMaskedLM params['encoder']
  step_dir: str
  step: int


def load_pretrained(path) -> Pretrained:
  # A workdir means its latest step, which a running trainer can change between two
  # hosts' listings: process 0 picks it for everyone.
  step_dir = epath.Path(on_process_0(lambda: str(checkpoint_lib.resolve_step_dir(path))))
  config, params = checkpoint_lib.load_pretrained(step_dir)
  if 'encoder' not in params:
    raise ValueError(f'{step_dir} holds no BertForMaskedLM encoder (top-level params: '
                     f'{sorted(params)}).')
  return Pretrained(config, params['encoder'], str(step_dir), int(step_dir.name))


def check_vocab(pretrained: Pretrained, tokenizer: glue_data.WordPiece) -> None:
  """The tokenizer must emit exactly the ids the embedding table was trained on."""
  table_rows = pretrained.encoder['embeddings']['word_embeddings']['embedding'].shape[0]
  config_size = pretrained.config.model.vocab_size
  if not tokenizer.vocab_size == config_size == table_rows:
    raise ValueError(
        f'Vocabulary mismatch: the tokenizer ({tokenizer.vocab_file}) has '
        f'{tokenizer.vocab_size} tokens, but the checkpoint {pretrained.step_dir} has '
        f'model.vocab_size={config_size} and a {table_rows}-row embedding table. Pass the '
        'vocabulary it was pre-trained with: --config.vocab_path=PATH/vocab.txt.')


# ----------------------------------------------------------------------------------------
# Multi-host decisions.
# ----------------------------------------------------------------------------------------


def _broadcast_json_from_process_0(obj) -> Any:
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  primary = jax.process_index() == 0
  data = np.frombuffer(json.dumps(obj).encode(), np.uint8) if primary else None
  # broadcast_one_to_all needs one shape on every process: the length first, then bytes.
  size = int(multihost_utils.broadcast_one_to_all(
      np.array(data.size if primary else 0, np.int64)))
  buffer = data if primary else np.zeros(size, np.uint8)
  return json.loads(bytes(np.asarray(multihost_utils.broadcast_one_to_all(buffer))).decode())


def on_process_0(fn) -> Any:
  """`fn()` (JSON-serialisable) evaluated on process 0 only, returned on every process.

  For decisions read from the filesystem. Hosts may see different files (per-host local
  output dirs; a checkpoint finishing between two listings); hosts that decide differently
  enter different collectives, and the run hangs instead of failing. An error on process 0
  is raised on every process, for the same reason.
  """
  if jax.process_count() == 1:
    return fn()
  outcome, error = None, None
  if jax.process_index() == 0:
    try:
      outcome = {'value': fn()}
    except Exception as e:  # pylint: disable=broad-except
      error, outcome = e, {'error': f'{type(e).__name__}: {e}'}
  outcome = _broadcast_json_from_process_0(outcome)
  if error is not None:
    raise error
  if 'error' in outcome:
    raise RuntimeError(f'Process 0 failed, so process {jax.process_index()} stops too: '
                       f'{outcome["error"]}')
  return outcome['value']


# ----------------------------------------------------------------------------------------
# Mesh and shardings: data parallel over the batch; parameters follow the logical-axis
# rules of the training config (t5x style), so fsdp/tensor meshes work unchanged.
# ----------------------------------------------------------------------------------------


def global_batch(batch: dict, mesh, batch_size: int, rules) -> dict:
  """A batch every process built identically -> global arrays split over the batch axes.

  Each process keeps the rows of its own devices (a contiguous block per process), so
  multi-host runs feed each host's devices without any host reading another's data.
  """
  per_process = batch_size // jax.process_count()
  start = jax.process_index() * per_process
  local = {k: v[start:start + per_process] for k, v in batch.items()}
  return sharding.host_batch_to_global(local, mesh, batch_size, rules)


# ----------------------------------------------------------------------------------------
# Fine-tuning one (task, seed).
# ----------------------------------------------------------------------------------------


def _optimizer_config(config, total_steps):
  return ml_collections.ConfigDict(dict(
      learning_rate=config.learning_rate, b1=config.b1, b2=config.b2, eps=config.eps,
      weight_decay=config.weight_decay, grad_clip_norm=config.grad_clip_norm,
      # Hugging Face: warmup_steps = ceil(warmup_ratio * total_steps).
      warmup_steps=math.ceil(config.warmup_ratio * total_steps)))


def check_encoder_shapes(fresh_encoder, pretrained_encoder, step_dir):
  want = {jax.tree_util.keystr(p): tuple(x.shape)
          for p, x in jax.tree_util.tree_leaves_with_path(fresh_encoder)}
  have = {jax.tree_util.keystr(p): tuple(np.shape(x))
          for p, x in jax.tree_util.tree_leaves_with_path(pretrained_encoder)}
  if want != have:
    diff = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))
    raise ValueError(f'The encoder in {step_dir} does not match the model its config.json '
                     f'describes ({len(diff)} parameters differ, e.g. {diff[:3]}).')


def make_init(model, mesh, rules):
  """jitted key -> params, created directly sharded (the trainer's logical-axis rules)."""
  dummy = model_lib.dummy_inputs(1, 8)
  init = lambda k: nn.meta.unbox(model.init(k, *dummy)['params'])
  boxed = jax.eval_shape(lambda k: model.init(k, *dummy)['params'], jax.random.key(0))
  param_shardings = sharding.logical_to_shardings(boxed, mesh, rules)
  return jax.jit(init, out_shardings=param_shardings), param_shardings


def _loss(logits, labels, weights, regression):
  if regression:   # STS-B: MSE on the single output, as Hugging Face's num_labels=1 head
    per_example = jnp.square(logits[:, 0] - labels)
  else:
    per_example = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  # Padded rows of a last partial batch have weight 0: the loss is the mean over the real
  # examples, as with a smaller final batch.
  return jnp.sum(per_example * weights) / jnp.maximum(jnp.sum(weights), 1.0)


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


def _metric_writer(run_dir) -> metrics_writer.MetricWriter:
  """TensorBoard + metrics.jsonl for one (task, seed); a rerun replaces the old curves."""
  primary = jax.process_index() == 0
  if primary:
    run_dir = epath.Path(run_dir)
    run_dir.rmtree(missing_ok=True)
    run_dir.mkdir(parents=True)
  return metrics_writer.MetricWriter(run_dir, enabled=primary)


def _progress(total, desc, enabled):
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  return tqdm(total=total, desc=desc, unit='step', disable=not enabled, dynamic_ncols=True,
              mininterval=2.0)


@dataclasses.dataclass
class TaskSetup:
  """What every seed of one task shares: the model, the optimizer and the jitted steps.

  Built once per task so that seeds 2..5 reuse seed 1's compilations.
  """
  spec: glue_data.TaskSpec
  model: nn.Module
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  total_steps: int
  init: Any
  opt_init: Any
  param_shardings: Any
  rules: Any                 # the training config's logical-axis rules (batch included)
  train_step: Any = None
  predict_step: Any = None


def setup_task(pretrained, spec, num_train, config, mesh, rules) -> TaskSetup:
  model = model_lib.BertForSequenceClassification(pretrained.config.model,
                                                  num_labels=spec.num_labels)
  total_steps = num_train_steps(num_train, config.batch_size, config.epochs)
  tx, schedule = optim.make_optimizer(_optimizer_config(config, total_steps), total_steps)
  init, param_shardings = make_init(model, mesh, rules)
  # The trainer's rule, from the one place it lives: moments shard like their parameters.
  opt_shardings = sharding.opt_state_shardings(
      tx, jax.eval_shape(init, jax.random.key(0)), param_shardings, mesh)
  opt_init = jax.jit(tx.init, out_shardings=opt_shardings)
  task = TaskSetup(spec, model, tx, schedule, total_steps, init, opt_init, param_shardings,
                   rules)
  _compile_steps(task, (param_shardings, opt_shardings), mesh)
  return task


def _compile_steps(task: TaskSetup, state_shardings, mesh):
  model, tx, regression = task.model, task.tx, task.spec.is_regression

  def train_step(params, opt_state, batch, dropout_key, step):
    def loss_fn(p):
      logits = model.apply(
          {'params': p}, batch['input_ids'], batch['token_type_ids'], batch['attention_mask'],
          deterministic=False, rngs={'dropout': jax.random.fold_in(dropout_key, step)})
      return _loss(logits, batch['labels'], batch['weights'], regression)
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  def predict_step(params, batch):
    logits = model.apply({'params': params}, batch['input_ids'], batch['token_type_ids'],
                         batch['attention_mask'], deterministic=True)
    return logits[:, 0] if regression else jnp.argmax(logits, axis=-1)

  # Pinning the output shardings to the input ones keeps step 2's arguments identical to
  # step 1's, so jit compiles once per padded length instead of once more after step 1.
  replicated = sharding.replicated(mesh)
  task.train_step = jax.jit(
      train_step, donate_argnums=(0, 1),
      out_shardings=(*state_shardings, replicated))
  # Replicated predictions: every process can read them (and they are tiny).
  task.predict_step = jax.jit(predict_step, out_shardings=replicated)


def finetune(pretrained, task: TaskSetup, train, config, seed, mesh, tokenizer, tb,
             desc):
  """Fine-tunes one model from the checkpoint; returns its parameters."""
  init_key, dropout_key = jax.random.split(jax.random.key(seed))
  # Fresh pooler and classifier (N(0, 0.02), as the model initialises them); the encoder
  # is replaced by the pre-trained one.
  params = task.init(init_key)
  params['bert']['encoder'] = jax.device_put(
      jax.tree.map(lambda x: np.asarray(x, np.float32), pretrained.encoder),
      task.param_shardings['bert']['encoder'])
  opt_state = task.opt_init(params)

  batches = train_batches(len(train), config.batch_size, config.epochs, seed)
  losses = []
  with _progress(len(batches), desc, config.progress_bar and jax.process_index() == 0) as bar:
    for step, indices in enumerate(batches):
      batch = glue_data.pad_batch(train, indices, config.batch_size, config.max_seq_len,
                                  tokenizer.pad_id, bucket=config.length_buckets)
      batch = global_batch(batch, mesh, config.batch_size, task.rules)
      params, opt_state, loss = task.train_step(params, opt_state, batch, dropout_key, step)
      losses.append(loss)
      if (step + 1) % config.log_every_steps == 0 or step + 1 == len(batches):
        mean_loss = float(np.mean(jax.device_get(losses)))
        losses = []
        if not np.isfinite(mean_loss):
          raise FloatingPointError(f'{desc}: training loss is {mean_loss} at step {step + 1}; '
                                   'try a lower --config.learning_rate.')
        tb.write_scalars(step + 1, {'train/loss': mean_loss,
                                    'train/learning_rate': float(task.schedule(step))})
        bar.set_postfix(loss=f'{mean_loss:.4f}', refresh=False)
      bar.update(1)
  return params


def predict(params, task: TaskSetup, dev, config, mesh, pad_id):
  """Dev predictions in the dev set's order (batches formed by length, then restored)."""
  order = np.argsort(dev.lengths, kind='stable')
  out = []
  for start in range(0, len(order), config.eval_batch_size):
    indices = order[start:start + config.eval_batch_size]
    batch = glue_data.pad_batch(dev, indices, config.eval_batch_size, config.max_seq_len,
                                pad_id, bucket=config.length_buckets)
    batch.pop('labels'), batch.pop('weights')
    batch = global_batch(batch, mesh, config.eval_batch_size, task.rules)
    out.append(np.asarray(jax.device_get(task.predict_step(params, batch)))[:len(indices)])
  predictions = np.empty(len(dev), out[0].dtype if out else np.float32)
  predictions[order] = np.concatenate(out) if out else []
  return predictions


# ----------------------------------------------------------------------------------------
# Output files (atomic: a reader sees the old or the new file, never half of one).
# ----------------------------------------------------------------------------------------


def write_atomically(path, data: str | bytes) -> None:
  """Writes `data` (text as UTF-8) to a temporary file beside `path`, then renames it.

  Locally the rename is atomic; on gs:// it is a copy of the complete file and a delete,
  so a reader still never sees a partial object. Only process 0 writes: every process
  computes the same results.
  """
  if jax.process_index() != 0:
    return
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f'.{path.name}.tmp-{os.getpid()}')
  tmp.write_bytes(data.encode('utf-8') if isinstance(data, str) else data)
  tmp.replace(path)


def predictions_tsv(dev: glue_data.Encoded, predictions, regression) -> str:
  # 9 significant digits round-trip float32 exactly: scores recomputed from the file match.
  fmt = (lambda v: f'{float(v):.9g}') if regression else (lambda v: str(int(v)))
  rows = ['idx\tlabel\tprediction']
  rows += [f'{i}\t{fmt(l)}\t{fmt(p)}' for i, l, p in zip(dev.idx, dev.labels, predictions)]
  return '\n'.join(rows) + '\n'


def _fmt(value, digits=2):
  return '—' if value is None else f'{value:.{digits}f}'


def _glue_cell(row, key, total):
  if row.get(key) is not None:
    return _fmt(row[key])
  if row.get(f'{key}_partial') is not None:
    return f'{row[f"{key}_partial"]:.2f} (partial {len(row[f"{key}_tasks"])}/{total})'
  return '—'


def markdown_table(results: dict) -> str:
  names = glue_metrics.FULL_SCORES
  header = ['seed', 'GLUE', 'GLUE full'] + [glue_metrics.SCORE_TITLES[n] for n in names]
  lines = [f'# GLUE dev results: {results["checkpoint"]}', '',
           f'Model: {results["model"]["attention"]} attention, '
           f'{results["model"]["num_layers"]} layers x {results["model"]["hidden_size"]}; '
           f'pre-training step {results["step"]}. Fine-tuning: {results["recipe"]}.', '',
           '| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  summary = results['summary']
  for seed, row in summary['per_seed'].items():
    cells = [str(seed), _glue_cell(row, 'glue', 9), _glue_cell(row, 'glue_full', 10)]
    lines.append('| ' + ' | '.join(cells + [_fmt(row[n]) for n in names]) + ' |')
  stats = summary['over_seeds']

  def pm(s):
    if s['mean'] is None:
      return '—'
    return f'{s["mean"]:.2f}' if s['std'] is None else f'{s["mean"]:.2f} ± {s["std"]:.2f}'

  def glue_pm(key, total):
    if stats[key]['n']:
      return pm(stats[key])
    if stats[f'{key}_partial']['n']:
      first = next(iter(summary['per_seed'].values()))
      return f'{pm(stats[f"{key}_partial"])} (partial {len(first[f"{key}_tasks"])}/{total})'
    return '—'

  seeds = len(summary['per_seed'])
  cells = ['mean ± std' if seeds > 1 else 'mean (1 seed)', glue_pm('glue', 9),
           glue_pm('glue_full', 10)]
  lines.append('| ' + ' | '.join(cells + [pm(stats[n]) for n in names]) + ' |')
  cut = {k: results.get('config', {}).get(k, 0) for k in ('max_train_examples', 'max_eval_examples')}
  if any(cut.values()):
    lines += ['', '**Cut data, not comparable with the paper:** ' + '; '.join(
        f'only the first {n} {what} examples' for what, n in
        (('training', cut['max_train_examples']), ('dev-set', cut['max_eval_examples']))
        if n) + ' (config.max_train_examples / config.max_eval_examples, e.g. runlocal).']
  lines += ['', 'GLUE = unweighted mean of MRPC, CoLA, MNLI-m, MNLI-mm, QQP, RTE, STS-B, QNLI, '
            'SST-2 (WNLI excluded); GLUE full adds WNLI. "—" = not run. "partial (k/n)" = '
            'mean over the k tasks present only, not comparable to the paper\'s GLUE. '
            'Scores x100; std over seeds is the sample std (ddof=1).', '']
  return '\n'.join(lines)


def write_results(output_dir, results) -> None:
  results['summary'] = glue_metrics.summarize(
      {seed: {name: r['score'] for name, r in scores.items()}
       for seed, scores in _scores_by_seed(results).items()})
  write_atomically(epath.Path(output_dir) / 'glue_results.json',
                   json.dumps(results, indent=2, sort_keys=False) + '\n')
  write_atomically(epath.Path(output_dir) / 'glue_results.md', markdown_table(results))


def _scores_by_seed(results):
  by_seed = {seed: {} for seed in results['seeds']}
  for task in results['runs'].values():
    for seed, run in task.items():
      by_seed[int(seed)].update(run['scores'])
  return by_seed


# ----------------------------------------------------------------------------------------
# One checkpoint: every task, every seed.
# ----------------------------------------------------------------------------------------


def parse_seeds(seeds) -> list[int]:
  try:
    values = [int(s) for s in str(seeds).replace(' ', '').split(',') if s]
  except ValueError:
    raise ValueError(f'Seeds must be comma-separated integers, got {seeds!r}.') from None
  if not values:
    raise ValueError('No seed given.')
  return list(dict.fromkeys(values))


def recipe(config) -> dict:
  """The knobs that decide what one (task, seed) computes (not which ones run, or logging)."""
  ignored = ('tasks', 'seeds', 'progress_bar', 'log_every_steps', 'resume')
  return {k: v for k, v in config.to_dict().items() if k not in ignored}


def finished_runs(output_dir, step_dir, config) -> dict:
  """(task, seed) results of an earlier run of the same checkpoint and recipe, if any.

  Only runs whose prediction files are all present are reused, so a run killed while
  writing them is redone. Decided on process 0, which alone writes `output_dir`, and the
  same answer is returned on every process (see `on_process_0`).
  """
  def read():
    path = epath.Path(output_dir) / 'glue_results.json'
    if not config.resume or not path.exists():
      return []
    previous = json.loads(path.read_text())
    previous_recipe = recipe(ml_collections.ConfigDict(previous['config']))
    if previous.get('checkpoint') != step_dir or previous_recipe != recipe(config):
      logging.info('%s is from another checkpoint or recipe: not resuming from it.', path)
      return []
    done = []
    for task, seeds in previous['runs'].items():
      for seed, run in seeds.items():
        files = [epath.Path(output_dir) / 'predictions' / f'{n}_seed{seed}.tsv'
                 for n in run['scores']]
        if all(f.exists() for f in files):
          done.append([task, int(seed), run])
    return done
  return {(task, seed): run for task, seed, run in on_process_0(read)}


def run_glue(checkpoint: str, output_dir: str, config: ml_collections.ConfigDict,
             task_cache: dict | None = None) -> dict:
  """Fine-tunes and scores every (task, seed); rewrites the outputs after each one.

  `task_cache` (a dict the caller keeps) lets a sweep reuse the compiled steps of one
  checkpoint for the next: they depend on the model config and data size, not weights.
  """
  task_cache = {} if task_cache is None else task_cache
  specs = glue_data.parse_tasks(config.tasks)
  seeds = parse_seeds(config.seeds)
  pretrained = load_pretrained(checkpoint)
  tokenizer = glue_data.WordPiece(
      config.vocab_path or pretrained.config.get('data', {}).get('vocab_path', ''))
  check_vocab(pretrained, tokenizer)
  if config.max_seq_len > pretrained.config.model.max_position_embeddings:
    raise ValueError(f'config.max_seq_len={config.max_seq_len} exceeds the checkpoint\'s '
                     f'max_position_embeddings={pretrained.config.model.max_position_embeddings}.')

  if config.glue_dir:   # every file checked now, not after hours of training other tasks
    for spec in specs:
      for file_name in ['train.tsv'] + [d.tsv_file for d in spec.dev_sets]:
        glue_data.tsv_path(config.glue_dir, spec, file_name)

  # The trainer's mesh code and logical-axis rules: data parallel over the batch, and
  # parameters laid out as in pre-training (replicated unless fsdp/tensor > 1).
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.logical_rules(pretrained.config)
  sharding.check_batch_size(config.batch_size, mesh, rules, 'batch_size')
  sharding.check_batch_size(config.eval_batch_size, mesh, rules, 'eval_batch_size')

  output_dir = epath.Path(output_dir)
  model_cfg = pretrained.config.model
  results = {
      'checkpoint': pretrained.step_dir, 'step': pretrained.step,
      'model': {k: model_cfg[k] for k in ('attention', 'num_layers', 'hidden_size',
                                          'num_heads', 'vocab_size')},
      'recipe': (f'{config.epochs:g} epoch(s), lr {config.learning_rate:g}, batch '
                 f'{config.batch_size}, max length {config.max_seq_len}, warm-up '
                 f'{config.warmup_ratio:.0%}, weight decay {config.weight_decay:g}'),
      'config': config.to_dict(), 'devices': jax.device_count(), 'mesh': dict(mesh.shape),
      'seeds': seeds, 'tasks': [s.name for s in specs], 'runs': {},
  }
  done = finished_runs(output_dir, pretrained.step_dir, config)
  # Tasks finished earlier into this directory stay in the table, so tasks can be run one
  # command at a time (e.g. --tasks=mnli on a bigger machine) and still add up to GLUE.
  for (task, seed), run in done.items():
    if task not in results['tasks'] and seed in seeds:
      results['runs'].setdefault(task, {})[str(seed)] = run
  results['tasks'] += [t for t in results['runs'] if t not in results['tasks']]
  data_source = config.glue_dir or 'TFDS glue/*'
  logging.info('GLUE on %s (step %d) from %s: tasks %s, seeds %s', pretrained.step_dir,
               pretrained.step, data_source, results['tasks'], seeds)

  for spec in specs:
    results['runs'][spec.name] = {}
    for seed in seeds:
      if (spec.name, seed) in done:
        logging.info('%s seed %d: reusing the finished run in %s', spec.name, seed, output_dir)
        results['runs'][spec.name][str(seed)] = done[spec.name, seed]
    todo = [seed for seed in seeds if str(seed) not in results['runs'][spec.name]]
    if not todo:
      write_results(output_dir, results)
      continue
    load = lambda split, n: glue_data.load_split(  # pylint: disable=cell-var-from-loop
        spec, split, glue_dir=config.glue_dir, tfds_data_dir=config.tfds_data_dir).head(n)
    # Read every split before training so a missing dev file fails in seconds, not after
    # an hour of fine-tuning.
    train = glue_data.encode_examples(load('train', config.max_train_examples), tokenizer,
                                      config.max_seq_len)
    devs = {d.score_name: glue_data.encode_examples(load(d.score_name, config.max_eval_examples),
                                                    tokenizer, config.max_seq_len)
            for d in spec.dev_sets}
    cache_key = (json.dumps(pretrained.config.model.to_dict(), sort_keys=True),
                 json.dumps(recipe(config), sort_keys=True), spec.name, len(train))
    if cache_key not in task_cache:
      task_cache[cache_key] = setup_task(pretrained, spec, len(train), config, mesh, rules)
    task = task_cache[cache_key]
    check_encoder_shapes(jax.eval_shape(task.init, jax.random.key(0))['bert']['encoder'],
                         pretrained.encoder, pretrained.step_dir)
    for seed in todo:
      start = time.time()
      tb = _metric_writer(output_dir / 'runs' / f'{spec.name}_seed{seed}')
      params = finetune(pretrained, task, train, config, seed, mesh, tokenizer, tb,
                        desc=f'{spec.name} seed {seed}')
      steps = task.total_steps
      scores = {}
      for name, dev in devs.items():
        predictions = predict(params, task, dev, config, mesh, tokenizer.pad_id)
        scores[name] = glue_metrics.score(name, dev.labels, predictions)
        write_atomically(output_dir / 'predictions' / f'{name}_seed{seed}.tsv',
                         predictions_tsv(dev, predictions, spec.is_regression))
        tb.write_scalars(steps, {f'dev/{name}/{k}': v for k, v in scores[name].items()})
      tb.close()
      seconds = time.time() - start
      results['runs'][spec.name][str(seed)] = {
          'scores': scores, 'train_examples': len(train),
          'dev_examples': {n: len(d) for n, d in devs.items()},
          'train_steps': steps, 'seconds': round(seconds, 1)}
      write_results(output_dir, results)
      logging.info('%s seed %d: %s (%d steps, %.0f s)', spec.name, seed,
                   ', '.join(f'{n} {s["score"]:.2f}' for n, s in scores.items()), steps, seconds)
  return results


# ----------------------------------------------------------------------------------------
# Sweep: GLUE against pre-training step.
# ----------------------------------------------------------------------------------------


def checkpoint_steps(workdir) -> list[int]:
  """The finished checkpoint steps of a training workdir, as process 0 lists them.

  Finished as orbax decides it (checkpoint.finished_steps): a step the trainer is still
  writing (in place on gs://) is left out, so a sweep beside a running trainer never reads
  a partial checkpoint; a later sweep picks it up.
  """
  steps = on_process_0(lambda: checkpoint_lib.finished_steps(workdir))
  if not steps:
    raise FileNotFoundError(
        f'--sweep needs a training workdir with finished checkpoints in '
        f'{checkpoint_lib.checkpoint_dir(workdir)}/<step>/; found none.')
  return steps


def sweep_point(step, results) -> dict:
  stats = results['summary']['over_seeds']
  first = next(iter(results['summary']['per_seed'].values()))
  if stats['glue']['n']:
    kind, s = 'glue', stats['glue']
  else:
    kind, s = f'glue_partial ({len(first["glue_tasks"])}/9)', stats['glue_partial']
  return {'step': step, 'score': s['mean'], 'std': s['std'], 'score_kind': kind,
          'glue_full': stats['glue_full']['mean'],
          'tasks': {n: stats[n]['mean'] for n in glue_metrics.FULL_SCORES}}


def first_step_reaching(points, threshold):
  for p in points:
    if p['score'] is not None and p['score'] >= threshold:
      return p['step']
  return None


def run_sweep(workdir, output_dir, config, reference_score=None) -> dict:
  output_dir = epath.Path(output_dir)
  points, task_cache = [], {}
  for step in checkpoint_steps(workdir):
    step_dir = checkpoint_lib.checkpoint_dir(workdir) / str(step)
    # Each step has its own output directory, so an interrupted sweep resumes where it
    # stopped (config.resume) and a longer training run only adds its new steps.
    results = run_glue(str(step_dir), str(output_dir / f'step_{step:08d}'), config,
                       task_cache)
    points.append(sweep_point(step, results))
    write_sweep(output_dir, workdir, points, reference_score)
  return {'points': points}


def write_sweep(output_dir, workdir, points, reference_score):
  summary = {'workdir': str(workdir), 'points': points}
  lines = [f'# GLUE vs pre-training step: {workdir}', '',
           '| step | score | kind | ' + ' | '.join(
               glue_metrics.SCORE_TITLES[n] for n in glue_metrics.FULL_SCORES) + ' |',
           '|' + '---|' * (3 + len(glue_metrics.FULL_SCORES))]
  for p in points:
    lines.append(f'| {p["step"]} | {_fmt(p["score"])} | {p["score_kind"]} | ' + ' | '.join(
        _fmt(p['tasks'][n]) for n in glue_metrics.FULL_SCORES) + ' |')
  threshold = None
  if reference_score is not None:
    threshold = _REFERENCE_FRACTION * reference_score
    reached = first_step_reaching(points, threshold)
    summary.update(reference_score=reference_score, threshold=threshold,
                   first_step_reaching_threshold=reached)
    lines += ['', f'Reference score {reference_score:.2f}; 95% of it = {threshold:.2f}. '
              f'First step reaching it: {reached if reached is not None else "none yet"}.']
    if any(p['score_kind'] != 'glue' for p in points):
      lines.append('Warning: some scores are partial GLUE means (tasks missing); the '
                   'comparison with a full-GLUE reference is only indicative.')
  output_dir = epath.Path(output_dir)
  write_atomically(output_dir / 'glue_vs_step.json', json.dumps(summary, indent=2) + '\n')
  write_atomically(output_dir / 'glue_vs_step.md', '\n'.join(lines) + '\n')
  plot_sweep(output_dir / 'glue_vs_step.png', points, threshold)


def plot_sweep(path, points, threshold=None):
  """GLUE vs pre-training step as a PNG, with the 95%-of-reference line when given."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')   # no display on TPU VMs and CI
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  steps = [p['step'] for p in points if p['score'] is not None]
  scores = [p['score'] for p in points if p['score'] is not None]
  fig, ax = plt.subplots(figsize=(7, 4))
  ax.plot(steps, scores, 'o-', label='GLUE (dev)')
  if threshold is not None:
    ax.axhline(threshold, color='gray', linestyle='--', label=f'95% of reference ({threshold:.2f})')
  ax.set_xlabel('pre-training step')
  ax.set_ylabel('GLUE score')
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  png = io.BytesIO()   # rendered in memory, then written like every other output file
  fig.savefig(png, format='png', dpi=100)
  plt.close(fig)
  write_atomically(path, png.getvalue())


# ----------------------------------------------------------------------------------------
# Command line.
# ----------------------------------------------------------------------------------------


def define_flags() -> types.SimpleNamespace:
  """The command line, defined only when this module runs as the program.

  Defining flags at import would clash with `bert_sym.train`'s `--config` as soon as one
  process imports both (a notebook, the test suite).
  """
  return types.SimpleNamespace(
      multiprocess=distributed.define_flags(),
      config=config_flags.DEFINE_config_file(
          'config', str(Path(__file__).resolve().parents[1] / 'configs' / 'glue.py'),
          'GLUE fine-tuning config (configs/glue.py); override any knob with '
          '--config.KEY=VALUE.'),
      checkpoint=flags.DEFINE_string(
          'checkpoint', None, 'A training workdir (its latest checkpoint; with --sweep: all '
          'of them) or one step directory WORKDIR/checkpoints/STEP.'),
      output_dir=flags.DEFINE_string('output_dir', None, 'Where results are written.'),
      tasks=flags.DEFINE_string(
          'tasks', None, f'Comma-separated TFDS task names (default: config.tasks = '
          f'{",".join(glue_data.TASKS)}).'),
      seeds=flags.DEFINE_string(
          'seeds', None, 'Comma-separated seeds (default: config.seeds = 1,2,3,4,5).'),
      glue_dir=flags.DEFINE_string(
          'glue_dir', None, 'Local GLUE directory (CoLA/train.tsv, MNLI/dev_matched.tsv, '
          '...) instead of TFDS glue/*.'),
      sweep=flags.DEFINE_bool('sweep', False, 'Score every checkpoint step of the workdir.'),
      reference_score=flags.DEFINE_float(
          'reference_score', None, 'With --sweep: report the first step reaching 95% of '
          'this GLUE score (e.g. 79.36, the paper\'s final base pairwise score).'),
  )


def main(argv, cli):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if not cli.checkpoint.value or not cli.output_dir.value:
    raise app.UsageError('--checkpoint and --output_dir are required (see --help).')
  config = cli.config.value
  if cli.tasks.value is not None:
    config.tasks = cli.tasks.value
  if cli.seeds.value is not None:
    config.seeds = cli.seeds.value
  if cli.glue_dir.value is not None:
    config.glue_dir = cli.glue_dir.value
  if cli.reference_score.value is not None and not cli.sweep.value:
    raise app.UsageError('--reference_score only applies with --sweep.')
  metrics_writer.quiet_logs(flags.FLAGS['verbosity'].present)
  distributed.initialize(cli.multiprocess)   # every host runs this same command
  start = time.time()
  try:
    if cli.sweep.value:
      run_sweep(cli.checkpoint.value, cli.output_dir.value, config, cli.reference_score.value)
      table = 'glue_vs_step.md'
    else:
      run_glue(cli.checkpoint.value, cli.output_dir.value, config)
      table = 'glue_results.md'
  except (ValueError, FileNotFoundError, PermissionError) as e:
    # Our input checks (GlueDataError, a bad checkpoint or task) say what to fix.
    raise SystemExit(f'bert_sym.glue: error: {e}') from None
  except Exception as e:  # pylint: disable=broad-except
    if 'tensorflow_datasets' not in ''.join(_traceback_files(e)):
      raise
    # TFDS could not download or prepare glue/*: offline, or no prepared copy.
    raise SystemExit(
        f'bert_sym.glue: error: TFDS could not load GLUE ({type(e).__name__}: '
        f'{str(e)[:200]}). Fix: prepare it where there is internet (tfds build glue '
        '--data_dir=DIR) and pass --config.tfds_data_dir=DIR, or use a local copy in '
        'the GLUE download-script layout with --glue_dir=DIR.') from None
  if jax.process_index() == 0:   # the only process that writes results
    print((epath.Path(cli.output_dir.value) / table).read_text())
    print(f'GLUE finished in {time.time() - start:.0f} s; outputs in {cli.output_dir.value}')


def _traceback_files(error: BaseException) -> list[str]:
  tb, files = error.__traceback__, []
  while tb is not None:
    files.append(tb.tb_frame.f_code.co_filename)
    tb = tb.tb_next
  return files


if __name__ == '__main__':
  app.run(functools.partial(main, cli=define_flags()))

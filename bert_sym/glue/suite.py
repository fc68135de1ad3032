"""One checkpoint: every task x every seed (`bert_sym.glue.sweep` runs it on each step).

Resume works at two levels. A (task, seed) whose results and prediction files are in
--output_dir (same checkpoint and recipe) is reused; a task interrupted mid-training
continues from its last checkpoint in runs/<task>/checkpoints (bert_sym.glue.finetune).
"""

import dataclasses
import json
import os
import posixpath
import re
import time
from typing import Any

from absl import logging
from etils import epath
import jax
import ml_collections

from bert_sym import checkpoint as checkpoint_lib
from bert_sym import config_check
from bert_sym import files
from bert_sym import kernel_choice
from bert_sym import loop
from bert_sym import metrics_writer
from bert_sym import model as model_lib
from bert_sym import sharding
from bert_sym.glue import data as glue_data
from bert_sym.glue import finetune as finetune_lib
from bert_sym.glue import metrics as glue_metrics
from bert_sym.glue import report
from bert_sym.glue.reuse import (OTHER_SEEDS, finished_runs, parse_seeds, recipe,
                                 with_absolute_paths)

# parallel_seeds='auto' trains a task's seeds together from this many steps per seed, off
# CPU. Measured (benchmarks/RESULTS.md): on an H200 at bert-base together is 1.17x faster
# a step but compiles about 60 s longer, which about 10k steps repay; on a CPU together is
# never faster.
_PARALLEL_FROM_STEPS = 10_000


def parallel_seeds_mode(value) -> str:
  """config.parallel_seeds as 'true', 'false' or 'auto' (a command line gives strings)."""
  mode = str(value).lower()
  if mode not in ('true', 'false', 'auto'):
    raise ValueError(f'config.parallel_seeds must be true, false or auto, got {value!r}.')
  return mode


def seed_groups(seeds, mode: str, steps_per_seed: int, backend: str) -> list[list[int]]:
  """The seeds that train together, group by group (`parallel_seeds_mode`)."""
  together = mode == 'true' or (mode == 'auto' and backend != 'cpu'
                                and steps_per_seed >= _PARALLEL_FROM_STEPS)
  return [list(seeds)] if together else [[s] for s in seeds]


@dataclasses.dataclass
class _Session:
  """What every task of one `run_glue` call shares."""
  pretrained: finetune_lib.Pretrained
  tokenizer: glue_data.WordPiece
  config: ml_collections.ConfigDict
  mesh: jax.sharding.Mesh
  rules: Any
  output_dir: epath.Path
  seeds: list[int]
  parallel: str                     # parallel_seeds_mode
  results: dict                     # rewritten to glue_results.json after every group
  task_cache: dict
  preemption: loop.PreemptionFlag
  tasks: list[str]                  # asked for by this command, in order


def _check_outside_checkpoints(output_dir, step_dir: str) -> None:
  """Results written into the checkpoint, or beside it in a workdir's checkpoints/, would
  be deleted with it by the trainer's keep_last rotation (and mix into its step folders)."""
  normal = lambda p: str(p).rstrip('/') if '://' in str(p) else os.path.realpath(p)
  step = str(step_dir).rstrip('/')
  parent = posixpath.dirname(step)
  # Named before links are resolved: checkpoints/ may link to a larger disk.
  kept = normal(parent if posixpath.basename(parent) == 'checkpoints' else step)
  out = normal(output_dir)
  if out == kept or out.startswith(kept + '/'):
    raise ValueError(
        f'--output_dir={output_dir} lies inside {kept}, where the checkpoint GLUE reads is: '
        'the training run\'s keep_last rotation would delete the results with it. Fix: an '
        f'--output_dir outside it, e.g. {posixpath.dirname(kept)}/glue.')


def run_glue(checkpoint: str, output_dir: str, config: ml_collections.ConfigDict,
             task_cache: dict | None = None, preemption: loop.PreemptionFlag | None = None
             ) -> dict:
  """Fine-tunes and scores every (task, seed); rewrites the outputs after each group.

  `task_cache` (a dict the caller keeps) lets a sweep reuse the compiled steps of one
  checkpoint for the next: they depend on the model config and data size, not weights.
  Raises loop.Preempted after saving when stopped by SIGTERM / Ctrl-C. The signals are
  caught from the start (a SIGTERM while the checkpoint loads killed the process, exit
  143, which launchers do not requeue), by `preemption` when a sweep passes its own (one
  for all its steps), and are the process's again when this returns or raises.
  """
  if preemption is not None:
    return _run_glue(checkpoint, output_dir, config, task_cache, preemption)
  with loop.PreemptionFlag() as preemption:
    return _run_glue(checkpoint, output_dir, config, task_cache, preemption)


def _run_glue(checkpoint, output_dir, config, task_cache, preemption) -> dict:
  config_check.check_glue(config)
  config = with_absolute_paths(config)
  checkpoint_lib.check_same_config_on_every_host(config, 'GLUE run')
  specs = glue_data.parse_tasks(config.tasks)
  seeds = parse_seeds(config.seeds)
  parallel = parallel_seeds_mode(config.get('parallel_seeds', 'auto'))   # typos fail now
  # Each host reads its own files (vocabulary, data) and --output_dir: one that fails them
  # stops every host, instead of leaving the others in finished_runs' collective.
  with checkpoint_lib.checked_on_every_host('GLUE run'):
    pretrained, tokenizer = _checkpoint_and_tokenizer(checkpoint, config, parallel)
    pairs = [s.name for s in specs if len(s.tfds_text_keys) == 2]
    if pairs and pretrained.config.model.type_vocab_size < 2:   # type 1 would look up NaN
      raise ValueError(f'{pretrained.step_dir} has model.type_vocab_size='
                       f'{pretrained.config.model.type_vocab_size}: no segment embedding for '
                       f'the second sentence of {", ".join(pairs)}. Fix: --tasks without them.')
    check_data(config, specs)
    mesh, rules = _mesh_and_rules(config, pretrained)
    # The inputs are checked (a refused run leaves no folder); data and compiles come next.
    _check_outside_checkpoints(output_dir, pretrained.step_dir)
    output_dir = files.check_writable(output_dir, f'--output_dir={output_dir}')
  # One command per output directory: two at once each rewrote glue_results.json with its
  # own runs alone (the other's scores lost), and each set the other's predictions aside.
  with checkpoint_lib.workdir_lock(output_dir, lock_file=checkpoint_lib.GLUE_LOCK_FILE,
                                   kind='GLUE run', flag='--output_dir', shared=False):
    return _run_locked(output_dir, config, task_cache, preemption, pretrained, tokenizer,
                       mesh, rules, seeds, specs, parallel)


def _run_locked(output_dir, config, task_cache, preemption, pretrained, tokenizer, mesh,
                rules, seeds, specs, parallel) -> dict:
  """Every (task, seed) of `specs` x `seeds` not finished before, with the lock held."""
  results = _new_results(pretrained, config, mesh, seeds, specs)
  _keep_finished_runs(results, finished_runs(output_dir, pretrained.step_dir, config), seeds)
  logging.info('GLUE on %s (step %d) from %s: tasks %s, seeds %s', pretrained.step_dir,
               pretrained.step, config.glue_dir or 'TFDS glue/*', results['tasks'], seeds)
  session = _Session(pretrained, tokenizer, config, mesh, rules, output_dir, seeds,
                     parallel, results, {} if task_cache is None else task_cache, preemption,
                     [s.name for s in specs])
  for spec in specs:
    _run_task(session, spec)
  return results


def _checkpoint_and_tokenizer(checkpoint, config, parallel: str):
  """The pre-trained encoder and the tokenizer it was trained with, checked together."""
  pretrained = finetune_lib.load_pretrained_encoder(checkpoint)
  for key in ('dropout_rate', 'attention_dropout_rate'):   # GLUE's recipe, not pre-training's
    if key in config:
      pretrained.config.model[key] = config[key]
  pretrained.config.model.attention_impl = _glue_kernel(config, pretrained.config.model,
                                                        parallel)
  tokenizer = glue_data.WordPiece(
      config.vocab_path or pretrained.config.get('data', {}).get('vocab_path', ''),
      cache_dir=config.get('tokens_cache_dir', ''))
  finetune_lib.check_vocab(pretrained, tokenizer)
  max_positions = pretrained.config.model.max_position_embeddings
  if config.max_seq_len > max_positions:
    raise ValueError(f'config.max_seq_len={config.max_seq_len} exceeds the checkpoint\'s '
                     f'max_position_embeddings={max_positions}: it has no position embedding '
                     f'past that. Fix: --config.max_seq_len={max_positions} (or less).')
  return pretrained, tokenizer


def _glue_kernel(config, model_cfg, parallel: str) -> str:
  """config.attention_impl, checked now against this backend and GLUE's lengths.

  The kernel is how attention is computed, not what the checkpoint learned, so GLUE
  chooses its own instead of the one named in pre-training: a checkpoint trained with
  splash on a TPU fine-tunes on a GPU, and on a TPU the short length buckets (16-64
  tokens), which splash cannot tile, run xla under 'auto'."""
  impl = config.get('attention_impl', 'auto')
  if impl not in kernel_choice.IMPLEMENTATIONS:
    raise ValueError(f'GLUE config.attention_impl={impl!r}; use one of '
                     f'{kernel_choice.IMPLEMENTATIONS}.')
  if impl == 'auto' and kernel_choice.current_backend() == 'gpu':
    # Not cuDNN, whose attention-dropout masks come from its own generator, not the seed's
    # key (seeds trained together would share them), and whose batching rule cannot trace
    # the vmap over seeds trained together (jax 0.10: "cannot reshape array of shape (2,)
    # into shape (6,)", its sequence lengths left unbatched). xla does both.
    impl = 'xla'
  if impl == 'cudnn' and parallel != 'false':
    raise ValueError("GLUE config.attention_impl='cudnn' cannot train seeds together (JAX's "
                     'cuDNN attention does not batch over their vmap). Fix: '
                     '--config.parallel_seeds=false, or --config.attention_impl=auto.')
  shortest = glue_data.bucket_length(1, config.max_seq_len) if config.length_buckets \
      else config.max_seq_len
  resolve = lambda seq_len: kernel_choice.resolve_implementation(
      impl, training_dropout=model_cfg.attention_dropout_rate > 0, return_weights=False,
      seq_len=seq_len, dtype=model_lib.compute_dtype(model_cfg.dtype),
      scanned=bool(model_cfg.get('scan_layers', False)),
      head_dim=model_cfg.hidden_size // model_cfg.num_heads)
  try:
    resolve(shortest)
  except ValueError as e:   # its first clause says why; its fixes are pre-training's
    why = re.split(r'[.;] ', str(e))[0].replace('model.attention_impl', 'attention_impl')
    try:   # only the short length buckets (splash tiles max_seq_len, not 16-64)
      unbucketed = shortest != config.max_seq_len and bool(resolve(config.max_seq_len))
    except ValueError:
      unbucketed = False
    raise ValueError(f'GLUE config.attention_impl={impl!r} cannot run here: {why}. Fix: '
                     '--config.attention_impl=auto (the default) or xla' + (
                         ', or --config.length_buckets=false (every batch padded to '
                         'max_seq_len)' if unbucketed else '') + '.') from None
  return impl


def check_data(config, specs) -> None:
  """Every task's data checked now, not after hours of training other tasks: its local
  files, or that TFDS has it prepared or can download it."""
  for spec in specs:
    if config.glue_dir:
      for file_name in ['train.tsv'] + [d.tsv_file for d in spec.dev_sets]:
        glue_data.check_tsv(glue_data.tsv_path(config.glue_dir, spec, file_name), spec)
    else:
      glue_data.check_tfds_can_load(spec, config.get('tfds_data_dir', ''))


def _mesh_and_rules(config, pretrained):
  """The trainer's mesh code and logical-axis rules: data parallel over the batch, and
  parameters laid out as in pre-training (replicated unless fsdp/tensor > 1)."""
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.logical_rules(pretrained.config)
  sharding.check_batch_size(config.batch_size, mesh, rules, 'batch_size')
  sharding.check_batch_size(config.batch_size // config.get('grad_accum_steps', 1), mesh,
                            rules, 'batch_size / grad_accum_steps')
  sharding.check_batch_size(config.eval_batch_size, mesh, rules, 'eval_batch_size')
  return mesh, rules


def _new_results(pretrained, config, mesh, seeds, specs) -> dict:
  model_cfg = pretrained.config.model
  return {
      'checkpoint': pretrained.step_dir, 'step': pretrained.step,
      'checkpoint_written': checkpoint_lib.written_at(pretrained.step_dir),
      # Which start of the trainer wrote it (checkpoint.lineage_of): the sweep's history.
      'checkpoint_run': checkpoint_lib.run_id_of(pretrained.step_dir),
      'model': {k: model_cfg[k] for k in ('attention', 'num_layers', 'hidden_size',
                                          'num_heads', 'vocab_size')},
      'recipe': (f'{config.epochs:g} epoch(s), lr {config.learning_rate:g}, batch '
                 f'{config.batch_size}, max length {config.max_seq_len}, warm-up '
                 f'{config.warmup_ratio:.0%}, weight decay {config.weight_decay:g}'),
      'config': config.to_dict(), 'devices': jax.device_count(), 'mesh': dict(mesh.shape),
      'seeds': seeds, 'tasks': [s.name for s in specs], 'runs': {},
  }


def _keep_finished_runs(results, done, seeds) -> None:
  """Every run finished earlier into this directory goes into `results` now, before any
  task starts: glue_results.json is rewritten after each group, and a run added only when
  its task is reached would be lost from it (and fine-tuned again) by a stop before then.

  Tasks not requested stay in the table, so tasks can be run one command at a time (e.g.
  --tasks=mnli on a bigger machine) and still add up to GLUE. Seeds not requested are kept
  the same way, but under OTHER_SEEDS, outside the table and its mean over seeds (which are
  over the requested seeds): a later command asking for them reuses them. They are not set
  aside (set_aside_results): that is for results this checkpoint and recipe cannot reuse.
  """
  for (task, seed), run in done.items():
    kept = results['runs'] if seed in seeds else results.setdefault(OTHER_SEEDS, {})
    kept.setdefault(task, {})[str(seed)] = run
  results['tasks'] += [t for t in results['runs'] if t not in results['tasks']]


def _run_task(session: _Session, spec) -> None:
  """Every seed of one task not finished before: fine-tuned group by group, then scored."""
  runs = session.results['runs'].setdefault(spec.name, {})   # reused runs: already in
  for seed in session.seeds:
    if str(seed) in runs:
      logging.info('%s seed %d: reusing the finished run in %s', spec.name, seed,
                   session.output_dir)
  todo = [seed for seed in session.seeds if str(seed) not in runs]
  if not todo:
    _write_results(session)
    finetune_lib.discard_finished_group(session.output_dir, spec.name,
                                        [int(seed) for seed in runs])
    return
  # Every split is read before training, so a missing dev file fails in seconds, not
  # after an hour of fine-tuning.
  train = _encoded_split(session, spec, 'train', session.config.max_train_examples)
  devs = {d.score_name: _encoded_split(session, spec, d.score_name,
                                       session.config.max_eval_examples)
          for d in spec.dev_sets}
  task = _task_setup(session, spec, len(train))
  identity = {'checkpoint': session.pretrained.step_dir, 'recipe': recipe(session.config),
               'checkpoint_written': checkpoint_lib.written_at(session.pretrained.step_dir),
              'train_examples': len(train)}
  for group in seed_groups(todo, session.parallel, task.total_steps, jax.default_backend()):
    start = time.time()
    trained = finetune_lib.finetune_group(
        session.pretrained, task, train, session.config, group, session.mesh,
        session.tokenizer.pad_id, session.output_dir, identity, session.preemption,
        length_seeds=session.seeds)
    seconds = time.time() - start
    for seed, params in zip(group, trained):
      runs[str(seed)] = _scored_run(session, task, params, seed, group, train, devs, seconds)
    _write_results(session)
    finetune_lib.finish_group(session.output_dir, spec.name)


def _write_results(session: _Session) -> None:
  """glue_results.* as they stand, 'unfinished' naming the (task, seeds) this command
  asked for that have no scores yet: the files are rewritten after every group, and those
  of a run killed part-way read as a finished run of fewer tasks or seeds."""
  runs = session.results['runs']
  unfinished = {t: [s for s in session.seeds if str(s) not in runs.get(t, {})]
                for t in session.tasks}
  session.results['unfinished'] = {t: seeds for t, seeds in unfinished.items() if seeds}
  report.write_results(session.output_dir, session.results)


def _encoded_split(session: _Session, spec, split, limit):
  examples = glue_data.load_split(spec, split, glue_dir=session.config.glue_dir,
                                  tfds_data_dir=session.config.tfds_data_dir)
  return glue_data.encode_examples(examples.head(limit), session.tokenizer,
                                   session.config.max_seq_len,
                                   session.config.get('pair_truncation', 'hf'))


def _task_setup(session: _Session, spec, num_train) -> finetune_lib.TaskSetup:
  """The task's compiled steps, from the cache when a sweep's earlier checkpoint built them."""
  key = (json.dumps(session.pretrained.config.model.to_dict(), sort_keys=True),
         json.dumps(recipe(session.config), sort_keys=True), spec.name, num_train)
  if key not in session.task_cache:
    session.task_cache[key] = finetune_lib.setup_task(
        session.pretrained, spec, num_train, session.config, session.mesh, session.rules)
  return session.task_cache[key]


def _scored_run(session: _Session, task, params, seed, group, train, devs, seconds) -> dict:
  scores = _score(params, task, devs, session.config, session.mesh, session.tokenizer.pad_id,
                  session.output_dir, seed)
  logging.info('%s seed %d: %s (%d steps, %.0f s)', task.spec.name, seed,
               ', '.join(f'{n} {s["score"]:.2f}' for n, s in scores.items()),
               task.total_steps, seconds)
  return {'scores': scores, 'train_examples': len(train),
          'dev_examples': {n: len(d) for n, d in devs.items()},
          'train_steps': task.total_steps, 'seconds': round(seconds, 1),
          'padded_with_seeds': session.seeds,   # the batch lengths (config.length_buckets)
          **({'trained_with_seeds': group} if len(group) > 1 else {})}


def _score(params, task, devs, config, mesh, pad_id, output_dir, seed) -> dict:
  """Dev predictions and scores of one seed; predictions/<name>_seed<k>.tsv written."""
  writer = metrics_writer.MetricWriter(
      output_dir / 'runs' / f'{task.spec.name}_seed{seed}', enabled=jax.process_index() == 0)
  scores = {}
  for name, dev in devs.items():
    predictions = finetune_lib.predict(params, task, dev, config, mesh, pad_id)
    scores[name] = glue_metrics.score(name, dev.labels, predictions)
    report.write_on_process_0(output_dir / 'predictions' / f'{name}_seed{seed}.tsv',
                            report.predictions_tsv(dev, predictions, task.spec.is_regression))
    writer.write_scalars(task.total_steps,
                         {f'dev/{name}/{k}': v for k, v in scores[name].items()})
  writer.close()
  return scores

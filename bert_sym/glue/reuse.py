"""What an earlier GLUE run left in --output_dir: reused when it is what this run would
compute, set aside (moved, never overwritten) when it is not."""

import itertools
import json
import time

from absl import logging
from etils import epath
import ml_collections

from bert_sym import checkpoint as checkpoint_lib
from bert_sym import config_check
from bert_sym import files
from bert_sym.glue import data as glue_data
from bert_sym.glue import hosts

# Knobs that decide what a (task, seed) computes are compared on resume; these do not.
_NOT_RECIPE = ('tasks', 'seeds', 'progress_bar', 'log_every_steps', 'resume',
               'parallel_seeds', 'checkpoint_every_steps', 'on_nonfinite',
               'max_consecutive_nonfinite', 'peak_flops_per_device', 'tokens_cache_dir')
# Keys added after outputs were written without them: their value then is this default
# (attention_impl: those runs used the checkpoint's kernel, the same math as auto's;
# pair_truncation: Google BERT's rule was the only one, so such results are not reused).
_DEFAULTS_OF_NEWER_KEYS = {'grad_accum_steps': 1, 'attention_impl': 'auto',
                           'pair_truncation': 'bert'}
# glue_results.json key of the finished runs of seeds not requested this time (see
# `_keep_finished_runs`).
OTHER_SEEDS = 'runs_of_other_seeds'


def parse_seeds(seeds) -> list[int]:
  try:
    # Spaces around a seed are fine; inside one ('1 2') they are not seed 12.
    values = [int(s) for s in str(seeds).split(',') if s.strip()]
  except ValueError:
    raise ValueError(f'Seeds must be comma-separated integers, got {seeds!r}.') from None
  if not values:
    raise ValueError('No seed given.')
  if min(values) < 0:   # numpy's generators take none; found now, not after tokenising
    raise ValueError(f'Seeds must be non-negative integers, got {seeds!r}.')
  return list(dict.fromkeys(values))


def recipe(config) -> dict:
  """The knobs that decide what one (task, seed) computes (not which ones run, or logging).
  Paths compare as absolute ones: DIR and DIR/ are the same data."""
  values = dict(_DEFAULTS_OF_NEWER_KEYS, **config.to_dict())
  values.update({k: config_check.absolute_path(values[k]) for k in _PATHS if values.get(k)})
  return {k: v for k, v in values.items() if k not in _NOT_RECIPE}


_PATHS = ('glue_dir', 'tfds_data_dir', 'vocab_path')


def with_absolute_paths(config) -> ml_collections.ConfigDict:
  """A copy whose local paths are absolute, as the results record them: a relative path
  means other data from another directory."""
  config = config.copy_and_resolve_references()
  for key in _PATHS:
    if config.get(key):
      config[key] = config_check.absolute_path(config[key])
  return config


def finished_runs(output_dir, step_dir, config) -> dict:
  """(task, seed) results of an earlier run of the same checkpoint and recipe, if any.

  Only runs whose prediction files are all present are reused, so a run killed while
  writing them is redone. Decided on process 0, which alone writes `output_dir`, and the
  same answer is returned on every process (see `hosts.on_process_0`).
  """
  def read():
    path = epath.Path(output_dir) / 'glue_results.json'
    if not path.exists():
      _set_aside_stray_predictions(output_dir, config, {})
      return []
    try:
      previous = json.loads(path.read_text())
      previous_recipe = recipe(ml_collections.ConfigDict(previous['config']))
      candidates = [(task, int(seed),
                     dict(run, padded_with_seeds=_padded_with(run, previous)))
                    for runs in (previous['runs'], previous.get(OTHER_SEEDS, {}))
                    for task, seeds in runs.items() for seed, run in seeds.items()
                    if run['scores']]   # (KeyError: not a run this tool wrote)
    except (ValueError, KeyError, TypeError, AttributeError) as e:   # edited by hand?
      raise ValueError(f'{path} is not results this tool wrote ({type(e).__name__}: {e}). '
                       'Fix: move it (and predictions/) away, or use another '
                       '--output_dir.') from None
    current_recipe = recipe(config)
    if (previous.get('checkpoint') != step_dir or
        previous.get('checkpoint_written') != checkpoint_lib.written_at(step_dir)):
      # The same path rewritten (a rebuilt workdir) is another checkpoint too.
      set_aside_results(output_dir, f'another checkpoint ({previous.get("checkpoint")}, '
                        f'written {_when(previous.get("checkpoint_written"))})')
      return []
    if previous_recipe != current_recipe:
      changed = sorted(k for k in set(previous_recipe) | set(current_recipe)
                       if previous_recipe.get(k) != current_recipe.get(k))
      set_aside_results(output_dir, f'another recipe ({", ".join(changed)} differ)')
      return []
    if not config.resume:
      set_aside_results(output_dir, 'an earlier run (config.resume=False)')
      return []
    _set_aside_stray_predictions(output_dir, config, previous)
    seeds = parse_seeds(config.seeds)
    # Only runs this command trains again can be stale: a task not asked for now keeps its
    # runs (in the table) for the later command whose seed list they were padded with.
    tasks = {spec.name for spec in glue_data.parse_tasks(config.tasks)}
    done, stale = [], []
    for task, seed, run in candidates:
      predictions = [epath.Path(output_dir) / 'predictions' / f'{n}_seed{seed}.tsv'
                     for n in run['scores']]
      if not all(f.exists() for f in predictions):
        continue
      padded_with = run['padded_with_seeds']   # None: not recorded, nothing to compare
      if (config.length_buckets and task in tasks and seed in seeds and padded_with is not None
          and set(padded_with) != set(seeds)):   # (the padding sorts them: order is free)
        stale.append((task, seed))   # other padding, other dropout masks: not this run
      else:
        done.append([task, seed, run])
    if stale:
      set_aside_results(output_dir, 'runs padded to the lengths of another seed list '
                        '(config.length_buckets pads every seed of a task to the longest '
                        'of all its seeds; --config.length_buckets=False does not)',
                        only=stale, previous=previous)
    return done
  return {(task, seed): run for task, seed, run in hosts.on_process_0(read)}


def _padded_with(run: dict, results: dict) -> list[int] | None:
  """The seed list whose batch lengths padded this run (all the seeds of its command);
  a run written before this was recorded: the seeds of the file's own command."""
  seeds = run.get('padded_with_seeds', results.get('seeds'))
  return None if seeds is None else [int(s) for s in seeds]


def set_aside_results(output_dir, whose: str, only=None, previous=None) -> None:
  """Moves the results of an earlier run that this one will not reuse (glue_results.*,
  predictions/, the runs/<task>_seed<k>/ curves) into output_dir/replaced-<time>/, so that
  a rerun with another checkpoint or recipe never overwrites them. glue_results.json moves
  last: after a crash midway the next run still finds it and moves the rest.

  `only`: the (task, seed) runs of `previous` (glue_results.json as read) to move, the
  others staying in place; the moved runs' rows are copied into
  replaced-<time>/glue_results.json first.
  """
  output_dir = epath.Path(output_dir)
  aside = _aside_dir(output_dir)
  results_file = output_dir / 'glue_results.json'
  if only is None:
    curves = sorted(output_dir.glob('runs/*_seed*'))
    predictions = sorted(output_dir.glob('predictions/*.tsv'))
    last = [output_dir / 'glue_results.md', results_file]
  else:
    moved = {}
    sections = (previous['runs'], previous.get(OTHER_SEEDS, {}))
    for task, seed in only:
      run = next(runs[task][str(seed)] for runs in sections if str(seed) in runs.get(task, {}))
      moved.setdefault(task, {})[str(seed)] = run
    aside_results = {k: v for k, v in previous.items() if k != OTHER_SEEDS}
    files.write_atomically(aside / 'glue_results.json',
                           json.dumps(dict(aside_results, runs=moved), indent=2))
    curves = [output_dir / 'runs' / f'{task}_seed{seed}' for task, seed in only]
    predictions = [output_dir / 'predictions' / f'{n}_seed{seed}.tsv'
                   for task, seed in only for n in moved[task][str(seed)]['scores']]
    last = []
  _move(curves + predictions + last, output_dir, aside)
  logging.warning('%s held the GLUE results of %s; they are kept in %s, and this run '
                  'writes new ones.', output_dir, whose, aside)


def _set_aside_stray_predictions(output_dir, config, previous: dict) -> None:
  """Moves prediction files that no run of `previous` (glue_results.json as read) names
  and that this command will not write again into replaced-<time>/. A run killed between
  its predictions and glue_results.json left them, and they stayed, looking final, beside
  the results of another command (other seeds, another checkpoint)."""
  output_dir = epath.Path(output_dir)
  named = {f'{name}_seed{seed}.tsv'
           for runs in (previous.get('runs', {}), previous.get(OTHER_SEEDS, {}))
           for seeds in runs.values() for seed, run in seeds.items()
           for name in run.get('scores', {})}
  named |= {f'{dev.score_name}_seed{seed}.tsv' for spec in glue_data.parse_tasks(config.tasks)
            for dev in spec.dev_sets for seed in parse_seeds(config.seeds)}
  stray = [p for p in sorted(output_dir.glob('predictions/*.tsv')) if p.name not in named]
  if stray:
    aside = _aside_dir(output_dir)
    _move(stray, output_dir, aside)
    logging.warning('%s held prediction files that no results name (%s: a run stopped '
                    'before writing its glue_results.json); they are kept in %s.',
                    output_dir, ', '.join(p.name for p in stray), aside)


def _aside_dir(output_dir: epath.Path) -> epath.Path:
  stamp = int(time.time())   # and a number when a set-aside of this second is there
  return next(d for d in (output_dir / f'replaced-{stamp}{f"-{n}" if n else ""}'
                          for n in itertools.count()) if not d.exists())


def _move(paths, output_dir: epath.Path, aside: epath.Path) -> None:
  for path in paths:
    if path.exists():
      target = aside / path.relative_to(output_dir)
      target.parent.mkdir(parents=True, exist_ok=True)
      path.rename(target)


def _when(nanoseconds) -> str:
  """Orbax's commit time (ns since the epoch) as a date: a 19-digit number told nobody when."""
  if not isinstance(nanoseconds, int):
    return 'at an unknown time'
  return time.strftime('at %Y-%m-%d %H:%M:%S UTC', time.gmtime(nanoseconds / 1e9))

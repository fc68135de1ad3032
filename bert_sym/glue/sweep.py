"""The sweep: GLUE on every checkpoint step of a pre-training workdir (the paper's "GLUE
against pre-training step"), one `suite.run_glue` output directory per step."""

import json
import sys

from etils import epath
import ml_collections

from bert_sym import checkpoint as checkpoint_lib
from bert_sym import loop
from bert_sym.glue import data as glue_data
from bert_sym.glue import hosts
from bert_sym.glue import report
from bert_sym.glue import suite


def checkpoint_steps(workdir) -> list[int]:
  """The finished checkpoint steps of a training workdir, as process 0 lists them.

  Finished as orbax decides it (checkpoint.finished_steps): a step the trainer is still
  writing (in place on gs://) is left out, so a sweep beside a running trainer never reads
  a partial checkpoint; a later sweep picks it up.
  """
  steps = hosts.on_process_0(lambda: checkpoint_lib.finished_steps(workdir))
  if not steps:
    raise FileNotFoundError(
        f'--sweep needs a training workdir with finished checkpoints in '
        f'{checkpoint_lib.checkpoint_dir(workdir)}/<step>/; found none.')
  return steps


def scored_steps_gone(workdir, output_dir, config, present) -> dict[int, dict]:
  """{step: results} of steps an earlier sweep scored whose checkpoints are gone since
  (rotated away by keep_last while the trainer ran on): their results are on disk, for
  this workdir, recipe, tasks and seeds, so the curve keeps them. Not a step of another
  training run of the same path (`_other_runs_steps`)."""
  tasks = {s.name for s in glue_data.parse_tasks(config.tasks)}
  seeds, recipe = set(suite.parse_seeds(config.seeds)), suite.recipe(config)
  earlier = {}
  for path in sorted(epath.Path(output_dir).glob('step_*/glue_results.json')):
    step = path.parent.name.removeprefix('step_')
    try:
      earlier[int(step)] = json.loads(path.read_text())
    except ValueError:   # not a finished sweep point (or not a step directory): left out
      continue
  kept, unfinished = {}, []
  for step, results in earlier.items():
    if step in present:
      continue
    step_dir = checkpoint_lib.checkpoint_dir(workdir) / str(step)
    try:   # the order of tasks and seeds does not matter; tasks kept from other commands
      same = (results['checkpoint'] == str(step_dir) and tasks <= set(results['tasks'])
              and seeds == set(results['seeds'])
              and suite.recipe(ml_collections.ConfigDict(results['config'])) == recipe)
      # 'tasks' lists what was asked from the first group on; 'runs' what was scored.
      scored = all(str(seed) in results['runs'].get(task, {}) for task in tasks
                   for seed in seeds)
    except (KeyError, TypeError, AttributeError):   # not a finished sweep point: left out
      continue
    if same and scored:
      kept[step] = results
    elif same:
      unfinished.append(step)
  if unfinished:
    print(f'WARNING: GLUE sweep: step(s) {", ".join(map(str, unfinished))} were not fully '
          'scored when the sweep stopped, and their checkpoints are gone since: left off '
          'the curve.', file=sys.stderr, flush=True)
  others = _other_runs_steps(workdir, present, kept)
  return {step: results for step, results in kept.items() if step not in others}


def _other_runs_steps(workdir, present, gone) -> set[int]:
  """The `gone` steps that are not the history of the training run whose steps are
  `present`: each result names the start of the trainer that wrote its checkpoint, and the
  newest present step's lineage says which start wrote each step of its history
  (checkpoint.lineage_of). A step diverged or damaged and set aside, then trained again,
  or one of a workdir deleted and trained anew, was written by a start that lineage does
  not hold there. A step set aside and not trained again (yet) is in damaged_checkpoints/:
  the trainer disowned that model, so its point goes too (told by its run id, or by
  orbax's commit time where its JSON item is what was damaged)."""
  ckpt_dir = checkpoint_lib.checkpoint_dir(workdir)
  lineages = (checkpoint_lib.lineage_of(ckpt_dir / str(s)) for s in sorted(present)[::-1])
  lineage = next(filter(None, lineages), None)
  damaged_dir = ckpt_dir.parent / checkpoint_lib.DAMAGED_DIR
  set_aside = set()   # (step, run id) and (step, commit time) of every step set aside
  for folder in (damaged_dir.iterdir() if damaged_dir.is_dir() else []):
    step = folder.name.split('-')[0]
    if step.isdigit():
      keys = (checkpoint_lib.run_id_of(folder), checkpoint_lib.written_at(folder))
      set_aside |= {(int(step), key) for key in keys if key is not None}
  others = {step for step, results in gone.items()
            if lineage is None or results.get('checkpoint_run') is None
            or checkpoint_lib.written_by(lineage, step) != results['checkpoint_run']
            or (step, results['checkpoint_run']) in set_aside
            or (step, results.get('checkpoint_written')) in set_aside}
  if others:
    print(f'WARNING: GLUE sweep: the results of step(s) {", ".join(map(str, sorted(others)))} '
          f'are left off the curve: their checkpoints are gone from {ckpt_dir}, and the '
          'training run there did not keep them (a diverged or damaged step set aside, a '
          'workdir trained anew, or a checkpoint from before bert_sym recorded its run).',
          file=sys.stderr, flush=True)
  return others


def run_sweep(workdir, output_dir, config, reference_score=None) -> dict:
  output_dir = epath.Path(output_dir)
  config = suite.with_absolute_paths(config)
  # The workdir itself when given its checkpoints/ folder (which a single run accepts):
  # every step below is looked up as checkpoint_dir(workdir) / step.
  workdir = str(checkpoint_lib.checkpoints_root(workdir).parent)
  steps = checkpoint_steps(workdir)
  scored = hosts.on_process_0(lambda: {str(k): v for k, v in scored_steps_gone(
      workdir, output_dir, config, set(steps)).items()})
  points = [report.sweep_point(int(step), results) for step, results in scored.items()]
  task_cache = {}
  # One flag for the whole sweep: a signal while a step's last task was scored, or while
  # the next checkpoint loaded, was lost with that step's own flag (the sweep went on) or
  # met no handler at all (killed, exit 143, not requeued).
  unfinished = []   # the steps the last write of the summary named as still to score
  with loop.PreemptionFlag() as preemption:
    for step in steps:
      step_dir = checkpoint_lib.checkpoint_dir(workdir) / str(step)
      # A trainer still running rotates steps away (keep_last) while earlier ones are
      # scored: a gap, as a damaged step is, not the end of the sweep.
      if not hosts.on_process_0(step_dir.exists):
        print(f'WARNING: GLUE sweep: step {step} skipped, its checkpoint was deleted since '
              'the sweep listed the steps (keep_last rotation of a running trainer?)',
              file=sys.stderr, flush=True)
        continue
      # Each step has its own output directory, so an interrupted sweep resumes where it
      # stopped (config.resume) and a longer training run only adds its new steps.
      try:
        results = suite.run_glue(str(step_dir), str(output_dir / f'step_{step:08d}'),
                                 config, task_cache, preemption)
      except checkpoint_lib.DamagedCheckpoint as e:   # one bad step: a gap, not the end
        print(f'WARNING: GLUE sweep: step {step} skipped, its checkpoint is damaged ({e})',
              file=sys.stderr, flush=True)
        continue
      points = sorted(points + [report.sweep_point(step, results)], key=lambda p: p['step'])
      unfinished = steps[steps.index(step) + 1:]
      report.write_sweep(output_dir, workdir, points, reference_score, config, unfinished)
      if preemption.raised_locally() and step != steps[-1]:   # the rest when rerun
        raise loop.Preempted(step, preemption.signal_name)
  if unfinished:   # the steps after the last one scored were skipped (deleted, damaged)
    report.write_sweep(output_dir, workdir, points, reference_score, config)
  return {'points': points}

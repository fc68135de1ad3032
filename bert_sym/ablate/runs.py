"""The runs of an ablation grid, read back: each one's status, metrics rows and wall-clock
time, and which runs a workdir holds (whole_grid, left_out_runs).

Wall-clock time runs from the run's first metrics row (the step-0 eval: start-up and the
eval step's compilation excluded), without the first process's train-step compilation nor
the time a resumed run sat stopped (`elapsed_seconds`).
"""

import dataclasses
import json
import math
import re
from typing import Sequence

from etils import epath
import ml_collections

from bert_sym import attention
from bert_sym import checkpoint as checkpoint_lib


def run_dir(workdir, variant: str, seed: int) -> epath.Path:
  return epath.Path(workdir) / variant / f'seed{seed}'


def whole_grid(workdir, variants: list[str], seeds: list[int],
               say: bool = True) -> tuple[list, list]:
  """The variants and seeds asked for, then those of the runs earlier commands started in
  `workdir`: summary.* covers them all. It covered the command's own only, so a command
  that added a variant or a seed to a grid replaced the grid's summary with a part of it
  (adding `--variants=symmetric` compared symmetric with itself: its reference was gone)."""
  found = [(folder.parent.name, int(folder.name[4:]))
           for folder in epath.Path(workdir).glob('*/seed*')
           if folder.parent.name in attention.VARIANTS and folder.name[4:].isdigit()
           and (folder / checkpoint_lib.CONFIG_FILE).exists()]
  more_variants = [v for v in attention.VARIANTS if v in {f[0] for f in found} - set(variants)]
  more_seeds = sorted({f[1] for f in found} - set(seeds))
  if not more_variants and not more_seeds:
    return variants, seeds
  variants, seeds = variants + more_variants, sorted(set(seeds) | set(more_seeds))
  if say:
    print(f'Summary over every run in {workdir}: variants {", ".join(variants)}; seeds '
          f'{", ".join(map(str, seeds))} (earlier commands started those this one did not '
          'name).', flush=True)
  return variants, seeds


def left_out_runs(workdir, variants, seeds, requested, summarize_only=False) -> str | None:
  """One line naming the finished runs that the summary leaves out as trained with another
  config than `requested`, and how to retrain them; None if there is none. A changed
  setting plus new seeds trained the new seeds only: the older seeds of that grid were then
  dropped with a note only where the command named them, and never said how to redo them."""
  other = {}
  for variant in variants:
    for seed in seeds:
      path = run_dir(workdir, variant, seed)
      if run_status(path, int(requested.total_steps))[0]:
        changed = config_differences(requested, checkpoint_lib.read_config(path), variant, seed)
        if changed:
          other[variant, seed] = changed
  if not other:
    return None
  names = '; '.join(f'{v}/seed{s} ({", ".join(c)})' for (v, s), c in other.items())
  again = (f'--variants={",".join(dict.fromkeys(v for v, _ in other))} '
           f'--seeds={",".join(str(s) for s in sorted({s for _, s in other}))}'
           + (' without --summarize_only' if summarize_only else ''))
  return (f'Note: {len(other)} finished run(s) are left out of the summary, trained with a '
          f'config that differs from the requested one in: {names}. To retrain them with '
          f'this one, move their folders away and rerun naming them ({again}); to summarize '
          'them, rerun with the config they were trained with.')


def latest_finished_step(path) -> int | None:
  steps = checkpoint_lib.finished_steps(path)
  return steps[-1] if steps else None


def run_status(path, total_steps: int | None = None) -> tuple[bool, str]:
  """(finished, why): finished = config.json + a finalized checkpoint at total_steps + its
  eval row in metrics.jsonl.

  `total_steps` is the requested one; None = the run's own config.json value (for
  --summarize_only over a workdir whose config is not at hand).
  """
  path = epath.Path(path)
  if not (path / checkpoint_lib.CONFIG_FILE).exists():
    return False, 'not started'
  if total_steps is None:
    total_steps = checkpoint_lib.read_config(path).total_steps
  step = latest_finished_step(path)
  if step is None:
    return False, f'no finished checkpoint yet (0/{total_steps})'
  if step < total_steps:
    return False, f'checkpoint at step {step}/{total_steps}'
  # The trainer evaluates, then saves; preempted in its last step it saves first, and killed
  # in the eval after, it has its final checkpoint without the final eval the report needs.
  if not (path / 'metrics.jsonl').exists():
    return False, f'checkpoint at step {step} but {LOST_CURVE}'
  if step not in read_metrics(path)['eval']:
    return False, (f'checkpoint at step {step} but no eval at it in metrics.jsonl (stopped '
                   'during its final eval; the runner reruns the trainer, which adds it)')
  return True, f'finished (step {step})'


# Rerun, the trainer would add the final eval alone: a one-point curve among full ones.
LOST_CURVE = ('no metrics.jsonl: its eval curve is lost. Fix: put metrics.jsonl back, or '
              'move the run folder away to train it anew')


# Set per run from its folder (the runner passes them): they differ between runs by design.
PER_RUN_KEYS = ('model.attention', 'seed')
# How a run is carried out, not what it computes (the same math, to float rounding): a run
# that differs only in these is still one of the grid (the model's kernel and backward,
# the mesh, logging, checkpoint cadence, compiler settings). Prefixes end with '.'.
NOT_THE_EXPERIMENT = (
    'model.attention_impl', 'model.remat', 'model.remat_policy', 'model.scan_layers',
    'model.lean_backward', 'model.kernel_interpret', 'mesh.', 'sharding_rules',
    'log_every_steps', 'checkpoint.', 'on_nonfinite', 'max_consecutive_nonfinite',
    'peak_flops_per_device', 'xla_gpu_flags', 'compilation_cache_dir',
    'compilation_cache_max_gb')


# Keys added after runs were written without them: their value then (prng_impl, 2026-12-02:
# threefry was the only generator), so such a run still counts as one of the grid.
DEFAULTS_OF_NEWER_KEYS = {'prng_impl': 'threefry'}


def _with_newer_defaults(config):
  config = ml_collections.ConfigDict(config.to_dict())
  for key, value in DEFAULTS_OF_NEWER_KEYS.items():
    if key not in config:
      config[key] = value
  return config


def config_differences(baseline, saved, variant: str | None = None,
                       seed: int | None = None) -> list[str]:
  """Keys that change what a run computes in which its config.json (`saved`) differs from
  `baseline`: the requested config, given the run's variant and seed; or, without them,
  another run's config, those two keys aside."""
  baseline, saved = _with_newer_defaults(baseline), _with_newer_defaults(saved)
  if variant is not None:   # (a copy: set in place)
    baseline.model.attention, baseline.seed = variant, seed
  changed = checkpoint_lib.config_differences(baseline, saved)
  return [k for k in changed if not k.startswith(NOT_THE_EXPERIMENT)
          and (variant is not None or k not in PER_RUN_KEYS)]


def _kind(row: dict) -> str:
  return 'eval' if any(k.startswith('eval/') for k in row) else 'train'


def read_metrics(path) -> dict:
  """metrics.jsonl -> {'eval': {step: row}, 'train': {step: row}, 'rows': [all, in order]}.

  A step logged twice (re-logged after a resume) keeps its last row. A half-written last
  line (a run still writing) is ignored.
  """
  out = {'eval': {}, 'train': {}, 'rows': []}
  file = epath.Path(path) / 'metrics.jsonl'
  if not file.exists():
    return out
  for line in file.read_text().splitlines():
    try:
      row = json.loads(line)
    except json.JSONDecodeError:
      continue
    if 'step' not in row:
      continue
    out['rows'].append(row)
    out[_kind(row)][int(row['step'])] = row
  return out


def process_start_times(path) -> list[float]:
  """Start time of every trainer process of this run (from its TensorBoard file name)."""
  folder = epath.Path(path) / 'tensorboard'
  if not folder.is_dir():
    return []
  starts = []
  for f in folder.iterdir():
    m = re.match(r'events\.out\.tfevents\.(\d+)\.', f.name)
    if m:
      starts.append(float(m.group(1)))
  return sorted(starts)


def elapsed_seconds(rows: Sequence[dict], starts: Sequence[float]) -> list[float]:
  """Wall-clock seconds of each row since the first one, restarts' idle gaps removed.

  For each process start after the first one, the time between the last row written before
  it and the start itself is idle (the run was stopped) and is subtracted from every later
  row; the restart's own start-up and compilation stay (real cost). Two restarts after the
  same last row (the first wrote nothing that was kept) share that idle stretch: it counts
  once, as the union of the stretches. Event-file names have whole seconds, so a gap is
  rounded down by < 1 s; without them none is removed. The first process's train-step
  compilation (`perf/compile_seconds` of its first train row) is removed from the first row
  past the first step on.
  """
  if not rows:
    return []
  times = [float(r['time']) for r in rows]
  gaps = []   # (start, idle seconds not already counted by an earlier start)
  counted_until = -math.inf
  for start in sorted(starts):
    before = [t for t in times if t <= start]
    if before and start > times[0]:
      idle_from = max(max(before), counted_until)
      gaps.append((start, max(0.0, start - idle_from)))
      counted_until = start
  # The first compilation is not training, and the compilation cache decides it: the first
  # seed of a variant compiled (12 s of a tiny run's 13 s), the next read the cache (1 s), so
  # train time and loss_vs_time measured the cache. A restart's compilation stays (above).
  restart = min((s for s in starts if s > times[0]), default=math.inf)
  compiled_at, compile_s = next(((t, float(r['perf/compile_seconds'])) for r, t in zip(
      rows, times) if r.get('perf/compile_seconds') is not None), (math.inf, 0.0))
  if compiled_at > restart:   # a restart's: the first process logged no train row
    compile_s = 0.0
  # It ran before the first step, so an eval row past the first step that comes before the
  # train row saying it (eval_every_steps < log_every_steps) holds it too.
  first = rows[0].get('step')
  compiled_at = min([compiled_at] + [t for r, t in zip(rows, times) if first is not None
                                     and r.get('step', first) > first])
  return [t - times[0] - sum(g for s, g in gaps if s <= t) - (compile_s if t >= compiled_at
                                                                 else 0.0) for t in times]


@dataclasses.dataclass
class Run:
  variant: str
  seed: int
  path: str
  config: ml_collections.ConfigDict
  eval_steps: list[int]
  eval_loss: list[float]
  eval_accuracy: list[float]
  eval_seconds: list[float]       # wall-clock of each eval row (see elapsed_seconds)
  train_seconds: float            # wall-clock of the last row

  @property
  def tokens_per_step(self) -> int:
    return int(self.config.batch_size * self.config.data.max_seq_len)


def _number(value) -> float:
  # The trainer writes a non-finite value as null (strict JSON); the statistics take NaN
  # for a diverged eval (stats.steps_to_target skips it, a final loss shows as nan).
  return math.nan if value is None else float(value)


def load_run(variant: str, seed: int, path) -> Run:
  config = checkpoint_lib.read_config(path)
  metrics = read_metrics(path)
  # Time of each row in file order; a re-logged step keeps its last row's time.
  elapsed = elapsed_seconds(metrics['rows'], process_start_times(path))
  eval_time = {}
  for row, t in zip(metrics['rows'], elapsed):
    if _kind(row) == 'eval':
      eval_time[int(row['step'])] = t
  steps = sorted(metrics['eval'])
  return Run(variant=variant, seed=seed, path=str(path), config=config, eval_steps=steps,
             eval_loss=[_number(metrics['eval'][s]['eval/loss']) for s in steps],
             eval_accuracy=[_number(metrics['eval'][s]['eval/mlm_accuracy']) for s in steps],
             eval_seconds=[eval_time[s] for s in steps],
             train_seconds=elapsed[-1] if elapsed else 0.0)

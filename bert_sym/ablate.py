r"""Ablation runner: one pre-training run per (attention variant, seed), then one report.

  python -m bert_sym.ablate --config=configs/tiny.py --variants=standard,symmetric,pairwise \
      --seeds=1,2,3 --workdir=runs/abl [--config.total_steps=600 ...]

  # Also fine-tune every final checkpoint on GLUE (bert_sym.glue, one subprocess per run):
  python -m bert_sym.ablate ... --glue_dir=../shared/data/glue --glue_tasks=rte,mrpc \
      --glue_seeds=1 --glue_args='--config.epochs=1 --config.max_seq_len=64'

  # Only (re)build the report from the runs already in the workdir (trains nothing):
  python -m bert_sym.ablate ... --summarize_only

Every run is the real trainer, `python -m bert_sym.train`, in `{workdir}/{variant}/seed{S}`
with `--config.model.attention=V --config.seed=S` and every other `--config.*` flag passed
through unchanged, so a grid started by hand with that layout is picked up as is. A run is
finished when it has a config.json and a finalized checkpoint at the requested
`config.total_steps`; finished runs are skipped, unfinished ones resumed (the trainer
resumes from its latest checkpoint). Exit code 42 from the trainer (preempted) reruns it;
any other failure stops the grid with the run's name and log. SIGTERM to the runner is
passed to the running trainer, which saves; the runner then exits with code 42 too. On
Ctrl-C the trainer saves and exits with 130, and so does the runner.

CPU, GPU, TPU: the runner only starts trainers, which use every local accelerator, so the
same command runs on a laptop, a GPU machine or a single-host TPU VM (v4-8, v5e-8, ...;
install it as launch/tpu_vm.sh does, then ssh in and run the command; a gs:// --workdir
works, the subprocess logs then stay in ./ablate_logs). On a multi-host slice every worker
must run the same command at once (`gcloud compute tpus tpu-vm ssh NAME --worker=all
--command '...'`), as launch/tpu_vm.sh does for the trainer; that path is untested.

Outputs in --workdir, besides the runs:
  summary.json   everything below, per seed and as mean / std over seeds
  summary.md     the tables: cost (parameters, FLOPs/token), final eval MLM loss and
                 accuracy, steps to a target loss and the ratio to standard's, eval loss
                 at fixed steps, GLUE
  loss_vs_step.png, loss_vs_tokens.png, loss_vs_time.png, glue.png (when GLUE ran)

Statistics over seeds: mean and the sample standard deviation (ddof=1), as in the GLUE
tables (`glue_metrics.mean_std`); one seed has no std.

Wall-clock time is measured from each run's first metrics row (the step-0 eval, so
start-up and the first compilation are excluded). A resumed run would otherwise count
the time it sat stopped: each trainer process leaves a TensorBoard event file named after
its start time, and the idle gap between the last row before a restart and that restart is
subtracted (the restart's own start-up and compilation are kept: they are real cost).
Without TensorBoard event files no gap can be found and none is subtracted.
"""

import dataclasses
import io
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from typing import Iterable, Sequence

from absl import app
from absl import flags
from absl import logging
from etils import epath
from ml_collections import config_flags
import ml_collections
import numpy as np

from bert_sym import checkpoint as checkpoint_lib
from bert_sym.glue import metrics as glue_metrics
from bert_sym import model as model_lib

PREEMPTED_EXIT_CODE = 42     # bert_sym.train's: SIGTERM, stopped after saving, rerun to resume
INTERRUPTED_EXIT_CODE = 130  # bert_sym.train's: Ctrl-C, stopped after saving, rerun to resume
REFERENCE_VARIANT = 'standard'
SUMMARY_JSON = 'summary.json'
SUMMARY_MD = 'summary.md'
GLUE_SUBDIR = 'glue'


class AblationError(Exception):
  """A run failed or the inputs are inconsistent: reported without a traceback."""


# ----------------------------------------------------------------------------------------
# The requested config: the same file + overrides the trainer will see.
# ----------------------------------------------------------------------------------------

def resolve_config(config: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """The ConfigDict `python -m bert_sym.train --config=CONFIG OVERRIDES` would build.

  Parsed with a private FlagValues, so it neither needs nor touches the global flags (it
  runs inside a notebook, or beside `bert_sym.train` imported in the same process).
  Unknown keys and bad values fail here, before any run starts.
  """
  bad = [o for o in overrides if not re.fullmatch(r'--config\.[\w.]+=.*', o, re.S)]
  if bad:
    raise AblationError(f'Overrides must look like --config.KEY=VALUE, got {bad}.')
  argv = ['ablate', f'--config={config}', *overrides]
  values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, 'experiment config', flag_values=values,
                                  lock_config=True, sys_argv=argv)
  try:
    values(argv)
  except (flags.Error, KeyError, AttributeError, ValueError) as e:
    raise AblationError(f'Cannot build the config {config} with {list(overrides)}: {e}. '
                        f'Every key must exist in the config file (configs/common.py).') from e
  return values.config


def run_dir(workdir, variant: str, seed: int) -> epath.Path:
  return epath.Path(workdir) / variant / f'seed{seed}'


# ----------------------------------------------------------------------------------------
# Reading one run: config.json, metrics.jsonl, checkpoints.
# ----------------------------------------------------------------------------------------

def latest_finished_step(path) -> int | None:
  steps = checkpoint_lib.finished_steps(path)
  return steps[-1] if steps else None


def run_status(path, total_steps: int | None = None) -> tuple[bool, str]:
  """(finished, why): finished = config.json + a finalized checkpoint at total_steps.

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
  return True, f'finished (step {step})'


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

  For each process start after the first one, the gap between the last row written before
  it and the start itself is idle time (the run was stopped) and is subtracted from every
  later row. Event-file names have whole seconds, so the gap is rounded down by < 1 s.
  """
  if not rows:
    return []
  times = [float(r['time']) for r in rows]
  gaps = []   # (start, idle seconds)
  for start in starts:
    before = [t for t in times if t <= start]
    if before and start > times[0]:
      gaps.append((start, start - max(before)))
  return [t - times[0] - sum(g for s, g in gaps if s <= t) for t in times]


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
             eval_loss=[float(metrics['eval'][s]['eval/loss']) for s in steps],
             eval_accuracy=[float(metrics['eval'][s]['eval/mlm_accuracy']) for s in steps],
             eval_seconds=[eval_time[s] for s in steps],
             train_seconds=elapsed[-1] if elapsed else 0.0)


# ----------------------------------------------------------------------------------------
# Statistics.
# ----------------------------------------------------------------------------------------

mean_std = glue_metrics.mean_std   # mean and sample std (ddof=1) of the values present


def steps_to_target(steps: Sequence[int], losses: Sequence[float], target: float) -> int | None:
  """The first evaluated step whose loss is <= target; None if the curve never gets there."""
  for step, loss in zip(steps, losses):
    if loss <= target:
      return int(step)
  return None


def _fmt(stat: dict, digits: int = 3) -> str:
  if stat['mean'] is None:
    return '–'
  text = f'{stat["mean"]:.{digits}f}'
  if stat['std'] is not None:
    text += f' ± {stat["std"]:.{digits}f}'
  return text


def _fmt_int(value) -> str:
  return '–' if value is None else f'{value:,.0f}'


# ----------------------------------------------------------------------------------------
# Summary: summary.json, summary.md, plots.
# ----------------------------------------------------------------------------------------

def _table_steps(common: list[int], final: int, max_columns: int = 6) -> list[int]:
  """A readable subset of the common eval steps for the Markdown table (all in JSON)."""
  inner = [s for s in common if 0 < s < final]
  if len(inner) > max_columns - 1:
    picks = np.linspace(0, len(inner) - 1, max_columns - 1).round().astype(int)
    inner = [inner[i] for i in sorted(set(picks))]
  return inner + [final]


def _glue_scores(path) -> dict | None:
  """{score name: mean over fine-tuning seeds} of one pre-training run, or None."""
  file = epath.Path(path) / GLUE_SUBDIR / 'glue_results.json'
  if not file.exists():
    return None
  results = json.loads(file.read_text())
  over = results.get('summary', {}).get('over_seeds', {})
  # Task scores and GLUE (or its partial mean); 'glue_full*' only adds WNLI to the same.
  return {name: stat['mean'] for name, stat in over.items()
          if stat.get('mean') is not None and not name.startswith('glue_full')}


def _model_cost(config) -> dict:
  seq_len = config.data.max_seq_len
  # bert_sym.train.predicted_fraction, restated: importing the trainer would define its
  # command-line flags in this process, whose --config is ours.
  fraction = (min(config.data.max_predictions_per_seq / seq_len, 1.0)
              if config.model.sparse_mlm else 1.0)
  return {'params_encoder_pooler': int(model_lib.encoder_plus_pooler_params(config.model)),
          'train_flops_per_token': float(model_lib.train_flops_per_token(
              config.model, seq_len, fraction)),
          'seq_len': int(seq_len), 'batch_size': int(config.batch_size)}


def summarize(workdir, variants: Sequence[str], seeds: Sequence[int], *,
              total_steps: int | None = None, target_loss: float | None = None,
              plots: bool = True) -> dict:
  """Reads every finished run, writes summary.json / summary.md / plots, returns the dict."""
  workdir = epath.Path(workdir)
  runs, excluded = {}, {}
  for variant in variants:
    for seed in seeds:
      path = run_dir(workdir, variant, seed)
      finished, why = run_status(path, total_steps)
      if finished:
        runs.setdefault(variant, []).append(load_run(variant, seed, path))
      else:
        excluded[f'{variant}/seed{seed}'] = why
  present = [v for v in variants if v in runs]
  if not present:
    raise AblationError(f'No finished run under {workdir} for variants {list(variants)} and '
                        f'seeds {list(seeds)}: {excluded}')
  all_runs = [r for v in present for r in runs[v]]

  # Eval steps present in every included run: the rows of the loss-at-step table.
  common = sorted(set.intersection(*(set(r.eval_steps) for r in all_runs)))
  final_steps = {r.eval_steps[-1] for r in all_runs}
  if len(final_steps) != 1:
    raise AblationError(f'The runs end at different steps {sorted(final_steps)}: summarize '
                        f'runs of one total_steps (pass the same --config.total_steps).')
  final = final_steps.pop()

  def loss_at(run, step):
    return run.eval_loss[run.eval_steps.index(step)]

  out = {'workdir': str(workdir), 'variants': present, 'seeds': list(seeds),
         'runs': {v: [r.seed for r in runs[v]] for v in present}, 'excluded': excluded,
         'statistic': 'mean and sample std (ddof=1) over pre-training seeds',
         'final_step': final, 'eval_steps': common, 'per_variant': {}}

  reference = REFERENCE_VARIANT if REFERENCE_VARIANT in runs else present[0]
  if target_loss is None:
    target_loss = mean_std([loss_at(r, final) for r in runs[reference]])['mean']
    target_source = f"{reference}'s final mean eval loss"
  else:
    target_source = 'given (--target_loss)'
  out['target_loss'] = {'value': target_loss, 'source': target_source,
                        'rule': 'first eval step with eval/loss <= target, per seed',
                        'reference_variant': reference}

  for variant in present:
    vruns = runs[variant]
    per_seed_steps = {r.seed: steps_to_target(r.eval_steps, r.eval_loss, target_loss)
                      for r in vruns}
    reached = [s for s in per_seed_steps.values() if s is not None]
    cost = _model_cost(vruns[0].config)
    glue = {r.seed: _glue_scores(r.path) for r in vruns}
    glue = {seed: scores for seed, scores in glue.items() if scores}
    glue_names = sorted({n for scores in glue.values() for n in scores})
    out['per_variant'][variant] = {
        **cost,
        'eval_loss_at_step': {str(s): mean_std([loss_at(r, s) for r in vruns]) for s in common},
        'final_eval_loss': mean_std([loss_at(r, final) for r in vruns]),
        'final_eval_mlm_accuracy': mean_std(
            [r.eval_accuracy[r.eval_steps.index(final)] for r in vruns]),
        'steps_to_target': {'per_seed': {str(k): v for k, v in per_seed_steps.items()},
                            'reached': len(reached), 'of': len(vruns),
                            **mean_std(reached)},
        'train_seconds': mean_std([r.train_seconds for r in vruns]),
        'tokens_per_step': vruns[0].tokens_per_step,
        'glue': {n: mean_std([glue[s].get(n) for s in glue]) for n in glue_names},
        'glue_per_seed': {str(s): scores for s, scores in glue.items()},
    }
  ref_steps = out['per_variant'][reference]['steps_to_target']['mean']
  for variant in present:
    st = out['per_variant'][variant]['steps_to_target']
    st['ratio_to_reference'] = (st['mean'] / ref_steps
                                if st['mean'] is not None and ref_steps else None)

  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / SUMMARY_JSON).write_text(json.dumps(out, indent=2) + '\n')
  (workdir / SUMMARY_MD).write_text(markdown(out))
  if plots:
    out['plots'] = plot(workdir, runs, present, target_loss, out)
    (workdir / SUMMARY_JSON).write_text(json.dumps(out, indent=2) + '\n')
  return out


def markdown(summary: dict) -> str:
  pv = summary['per_variant']
  variants = summary['variants']
  final = summary['final_step']
  target = summary['target_loss']
  ref = target['reference_variant']
  lines = [f'# Ablation: {", ".join(variants)}', '',
           f'Runs in `{summary["workdir"]}`; mean ± std over pre-training seeds (sample std, '
           f'ddof=1; no std with one seed). Final step {final}.', '']
  if summary['excluded']:
    lines += ['Not included (unfinished): ' + ', '.join(
        f'{k} ({v})' for k, v in summary['excluded'].items()), '']
  lines += [f'Target eval loss {target["value"]:.4f} ({target["source"]}); steps to target = '
            f'first eval step at or below it, per seed; ratio = mean steps / {ref}\'s mean '
            f'steps.', '',
            '| variant | seeds | params (enc+pooler) | train FLOPs/token | final eval loss | '
            'final MLM acc | steps to target | ratio vs ' + ref + ' | train time (s) |',
            '|---|---|---:|---:|---:|---:|---:|---:|---:|']
  for v in variants:
    p = pv[v]
    st = p['steps_to_target']
    if st['reached'] == 0:
      steps = 'not reached'
    else:
      steps = _fmt(st, 0)
      if st['reached'] < st['of']:
        steps += f' (reached in {st["reached"]}/{st["of"]} seeds)'
    ratio = '–' if st['ratio_to_reference'] is None else f'{st["ratio_to_reference"]:.2f}'
    lines.append(
        f'| {v} | {",".join(map(str, summary["runs"][v]))} | '
        f'{_fmt_int(p["params_encoder_pooler"])} | {p["train_flops_per_token"]:.3e} | '
        f'{_fmt(p["final_eval_loss"], 4)} | {_fmt(p["final_eval_mlm_accuracy"], 4)} | '
        f'{steps} | {ratio} | {_fmt(p["train_seconds"], 0)} |')

  shown = _table_steps(summary['eval_steps'], final)
  lines += ['', 'Eval MLM loss at step (every common eval step is in summary.json):', '',
            '| variant | ' + ' | '.join(f'step {s}' for s in shown) + ' |',
            '|---|' + '---:|' * len(shown)]
  for v in variants:
    cells = [_fmt(pv[v]['eval_loss_at_step'][str(s)], 3) for s in shown]
    lines.append(f'| {v} | ' + ' | '.join(cells) + ' |')

  names = sorted({n for v in variants for n in pv[v]['glue']},
                 key=lambda n: (n.startswith('glue'), n))
  if names:
    lines += ['', 'GLUE dev (x100; per pre-training seed: mean over fine-tuning seeds; then '
              'mean ± std over pre-training seeds):', '',
              '| variant | ' + ' | '.join(names) + ' |', '|---|' + '---:|' * len(names)]
    for v in variants:
      cells = [_fmt(pv[v]['glue'][n], 2) if n in pv[v]['glue'] else '–' for n in names]
      lines.append(f'| {v} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines) + '\n'


def _save_png(fig, path: epath.Path) -> None:
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  buffer = io.BytesIO()   # matplotlib cannot write to gs:// paths; epath can
  fig.savefig(buffer, format='png')
  plt.close(fig)
  path.write_bytes(buffer.getvalue())


def plot(workdir, runs: dict, variants: Sequence[str], target_loss: float,
         summary: dict) -> list[str]:
  """Mean eval loss over seeds (line) and min-max over seeds (band), per variant."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  workdir = epath.Path(workdir)
  colors = dict(zip(variants, plt.rcParams['axes.prop_cycle'].by_key()['color'] * 3))
  written = []
  axes_spec = (('step', 'loss_vs_step.png', 'training step'),
               ('tokens', 'loss_vs_tokens.png', 'tokens seen (step x batch x seq len)'),
               ('time', 'loss_vs_time.png', 'wall-clock seconds since the step-0 eval'))
  for kind, name, xlabel in axes_spec:
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=90)
    top = []
    for v in variants:
      vruns = runs[v]
      steps = sorted(set.intersection(*(set(r.eval_steps) for r in vruns)))
      losses = np.array([[r.eval_loss[r.eval_steps.index(s)] for s in steps] for r in vruns])
      if kind == 'step':
        x = np.array(steps, float)
      elif kind == 'tokens':
        x = np.array(steps, float) * vruns[0].tokens_per_step
      else:   # seeds differ in time per step: the mean time of each eval step
        x = np.array([[r.eval_seconds[r.eval_steps.index(s)] for s in steps]
                      for r in vruns]).mean(axis=0)
      ax.plot(x, losses.mean(axis=0), color=colors[v], label=f'{v} ({len(vruns)} seeds)')
      ax.fill_between(x, losses.min(axis=0), losses.max(axis=0), color=colors[v], alpha=0.2)
      # y-range from the last 3/4 of training: the first drop would flatten the rest.
      late = [i for i, s in enumerate(steps) if s >= 0.25 * steps[-1]] or [len(steps) - 1]
      top.append(losses[:, late].max())
    ax.axhline(target_loss, color='gray', lw=0.8, ls='--', label='target loss')
    low = min(min(r.eval_loss) for v in variants for r in runs[v])
    ax.set_ylim(low - 0.05 * (max(top) - low + 1e-9), max(top) + 0.05 * (max(top) - low + 1e-9))
    ax.set_xlabel(xlabel)
    ax.set_ylabel('eval MLM loss')
    ax.set_title('Eval MLM loss: mean over seeds, band = min-max (y clipped to the '
                 'last 3/4 of training)', fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save_png(fig, workdir / name)
    written.append(name)

  names = sorted({n for v in variants for n in summary['per_variant'][v]['glue']},
                 key=lambda n: (n.startswith('glue'), n))
  if names:
    fig, ax = plt.subplots(figsize=(max(6.4, 1.2 * len(names) + 2), 4.0), dpi=90)
    width = 0.8 / len(variants)
    for i, v in enumerate(variants):
      glue = summary['per_variant'][v]['glue']
      means = [glue[n]['mean'] if n in glue else np.nan for n in names]
      stds = [(glue[n]['std'] or 0.0) if n in glue else 0.0 for n in names]
      ax.bar(np.arange(len(names)) + i * width, means, width, yerr=stds, capsize=3,
             color=colors[v], label=v)
    ax.set_xticks(np.arange(len(names)) + 0.4 - width / 2)
    ax.set_xticklabels(names, fontsize=8)
    ax.set_ylabel('dev score (x100)')
    ax.set_title('GLUE dev: mean ± std over pre-training seeds', fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save_png(fig, workdir / 'glue.png')
    written.append('glue.png')
  return written


# ----------------------------------------------------------------------------------------
# Running the grid.
# ----------------------------------------------------------------------------------------

class _Stopped(Exception):
  """SIGTERM or Ctrl-C to the runner: the current run saved and stopped; so does the grid."""

  def __init__(self, exit_code: int):
    super().__init__(exit_code)
    self.exit_code = exit_code


class _Stop:
  """SIGTERM to the runner: let the current trainer save and stop, then stop too."""

  def __init__(self):
    self.requested = False
    self.child = None

  def __call__(self, signum, frame):
    del frame
    self.requested = True
    if self.child is not None and self.child.poll() is None:
      self.child.send_signal(signum)


def _stream(cmd: list[str], log_file: epath.Path, stop: _Stop) -> int:
  """Runs `cmd`, copying its output to our stdout and to `log_file`; returns its exit code."""
  print('+ ' + shlex.join(cmd), flush=True)
  env = dict(os.environ, PYTHONUNBUFFERED='1')   # progress lines as they happen
  if '://' in str(log_file):   # a gs:// workdir: the log stays on this machine
    log_file = epath.Path('ablate_logs') / str(log_file).split('://', 1)[1].replace('/', '_')
    log_file.parent.mkdir(parents=True, exist_ok=True)
  with open(log_file, 'a') as log:
    log.write(f'\n+ {shlex.join(cmd)}\n')
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            bufsize=1, env=env)
    stop.child = proc
    try:
      for line in proc.stdout:
        log.write(line)
        # absl INFO lines are for the log file; progress lines and errors for the console.
        if not re.match(r'[IW]\d{4} ', line):
          sys.stdout.write(line)
          sys.stdout.flush()
    except KeyboardInterrupt:   # the trainer got the Ctrl-C too: let it save and exit
      print('Ctrl-C: waiting for the trainer to save and stop...', flush=True)
      log.write(proc.communicate()[0] or '')
    code = proc.wait()
    stop.child = None
  return code


def _install_stop() -> tuple[_Stop, object]:
  """(stop flag, the previous SIGTERM handler to put back when the grid is done)."""
  stop = _Stop()
  try:
    return stop, signal.signal(signal.SIGTERM, stop)
  except ValueError:   # not the main thread (some notebook kernels): no forwarding
    return stop, None


def train_run(config: str, overrides: Sequence[str], variant: str, seed: int, path,
              stop: _Stop, python: str = sys.executable, max_restarts: int = 100) -> None:
  """Trains one run to the end, rerunning after a preemption (exit code 42)."""
  path = epath.Path(path)
  path.mkdir(parents=True, exist_ok=True)
  cmd = [python, '-m', 'bert_sym.train', f'--config={config}', f'--workdir={path}',
         f'--config.model.attention={variant}', f'--config.seed={seed}', *overrides]
  for _ in range(max_restarts + 1):
    code = _stream(cmd, path / 'train.log', stop)
    if code == 0:
      return
    if code == INTERRUPTED_EXIT_CODE or (code == PREEMPTED_EXIT_CODE and stop.requested):
      raise _Stopped(code)
    if code != PREEMPTED_EXIT_CODE:
      raise AblationError(
          f'Training {variant} seed {seed} failed (exit code {code}); the grid stops here. '
          f'Its output is in {path / "train.log"}. Fix the cause and rerun the same command: '
          f'finished runs are skipped, this one resumes from its last checkpoint.')
    print(f'{variant} seed {seed}: preempted (exit {code}); resuming.', flush=True)
  raise AblationError(f'{variant} seed {seed} was preempted {max_restarts} times in a row.')


def glue_run(path, *, glue_dir: str, tasks: str, seeds: str, glue_args: Sequence[str],
             stop: _Stop, python: str = sys.executable) -> None:
  """Fine-tunes one finished run on GLUE into {run}/glue (skipped if already done)."""
  path = epath.Path(path)
  out = path / GLUE_SUBDIR
  request = {'glue_dir': glue_dir, 'tasks': tasks, 'seeds': seeds, 'args': list(glue_args),
             'step': latest_finished_step(path)}
  marker = out / 'ablate_request.json'
  if (marker.exists() and json.loads(marker.read_text()) == request
      and (out / 'glue_results.json').exists()):
    print(f'{path}: GLUE already scored, skipped.', flush=True)
    return
  out.mkdir(parents=True, exist_ok=True)
  cmd = [python, '-m', 'bert_sym.glue', f'--checkpoint={path}', f'--output_dir={out}',
         f'--tasks={tasks}', f'--seeds={seeds}', *glue_args]
  if glue_dir:
    cmd.append(f'--glue_dir={glue_dir}')
  code = _stream(cmd, out / 'glue.log', stop)
  if code != 0:
    if stop.requested or code == -signal.SIGINT:
      raise _Stopped(INTERRUPTED_EXIT_CODE if code == -signal.SIGINT else PREEMPTED_EXIT_CODE)
    raise AblationError(f'GLUE on {path} failed (exit code {code}); see {out / "glue.log"}.')
  marker.write_text(json.dumps(request) + '\n')


def parse_list(text, cast=str) -> list:
  items = [cast(x) for x in str(text).replace(' ', '').split(',') if x]
  if not items:
    raise AblationError(f'Empty list: {text!r}.')
  return list(dict.fromkeys(items))


def run(config: str, variants: Sequence[str] | str, seeds: Sequence[int] | str, workdir: str,
        overrides: Sequence[str] = (), *, summarize_only: bool = False,
        glue_dir: str = '', glue_tasks: str = '', glue_seeds: str = '1',
        glue_args: Sequence[str] | str = (), target_loss: float | None = None,
        python: str = sys.executable) -> dict:
  """Trains what is missing of the grid (unless summarize_only), scores GLUE, summarizes.

  Returns the summary dict (summary.json) plus 'actions': what happened to each run
  ('skipped' finished, 'trained', or 'missing' with summarize_only).
  """
  variants = parse_list(variants) if isinstance(variants, str) else list(variants)
  seeds = parse_list(seeds, int) if isinstance(seeds, str) else [int(s) for s in seeds]
  glue_args = shlex.split(glue_args) if isinstance(glue_args, str) else list(glue_args)
  overrides = list(overrides)
  clashing = [o for o in overrides if o.startswith(('--config.model.attention=', '--config.seed='))]
  if clashing:
    raise AblationError(f'{clashing}: the runner sets the variant and seed of each run; use '
                        f'--variants and --seeds.')
  requested = resolve_config(config, overrides)
  from bert_sym import attention  # pylint: disable=g-import-not-at-top
  unknown = [v for v in variants if v not in attention.VARIANTS]
  if unknown:
    raise AblationError(f'Unknown variant(s) {unknown}; choose from {attention.VARIANTS}.')
  stop, previous_handler = _install_stop()
  try:
    actions = _run_grid(config, overrides, variants, seeds, workdir, requested, stop,
                        summarize_only=summarize_only, glue_dir=glue_dir,
                        glue_tasks=glue_tasks, glue_seeds=glue_seeds, glue_args=glue_args,
                        python=python)
  finally:
    if previous_handler is not None:
      signal.signal(signal.SIGTERM, previous_handler)
  summary = summarize(workdir, variants, seeds, total_steps=int(requested.total_steps),
                      target_loss=target_loss)
  summary['actions'] = actions
  return summary


def _flatten(tree: dict, prefix: str = '') -> dict:
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flatten(value, f'{prefix}{key}.'))
    else:
      out[f'{prefix}{key}'] = value
  return out


def config_differences(requested, saved, variant: str, seed: int) -> list[str]:
  """Keys in which a run's config.json differs from the requested config of that run."""
  want = _flatten(json.loads(requested.to_json()))
  want.update({'model.attention': variant, 'seed': seed})
  have = _flatten(json.loads(saved.to_json()))
  return sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))


def _run_grid(config, overrides, variants, seeds, workdir, requested, stop, *,
              summarize_only, glue_dir, glue_tasks, glue_seeds, glue_args, python) -> dict:
  total_steps = int(requested.total_steps)
  actions = {}
  start = time.time()
  for variant in variants:
    for seed in seeds:
      path = run_dir(workdir, variant, seed)
      finished, why = run_status(path, total_steps)
      name = f'{variant}/seed{seed}'
      if finished:
        actions[name] = 'skipped'
        print(f'{name}: {why}, skipped.', flush=True)
        changed = config_differences(requested, checkpoint_lib.read_config(path), variant, seed)
        if changed:
          print(f'  note: {name} was trained with a config that differs from the requested '
                f'one in {", ".join(changed)}; it is kept as it is.', flush=True)
      elif summarize_only:
        actions[name] = 'missing'
        print(f'{name}: {why}; --summarize_only, left out.', flush=True)
        continue
      else:
        print(f'{name}: {why}; training.', flush=True)
        train_run(config, overrides, variant, seed, path, stop, python=python)
        actions[name] = 'trained'
      if glue_tasks and not summarize_only:
        glue_run(path, glue_dir=glue_dir, tasks=glue_tasks, seeds=glue_seeds,
                 glue_args=glue_args, stop=stop, python=python)
  if not summarize_only:
    print(f'Grid done in {time.time() - start:.0f} s.', flush=True)
  return actions


# ----------------------------------------------------------------------------------------
# Command line.
# ----------------------------------------------------------------------------------------

def define_flags():
  """The runner's own flags; its --config and --config.* are read from argv as typed.

  Defined only when this module is the program, so notebooks and tests can import it
  beside `bert_sym.train` (which owns the global --config flag).
  """
  return dict(
      variants=flags.DEFINE_string('variants', 'standard,symmetric,pairwise',
                                   'Comma-separated attention variants.'),
      seeds=flags.DEFINE_string('seeds', '1,2,3', 'Comma-separated pre-training seeds.'),
      workdir=flags.DEFINE_string('workdir', None, 'Grid root: {workdir}/{variant}/seed{S}.'),
      summarize_only=flags.DEFINE_bool('summarize_only', False,
                                       'Only build the report from the finished runs.'),
      glue_dir=flags.DEFINE_string('glue_dir', '', 'Local GLUE directory (else TFDS).'),
      glue_tasks=flags.DEFINE_string('glue_tasks', '', 'GLUE tasks to score ("" = none).'),
      glue_seeds=flags.DEFINE_string('glue_seeds', '1', 'GLUE fine-tuning seeds per run.'),
      glue_args=flags.DEFINE_string(
          'glue_args', '', "Extra bert_sym.glue flags, e.g. '--config.epochs=1'."),
      target_loss=flags.DEFINE_float(
          'target_loss', None, "Target eval loss for steps-to-target (default: standard's "
          'final mean eval loss).'),
  )


def split_config_args(argv: Sequence[str]) -> tuple[str | None, list[str], list[str]]:
  """argv -> (--config value, --config.* overrides, the other arguments)."""
  config, overrides, rest = None, [], []
  for arg in argv:
    if arg.startswith('--config='):
      config = arg.split('=', 1)[1]
    elif arg.startswith('--config.'):
      if '=' not in arg:
        raise app.UsageError(f'Write overrides as --config.KEY=VALUE, got {arg!r}.')
      overrides.append(arg)
    elif arg == '--config':
      raise app.UsageError('Write --config=PATH (with "=").')
    else:
      rest.append(arg)
  return config, overrides, rest


def main(argv, cli, config, overrides):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if not cli['workdir'].value:
    raise app.UsageError('--workdir is required.')
  if not config:
    raise app.UsageError('--config=configs/....py is required.')
  try:
    summary = run(config, cli['variants'].value, cli['seeds'].value, cli['workdir'].value,
                  overrides, summarize_only=cli['summarize_only'].value,
                  glue_dir=cli['glue_dir'].value, glue_tasks=cli['glue_tasks'].value,
                  glue_seeds=cli['glue_seeds'].value, glue_args=cli['glue_args'].value,
                  target_loss=cli['target_loss'].value)
  except AblationError as e:
    print(f'bert_sym.ablate: error: {e}', file=sys.stderr, flush=True)
    sys.exit(1)
  except _Stopped as e:
    how = 'Ctrl-C' if e.exit_code == INTERRUPTED_EXIT_CODE else 'SIGTERM'
    print(f'bert_sym.ablate: stopped ({how}) after the current run saved; rerun the same '
          f'command to resume.', file=sys.stderr, flush=True)
    sys.exit(e.exit_code)
  print((epath.Path(cli['workdir'].value) / SUMMARY_MD).read_text())
  print(f'Summary and plots in {cli["workdir"].value}: {SUMMARY_JSON}, {SUMMARY_MD}, '
        + ', '.join(summary.get('plots', [])))


if __name__ == '__main__':
  _config, _overrides, _rest = split_config_args(sys.argv)
  _cli = define_flags()
  app.run(lambda argv: main(argv, _cli, _config, _overrides), argv=_rest)

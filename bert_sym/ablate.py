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

The runner only starts trainers, which use every local accelerator, so the same command
runs on a laptop, a GPU machine or a single-host TPU VM (a gs:// --workdir works; the logs
then stay in ./ablate_logs). On a multi-host slice every worker must run it at once, as
launch/tpu_vm.sh does for the trainer; that path is untested. The outputs (summary.json,
summary.md, plots) are listed in the README and written by `bert_sym.ablate_report`.
"""

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from typing import Sequence

from absl import app
from absl import flags
from etils import epath
from ml_collections import config_flags
import ml_collections

from bert_sym import attention
from bert_sym import checkpoint as checkpoint_lib
# The trainer's exit codes: SIGTERM (42) or Ctrl-C (130), stopped after saving.
from bert_sym.loop import INTERRUPTED_EXIT_CODE, PREEMPTED_EXIT_CODE
from bert_sym.ablate_report import (AblationError, GLUE_SUBDIR, SUMMARY_JSON, SUMMARY_MD,
                                    latest_finished_step, run_dir, run_status, summarize)


# ---- The requested config: the same file + overrides the trainer will see ----

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


# ---- Running the grid ----

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


def config_differences(requested, saved, variant: str, seed: int) -> list[str]:
  """Keys in which a run's config.json differs from the requested config of that run."""
  want = ml_collections.ConfigDict(requested.to_dict())
  want.model.attention, want.seed = variant, seed
  return checkpoint_lib.config_differences(want, saved)


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


# ---- Command line ----

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
  from bert_sym import cli  # pylint: disable=g-import-not-at-top
  with cli.guard('bert_sym.ablate'):   # e.g. --config.KEY without =VALUE
    _config, _overrides, _rest = split_config_args(sys.argv)
  _cli = define_flags()
  cli.run(lambda argv: main(argv, _cli, _config, _overrides), prog='bert_sym.ablate',
          argv=_rest)

"""The grid: one `python -m bert_sym.train` subprocess per (variant, seed), and GLUE on
its final checkpoint (`python -m bert_sym.glue`); interrupted runs resume."""

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from typing import Sequence

from absl import flags
from etils import epath
from ml_collections import config_flags
import ml_collections

from bert_sym import attention
from bert_sym import checkpoint as checkpoint_lib
from bert_sym import cli
from bert_sym import config_check
from bert_sym import early_signals
from bert_sym import files
# The trainer's exit codes: SIGTERM (42) or Ctrl-C (130), stopped after saving.
from bert_sym.loop import INTERRUPTED_EXIT_CODE, PREEMPTED_EXIT_CODE
from bert_sym.ablate.report import (AblationError, GLUE_DONE, GLUE_SUBDIR, SUMMARY_JSON,
                                    SUMMARY_MD, summarize)
from bert_sym.ablate.runs import (LOST_CURVE, config_differences, latest_finished_step,
                                  left_out_runs, run_dir, run_status, whole_grid)


# ---- The requested config: the same file + overrides the trainer will see ----

def resolve_config(config: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """The ConfigDict `python -m bert_sym.train --config=CONFIG OVERRIDES` would build and
  write to its config.json (data paths made absolute from the current directory).

  Parsed with a private FlagValues, so it neither needs nor touches the global flags (it
  runs inside a notebook, or beside `bert_sym.train` imported in the same process).
  Unknown keys and bad values fail here, before any run starts.
  """
  bad = [o for o in overrides if not re.fullmatch(r'--config\.[\w.]+=.*', o, re.S)]
  if bad:   # the trainer's line where a key is malformed (max-seq-len: max_seq_len)
    raise AblationError(cli.malformed_key_message(ValueError(bad), ['ablate', *bad])
                        if all(re.fullmatch(r'--config\.\S+=.*', o, re.S) for o in bad) else
                        f'Overrides must look like --config.KEY=VALUE, got {bad}.')
  argv = ['ablate', f'--config={config}', *overrides]
  values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, 'experiment config', flag_values=values,
                                  lock_config=True, sys_argv=argv)
  try:
    values(argv)
    cli.check_group_overrides(values)   # a group given as a dict: the trainer's line
    config_check.check(values.config)   # the trainer's value checks, before any run
  except (KeyError, AttributeError, TypeError) as e:   # the trainer's line for a bad key
    if "'get_config'" in str(e):   # a file without get_config(): bert_sym.cli words it
      raise
    through_a_value = config_check.key_through_a_value(argv, config)
    if through_a_value is None and isinstance(e, TypeError):
      raise
    raise AblationError(through_a_value or config_check.unknown_key_line(
        e, argv, f'python -m bert_sym.train --config={config} --help')) from None
  except cli.UserError as e:   # ConfigError too
    raise AblationError(str(e)) from None
  except (flags.Error, ValueError, IndexError) as e:
    if cli.raised_in(e, 'config_path'):   # a malformed key: the trainer's line
      raise AblationError(cli.malformed_key_message(e, argv)) from None
    said = cli.user_error_message(e) if isinstance(e, flags.Error) else ''
    if 'Fix:' in said:   # the trainer's line (e.g. 1e4 for an integer key)
      raise AblationError(said) from None
    raise AblationError(f'Cannot build the config {config} with {list(overrides)}: {e}.'
                        ) from None
  # As the trainer writes it to config.json: a relative data path differs from none.
  return config_check.absolute_data_paths(values.config)


# ---- Running the grid ----

class Stopped(Exception):
  """SIGTERM or Ctrl-C to the runner: the current run saved and stopped; so does the grid."""

  def __init__(self, exit_code: int):
    super().__init__(exit_code)
    self.exit_code = exit_code


class _Stop:
  """SIGTERM or Ctrl-C to the runner: let the current trainer save and stop, then stop too.

  With the SIGINT handler ours (`forwards`), the trainer runs in a process group of its own
  and each Ctrl-C reaches it once, through here: a Ctrl-C sent to the runner alone (kill
  -INT, an interrupt of a notebook's kernel) never reached it, and the runner, saying it
  waited for a save, waited for the last step, then trained the next run; one at a terminal
  reached it twice if forwarded too, and a second Ctrl-C quits without saving.
  """

  def __init__(self):
    self.requested = False     # SIGTERM
    self.interrupted = False   # Ctrl-C
    self.forwards = False
    self.child = None
    self.starting, self.pending = False, []   # see started()

  def __call__(self, signum, frame):
    del frame
    if self.starting and self.child is None:
      self.pending.append(signum)
      return
    running = self.child is not None and self.child.poll() is None
    if signum == signal.SIGINT:
      if not running:
        self.interrupted = True
        raise KeyboardInterrupt()   # nothing to save: stop at once, as without a handler
      if not self.interrupted:
        print('Ctrl-C: waiting for the trainer to save and stop...', flush=True)
      self.interrupted = True
    else:
      self.requested = True
    if running:
      self.child.send_signal(signum)

  def started(self, proc) -> None:
    """Forwards what came while Popen returned: it raised KeyboardInterrupt from there (no
    child known yet), and the trainer trained on, in its own group, never signalled."""
    self.child, self.starting = proc, False
    for signum in self.pending:
      self(signum, None)
    self.pending = []


def _stream(cmd: list[str], log_file: epath.Path, stop: _Stop) -> int:
  """Runs `cmd`, copying its output to our stdout and to `log_file`; returns its exit code."""
  print('+ ' + shlex.join(cmd), flush=True)
  env = dict(os.environ, PYTHONUNBUFFERED='1')   # progress lines as they happen
  if stop.forwards:   # in a group of its own: it must not outlive us (early_signals)
    env[early_signals.STOP_WITH_PARENT] = str(os.getpid())
  if '://' in str(log_file):   # a gs:// workdir: the log stays on this machine
    log_file = epath.Path('ablate_logs') / str(log_file).split('://', 1)[1].replace('/', '_')
    log_file.parent.mkdir(parents=True, exist_ok=True)
  with open(log_file, 'a', buffering=1) as log:   # line by line: `tail -f` shows each line
    log.write(f'\n+ {shlex.join(cmd)}\n')
    stop.starting = True   # (a Popen that raises ends the grid: no reset needed)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            bufsize=1, env=env, process_group=0 if stop.forwards else None)
    stop.started(proc)
    try:
      for line in proc.stdout:
        log.write(line)
        # absl INFO lines are for the log file; progress lines, warnings (a text file read as
        # a few huge documents) and errors for the console, as the trainer shows them.
        if not re.match(r'I\d{4} ', line):
          sys.stdout.write(line)
          sys.stdout.flush()
    except KeyboardInterrupt:   # the trainer got the Ctrl-C too (our group), or has exited
      print('Ctrl-C: waiting for the trainer to save and stop...', flush=True)
      log.write(proc.communicate()[0] or '')
    code = proc.wait()
    stop.child = None
  return code


def _install_stop() -> tuple[_Stop, dict]:
  """(stop flag, {signal: the previous handler to put back when the grid is done})."""
  stop, previous = _Stop(), {}
  try:
    previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, stop)
    # An ignored Ctrl-C (a shell's `ablate ... &`) stays ignored, by the trainers too.
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
      previous[signal.SIGINT] = signal.signal(signal.SIGINT, stop)
      stop.forwards = True
  except ValueError:   # not the main thread (some notebook kernels): no forwarding
    pass
  return stop, previous


def _run_resuming(cmd: list[str], log_file, stop: _Stop, what: str,
                  max_restarts: int) -> int:
  """Runs `cmd` until it exits other than by a preemption, and returns that exit code.

  42 without our own SIGTERM is a preemption of the child alone: it saved, and the same
  command resumes it. Ctrl-C (130, or killed by SIGINT before its handler was in place) and
  our own SIGTERM (42, or the child killed by it outside its handler) mean the grid should
  stop: Stopped; the same command resumes from the last save.
  """
  for _ in range(max_restarts + 1):
    code = _stream(cmd, log_file, stop)
    if code in (INTERRUPTED_EXIT_CODE, -signal.SIGINT) or (code != 0 and stop.interrupted):
      raise Stopped(INTERRUPTED_EXIT_CODE)
    if code != 0 and stop.requested:   # 42, or killed by the SIGTERM we forwarded before
      raise Stopped(PREEMPTED_EXIT_CODE)  # its handler was in place (or after it was removed)
    if code != PREEMPTED_EXIT_CODE:
      return code
    print(f'{what}: preempted (exit {code}); resuming.', flush=True)
  raise AblationError(f'{what} was preempted {max_restarts} times in a row.')


def train_run(config: str, overrides: Sequence[str], variant: str, seed: int, path,
              stop: _Stop, python: str = sys.executable, max_restarts: int = 100) -> None:
  """Trains one run to the end, rerunning after a preemption (exit code 42)."""
  path = epath.Path(path)
  path.mkdir(parents=True, exist_ok=True)
  cmd = [python, '-m', 'bert_sym.train', f'--config={config}', f'--workdir={path}',
         f'--config.model.attention={variant}', f'--config.seed={seed}', *overrides]
  code = _run_resuming(cmd, path / 'train.log', stop, f'{variant} seed {seed}', max_restarts)
  if code != 0:
    raise AblationError(
        f'Training {variant} seed {seed} failed (exit code {code}); the grid stops here. '
        f'Its output is in {path / "train.log"}. Fix the cause and rerun the same command: '
        f'finished runs are skipped, this one resumes from its last checkpoint.')


def glue_run(path, *, glue_dir: str, tasks: str, seeds: str, glue_args: Sequence[str],
             stop: _Stop, python: str = sys.executable, max_restarts: int = 100) -> None:
  """Fine-tunes one finished run on GLUE into {run}/glue (skipped if already done), rerunning
  after a preemption (exit code 42) as train_run does: GLUE saves and resumes the same way."""
  path = epath.Path(path)
  out = path / GLUE_SUBDIR
  request = {'glue_dir': glue_dir, 'tasks': tasks, 'seeds': seeds, 'args': list(glue_args),
             'step': latest_finished_step(path)}
  marker = out / GLUE_DONE
  if (marker.exists() and json.loads(marker.read_text()) == request
      and (out / 'glue_results.json').exists()):
    print(f'{path}: GLUE already scored, skipped.', flush=True)
    return
  marker.unlink(missing_ok=True)   # another request's: until this one ends, not scored
  out.mkdir(parents=True, exist_ok=True)
  cmd = [python, '-m', 'bert_sym.glue', f'--checkpoint={path}', f'--output_dir={out}',
         f'--tasks={tasks}', f'--seeds={seeds}', *glue_args]
  if glue_dir:
    cmd.append(f'--glue_dir={glue_dir}')
  code = _run_resuming(cmd, out / 'glue.log', stop, f'GLUE on {path}', max_restarts)
  if code != 0:
    raise AblationError(
        f'GLUE on {path} failed (exit code {code}); the grid stops here. Its output is in '
        f'{out / "glue.log"}. Fix the cause and rerun the same command: the finished '
        f'(task, seed) runs in {out} are reused.')
  files.write_atomically(marker, json.dumps(request) + '\n')   # read back with json.loads


def parse_list(text, cast=str, flag: str = '--variants=standard,symmetric') -> list:
  """'a,b' (or a list, as a notebook gives them) -> its distinct items, in order: a seed
  listed twice was one run counted twice in every mean, which narrowed every interval."""
  items = ([cast(x) for x in str(text).replace(' ', '').split(',') if x]
           if isinstance(text, str) else [cast(x) for x in text])
  if not items:   # was "Empty list: ''.", which named neither the flag nor a fix
    raise AblationError(f'{flag.split("=")[0]} is empty ({text!r}). Fix: name at least '
                        f'one, e.g. {flag}.')
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
  variants = parse_list(variants)
  try:
    seeds = parse_list(seeds, int, '--seeds=1,2,3')
  except ValueError:   # --seeds=x was a traceback
    raise AblationError(f'Seeds must be comma-separated integers, got {seeds!r}. Fix: e.g. '
                        '--seeds=1,2,3.') from None
  if min(seeds) < 0:   # seed -1 trained into seed-1, which the whole grid's summary missed
    raise AblationError('--seeds: seeds must be non-negative integers (each names its run '
                        f'folder, seed<S>), got {", ".join(str(s) for s in seeds if s < 0)}. '
                        'Fix: e.g. --seeds=1,2,3.')
  glue_args = shlex.split(glue_args) if isinstance(glue_args, str) else list(glue_args)
  overrides = list(overrides)
  clashing = [o for o in overrides if o.startswith(('--config.model.attention=', '--config.seed='))]
  if clashing:
    raise AblationError(f'{clashing}: the runner sets the variant and seed of each run; use '
                        f'--variants and --seeds.')
  requested = resolve_config(config, overrides)
  if not summarize_only:   # else each run failed alone, its folder made, 'resume' advised
    try:   # e.g. configs/sym_small.py without --config.data.shards_dir
      config_check.check_data_named(requested)
    except config_check.ConfigError as e:
      raise AblationError(str(e)) from None
  if requested.get('eval_steps', 1) < 1:   # was an IndexError after training the grid
    raise AblationError(f'config.eval_steps={requested.eval_steps}: the ablation compares '
                        'the runs\' eval losses, so it needs them. Fix: eval_steps >= 1.')
  unknown = [v for v in variants if v not in attention.VARIANTS]
  if unknown:
    raise AblationError(f'Unknown variant(s) {unknown}; choose from {attention.VARIANTS}.')
  if glue_tasks and not summarize_only:
    check_glue_inputs(glue_dir, glue_tasks, glue_seeds, glue_args, data=False)
  # Said before the grid trains, over the whole grid's runs (the summary's), with the fix.
  left_out = left_out_runs(workdir, *whole_grid(workdir, variants, seeds, say=False), requested,
                           summarize_only)
  if left_out:
    print(left_out, flush=True)
  stop, previous_handlers = _install_stop()
  try:
    actions = _run_grid(config, overrides, variants, seeds, workdir, requested, stop,
                        summarize_only=summarize_only, glue_dir=glue_dir,
                        glue_tasks=glue_tasks, glue_seeds=glue_seeds, glue_args=glue_args,
                        python=python)
  finally:
    for signum, handler in previous_handlers.items():
      if handler is not None:   # None: set outside Python, cannot be put back
        signal.signal(signum, handler)
  variants, seeds = whole_grid(workdir, variants, seeds)
  summary = summarize(workdir, variants, seeds, total_steps=int(requested.total_steps),
                      target_loss=target_loss, requested=requested)
  summary['actions'] = actions
  return summary


# GLUE arguments that say where its data is (a config file of its own included): the
# runner does not rebuild GLUE's config, so it leaves checking their data to bert_sym.glue.
_GLUE_DATA_ARGS = ('--config', '--config.glue_dir', '--glue_dir', '--config.tfds_data_dir')


def check_glue_inputs(glue_dir: str, tasks: str, seeds: str, glue_args: Sequence[str], *,
                      data: bool) -> None:
  """GLUE's tasks and seeds (and with `data`, its data) checked as bert_sym.glue checks
  them, before a run trains: a wrong --glue_dir failed only after the first run's
  training (hours at scale)."""
  # pylint: disable=import-outside-toplevel
  from bert_sym.glue import data as glue_data, reuse, suite
  try:
    specs = glue_data.parse_tasks(tasks)
    reuse.parse_seeds(seeds)
  except ValueError as e:
    raise AblationError(f'--glue_tasks={tasks} --glue_seeds={seeds}: {e}') from None
  if not data or any(a.split('=')[0] in _GLUE_DATA_ARGS for a in glue_args):
    return
  try:
    suite.check_data(ml_collections.ConfigDict(dict(glue_dir=glue_dir, tfds_data_dir='')),
                     specs)
  except glue_data.GlueDataError as e:
    raise AblationError(f'GLUE data, checked before training: {e}') from None


def _refuse_mixed_resumes(requested, variants, seeds, workdir) -> None:
  """Refuses, before anything trains, a run with checkpoints but no metrics.jsonl (its curve
  is lost: see runs.LOST_CURVE), and to resume a run whose checkpoint was trained with
  another config: the trainer goes on with any config that restores (a learning rate, a
  schedule's total_steps) and rewrites config.json, so the run became a mix of the two
  that nothing downstream could see."""
  mixed, lost = [], []
  for variant in variants:
    for seed in seeds:
      path = run_dir(workdir, variant, seed)
      step = latest_finished_step(path)
      if step is not None and not (path / 'metrics.jsonl').exists():
        lost.append(f'{variant}/seed{seed} (checkpoint at step {step})')
      if (step is None or step >= int(requested.total_steps)
          or not (path / checkpoint_lib.CONFIG_FILE).exists()):
        continue
      changed = config_differences(requested, checkpoint_lib.read_config(path), variant, seed)
      if changed:
        mixed.append(f'{variant}/seed{seed} (checkpoint at step {step}; {", ".join(changed)})')
  if lost:
    raise AblationError(f'{"; ".join(lost)}: {LOST_CURVE}.')
  if mixed:
    raise AblationError(
        f'Unfinished run(s) trained with a config that differs from the requested one: '
        f'{"; ".join(mixed)}. Resuming would train the rest of each with another config. '
        f'Rerun with the config they were trained with, or move their folders away to '
        f'train them anew.')


def _stop_if_requested(stop: _Stop) -> None:
  """A SIGTERM or Ctrl-C that came while no child could take it (between runs, or as a
  trainer was past its last step and exited 0) stops the grid before the next run starts."""
  if stop.interrupted:
    raise Stopped(INTERRUPTED_EXIT_CODE)
  if stop.requested:
    raise Stopped(PREEMPTED_EXIT_CODE)


def _run_grid(config, overrides, variants, seeds, workdir, requested, stop, *,
              summarize_only, glue_dir, glue_tasks, glue_seeds, glue_args, python) -> dict:
  total_steps = int(requested.total_steps)
  if not summarize_only:
    _refuse_mixed_resumes(requested, variants, seeds, workdir)
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
      elif summarize_only:
        actions[name] = 'missing'
        # Finished at its own total_steps, another than asked: the grid's overrides are missing.
        own = (checkpoint_lib.read_config(path).get('total_steps')
               if (path / checkpoint_lib.CONFIG_FILE).exists() else None)
        hint = (f' It finished its own total_steps={own}: summarize with the overrides the grid '
                f'was run with (--config.total_steps={own}, ...).'
                if own and own != total_steps and latest_finished_step(path) == own else '')
        print(f'{name}: {why}; --summarize_only, left out.{hint}', flush=True)
        continue
      else:
        _stop_if_requested(stop)
        if glue_tasks and 'trained' not in actions.values():   # a finished grid needs no data
          check_glue_inputs(glue_dir, glue_tasks, glue_seeds, glue_args, data=True)
        print(f'{name}: {why}; training.', flush=True)
        train_run(config, overrides, variant, seed, path, stop, python=python)
        actions[name] = 'trained'
      if glue_tasks and not summarize_only:
        _stop_if_requested(stop)
        glue_run(path, glue_dir=glue_dir, tasks=glue_tasks, seeds=glue_seeds,
                 glue_args=glue_args, stop=stop, python=python)
  if not summarize_only:
    print(f'Grid done in {time.time() - start:.0f} s.', flush=True)
  return actions

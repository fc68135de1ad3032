"""What every command line of bert_sym shares: a user error is one line, a traceback a bug.

`python -m bert_sym.train | glue | hf_export | shards | ablate | aot` run their main through
`run` (absl programs) or `guard` (argparse). A problem with what the user gave (a flag, a
path, a file, a config, data that is not prepared) is printed as one line

    bert_sym.train: error: <what is wrong>. Fix: <what to do>

and the process exits with EXIT_USER_ERROR. Our own checks raise `UserError` (or a
subclass: `config_check.ConfigError`, `input.DataError`); the few foreign exceptions that
can only mean a user error (a config file that does not load, a malformed flag, a TFDS
dataset that was never prepared, a path that does not exist) are recognised here, in one
place, instead of in a try/except per command. Anything else is a bug and keeps its
traceback. `--help` exits 0 (absl exits 1 after printing it).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import functools
import os
import pathlib
import re
import sys
import time
import traceback
from typing import Callable, Sequence

EXIT_USER_ERROR = 1
EXIT_INTERRUPTED = 130
EXIT_PREEMPTED = 42   # every process saved the same step, then exits (bert_sym.loop)
HELP_FLAGS = ('--help', '-help', '-h', '--helpshort', '--helpfull', '-?')
# The checkout this package runs from (an editable install): its configs/ directory.
CHECKOUT = pathlib.Path(__file__).resolve().parents[1]


class UserError(Exception):
  """A problem with the user's input; the message names it and the fix, in one line."""


def one_line(text: str) -> str:
  """The message as one line (multi-line messages of libraries joined with '; ')."""
  lines = [line.strip() for line in str(text).strip().splitlines() if line.strip()]
  return '; '.join(lines)


def fail(prog: str, message: str, code: int = EXIT_USER_ERROR):
  print(f'{prog}: error: {one_line(message)}', file=sys.stderr, flush=True)
  sys.exit(code)


def raised_in(error: BaseException, package: str) -> bool:
  """Whether `error` passed through a file of `package` (a library that signals user
  errors with generic exceptions)."""
  return any(package in frame.filename for frame in traceback.extract_tb(error.__traceback__))


TFDS_FIX = ('Fix: prepare the dataset once where there is internet (tfds build NAME '
            '--data_dir=DIR) and point the command at DIR (--tfds_data_dir=DIR for the '
            'shard export, --config.tfds_data_dir=DIR for GLUE).')


# Limits of the machine, not bugs: what a user does (checkpoint.saving names a save's own).
_MACHINE_LIMITS = {
    errno.ENOSPC: 'the disk is full. Fix: free space',
    errno.EDQUOT: 'the disk quota is exceeded. Fix: free space or raise the quota',
    errno.EROFS: 'the filesystem is read-only. Fix: write to another directory',
    errno.EMFILE: 'this process may open no more files. Fix: raise the limit (ulimit -n)',
    errno.ENFILE: 'the system may open no more files. Fix: close other programs or raise '
                  'fs.file-max',
}


def user_error_message(error: BaseException) -> str | None:
  """The one-line message when `error` is a user error, else None (a bug)."""
  from absl import app  # pylint: disable=import-outside-toplevel
  from absl import flags  # pylint: disable=import-outside-toplevel
  if isinstance(error, UserError):
    return str(error)
  if isinstance(error, app.UsageError):
    return str(error) if '--help' in str(error) else f'{error} (see --help)'
  if isinstance(error, flags.Error):
    return _flag_error_message(error)
  if isinstance(error, (ValueError, IndexError)) and raised_in(error, 'config_path'):
    return malformed_key_message(error)
  if raised_in(error, 'tensorflow_datasets'):
    # e.g. KeyError "Trying to access splits['train'] but splits is empty": a dataset
    # that `tfds build` never prepared in the data dir given (or the default one).
    return (f'TFDS could not load the dataset ({type(error).__name__}: '
            f'{one_line(error)[:300]}). {TFDS_FIX}')
  if isinstance(error, (ImportError, SyntaxError)) and raised_in(error, 'config_flags'):
    # A syntax error names its own line; an import error's is the traceback's last frame.
    last = traceback.extract_tb(error.__traceback__)[-1]
    where = (f'{error.filename}, line {error.lineno}: ' if isinstance(error, SyntaxError)
             else f'{last.filename}, line {last.lineno}: ')
    fix = ('correct that line' if isinstance(error, SyntaxError) else
           'install that module, or import it from where it is (this checkout\'s configs/ '
           'is importable from any directory)')
    return (f'the config file does not load ({where}{type(error).__name__}: '
            f'{getattr(error, "msg", None) or error}). Fix: {fix}.')
  if (isinstance(error, AttributeError) and "'get_config'" in str(error)
      and raised_in(error, 'config_flags')):
    # e.g. --config=configs/common.py, the shared defaults the experiment files build on.
    return ('the config file defines no get_config(): it is not an experiment config. Fix: '
            'pass one that does (configs/tiny.py, sym_base.py, ... for training and '
            'bert_sym.aot; configs/glue.py for GLUE); configs/common.py holds only the '
            'defaults they share.')
  if isinstance(error, OSError) and 'earlier failure to load' in str(error):
    # ml_collections' placeholder for a config that did not load (bert_sym.ablate's parse)
    detail = [line.strip() for line in str(error).splitlines() if line.strip()]
    return (f'the config file {detail[-2] if len(detail) > 1 else ""} cannot be loaded '
            f'({detail[-1]}). Fix: pass an existing config file, e.g. '
            '--config=configs/tiny.py (paths are relative to the current directory).')
  if isinstance(error, (FileNotFoundError, NotADirectoryError, IsADirectoryError,
                        PermissionError)):
    return f'{error}. Fix: check the path (and its permissions) given on the command line.'
  if isinstance(error, OSError) and error.errno in _MACHINE_LIMITS:
    return f'{error}: {_MACHINE_LIMITS[error.errno]}, then rerun the same command.'
  if another_process_stopped(str(error)):
    return (f'another process of this run stopped or stalled ({type(error).__name__}: '
            f'{one_line(error)[:300]}); its own log says why. Fix that, then rerun the same '
            'command on every host to resume.')
  return None


# How a collective or barrier says that a peer process has gone (gloo on CPU, the
# coordination service's barriers on every platform, and orbax's own words when it wraps
# such a barrier's timeout in a TimeoutError of its async save). Not a bare
# DEADLINE_EXCEEDED or "reset by peer": storage (GCS) says those of its own reads and writes.
_PEER_GONE = re.compile(r'gloo.*(closed|reset) by peer|Barrier timed out|'
                        r'Timed out while waiting for async_\w+ barrier',
                        re.IGNORECASE | re.DOTALL)


def another_process_stopped(text: str) -> bool:
  """Whether an error, in one of several processes, says that another one is gone."""
  return one_of_several_processes() and bool(_PEER_GONE.search(text))


def malformed_key_message(error, argv: Sequence[str] | None = None) -> str:
  """ml_collections' error for an override in `argv` (sys.argv) whose key is no dotted name
  of keys (dashes, a doubled or trailing dot: --config.data.max-seq-len=64): a traceback."""
  bad = [a for a in (sys.argv if argv is None else argv)[1:] if _OVERRIDE.match(a) and
         not re.fullmatch(r'--(no)?config(\.\w+)+', a.split('=', 1)[0])]
  if not bad:
    return f'a --config.KEY override cannot be read ({one_line(error)}). Fix: --config.A.B=VALUE.'
  key, eq, value = bad[0].partition('=')
  key, item = key.partition('[')[0], '[' in key   # --config.sharding_rules[1]=...
  meant = re.sub(r'\.\.+', '.', key[2:].replace('-', '_')).rstrip('.')   # max-seq-len, a..b
  if item and re.fullmatch(r'config(\.\w+)+', meant):
    return f'{bad[0]} sets one item of {meant}. Fix: --{meant}="((...), ...)" (the whole tuple).'
  fix = (f'--{meant}{eq}{value}' if re.fullmatch(r'(no)?config(\.\w+)+', meant)
         else '--config.A.B=VALUE')
  return (f'{bad[0]} names no config key: keys are words of letters, digits and _ joined '
          f'by single dots. Fix: {fix} (--help lists the keys).')


def check_group_overrides(flag_values=None) -> None:
  """Raises UserError for a group of keys given as a dict (--config.mesh="{'data': 2}"),
  which ml_collections puts in place of the whole group: the keys it leaves out were gone
  (a KeyError traceback later) and a mistyped one in it was taken silently."""
  from absl import flags  # pylint: disable=import-outside-toplevel
  from ml_collections import config_dict  # pylint: disable=import-outside-toplevel
  flag_values = flag_values or flags.FLAGS
  for name in flag_values:
    flag = flag_values[name]
    if not flag.present or not hasattr(type(flag), 'override_values'):   # a config file's
      continue
    groups = {path: value for path, value in flag.override_values.items()
              if isinstance(value, config_dict.ConfigDict)}
    if not groups:
      continue
    file_config = flag.parser.parse(flag.config_filename)   # the values before overrides
    for path, value in groups.items():
      group = functools.reduce(lambda c, key: c[key], path.split('.'), file_config)
      old, new = _flat(group), _flat(value)
      missing, unknown = sorted(set(old) - set(new)), sorted(set(new) - set(old))
      if missing or unknown:
        what = ' and '.join(([f'leaves out {", ".join(missing)}'] if missing else []) + (
            [f'names keys the group does not have: {", ".join(unknown)}'] if unknown else []))
        # Not the unknown ones: each of those flags would stop on its key in turn.
        one_by_one = ' '.join(f'--{name}.{path}.{k}={v}' for k, v in new.items()
                              if k in old) or f'--{name}.{path}.KEY=VALUE'
        raise UserError(f'--{name}.{path}=... replaces the whole group config.{path} and '
                        f'{what}. Fix: set its keys one by one: {one_by_one} (--help lists '
                        'them).')


def _flat(group, prefix: str = '') -> dict:
  out = {}
  for key, value in group.items():
    if hasattr(value, 'items'):
      out.update(_flat(value, f'{prefix}{key}.'))
    else:
      out[f'{prefix}{key}'] = value
  return out


_FLAGS_OF_OTHER_COMMANDS = {   # one typed to the wrong command: what means it there
    'workdir': {'checkpoint': 'the training workdir to read', 'output_dir': 'where results go'},
    'checkpoint': {'workdir': "the run's directory, resumed if it exists"},
    'output_dir': {'workdir': "the run's directory", 'out_dir': 'where the export goes'},
    'out_dir': {'output_dir': 'where results go', 'workdir': "the run's directory"}}


def _flag_error_message(error) -> str:
  text = str(error).strip()
  if 'as a ConfigDict' in text and (key := re.match(r'flag --([\w.]+)=', text)):
    # --config.model=standard: a group of keys typed as if it were one value.
    return (f'--{key.group(1)} is a group of keys, not one value. Fix: '
            f'--{key.group(1)}.KEY=VALUE for each key to change (--help lists them).')
  typed = re.match(r"flag --([\w.]+)=(\S+): invalid literal for int\(\) with base 10", text)
  if typed:   # 1e6 or 1000.0 for an integer key (total_steps, batch_size, ...)
    key, value = typed.groups()
    whole = float(value) if re.fullmatch(r'\d+(\.\d*)?(e\d+)?', value, re.I) else 0.5
    fix = f'--{key}={int(whole)}' if whole.is_integer() else f'--{key}=<a whole number>'
    return f'--{key}={value}: {key.replace("--", "")} is an integer. Fix: {fix}.'
  # A config file whose get_config() raised: ml_collections puts the traceback into the
  # flag error; the last line is the exception the config file raised.
  if 'Error whilst parsing config file' in text:
    raised = text.splitlines()[-1].strip().rstrip('.')
    fix = '' if 'Fix:' in raised else (' Fix: the --config argument (see the config '
                                       'file\'s docstring).')
    return f'the config file does not load: {raised}.{fix}'   # its own fix, if it says one
  from absl import flags  # pylint: disable=import-outside-toplevel
  name = getattr(error, 'flagname', None) or ''
  meant = [flag for flag in _FLAGS_OF_OTHER_COMMANDS.get(name, ()) if flag in flags.FLAGS]
  if isinstance(error, flags.UnrecognizedFlagError) and meant:   # absl guessed --log_dir
    return (f'--{name} is a flag of another bert_sym command. Fix: '
            + ' or '.join(f'--{m} ({_FLAGS_OF_OTHER_COMMANDS[name][m]})' for m in meant)
            + ' (see --help).')
  if name.startswith('config.') and 'config' in flags.FLAGS:   # a program with --config
    return (f'--{name} overrides a value of the --config file, and no --config is given. '
            'Fix: add --config=FILE, e.g. --config=configs/tiny.py (see --help).')
  return f'{one_line(text)} (see --help)'


def check_config_files(flag_values=None) -> None:
  """Raises UserError for a --config file that did not load (ml_collections defers that
  error to the first use of the config, deep inside the program)."""
  from absl import flags  # pylint: disable=import-outside-toplevel
  flag_values = flag_values or flags.FLAGS
  for name in flag_values:
    flag = flag_values[name]
    if type(flag.value).__name__ != '_ErrorConfig':   # ml_collections' placeholder
      continue
    cause = object.__getattribute__(flag.value, '_error')
    detail = [line.strip() for line in str(cause).splitlines() if line.strip()][-1]
    raise UserError(
        f'--{name}={flag.serialize().split("=", 1)[-1]} cannot be loaded ({detail}). '
        f'Fix: pass an existing config file, e.g. --{name}=configs/tiny.py (paths are '
        f'relative to the current directory, else to the checkout {CHECKOUT}).')


def locate_config_files(argv: Sequence[str]) -> list[str]:
  """`--config=PATH[:ARG]` as typed from any directory: PATH relative to the current
  directory, else to the checkout (whose configs/ the README's commands name), made
  absolute so that subprocesses (ablate's runs) find it too. The directory holding a
  config package goes on sys.path: config files import their siblings (`from configs
  import common`), which the editable install alone does not make importable."""
  if str(CHECKOUT) not in sys.path:   # `from configs import common` in a user's own file
    sys.path.append(str(CHECKOUT))
  argv, out = list(argv), []
  for i, arg in enumerate(argv):
    if arg.startswith('--config=') or (i and argv[i - 1] == '--config'):
      flag, value = ('--config=', arg[len('--config='):]) if arg.startswith('--config=') \
          else ('', arg)
      path, colon, config_arg = value.partition(':')
      file = pathlib.Path(path).expanduser()
      if path and not file.is_absolute() and not file.exists() and (CHECKOUT / file).exists():
        file = CHECKOUT / file
        arg = f'{flag}{file}{colon}{config_arg}'
      if file.is_file() and (file.parent / '__init__.py').exists():
        package_root = str(file.resolve().parent.parent)
        if package_root not in sys.path:
          sys.path.insert(0, package_root)
    out.append(arg)
  return out


# What ml_collections reads as a --config override: absl's `--noconfig.KEY` (a boolean set
# to False) too, which it refuses before --config as it refuses `--config.KEY`.
_OVERRIDE = re.compile(r'--(no)?config\.')


def _config_file_first(argv: Sequence[str]) -> list[str]:
  """argv with `--config=FILE` (or `--config FILE`) moved before the first `--config.KEY`
  override: ml_collections refuses the overrides typed first ("Found --config.x in argv
  before a value for --config was specified"), which ablate's command line accepts."""
  argv = list(argv)
  first_override = next((i for i, a in enumerate(argv) if _OVERRIDE.match(a)), None)
  for i, arg in enumerate(argv):
    if first_override is None or i < first_override:
      continue
    if arg.startswith('--config='):
      return argv[:first_override] + [arg] + argv[first_override:i] + argv[i + 1:]
    if arg == '--config' and i + 1 < len(argv):
      return (argv[:first_override] + argv[i:i + 2] + argv[first_override:i] +
              argv[i + 2:])
  return argv


def expand_home(argv: Sequence[str]) -> list[str]:
  """`--flag=~/x` as the shell expands `--flag ~/x` (bash leaves a ~ after '='): hf_export,
  GLUE, aot and shards wrote into a folder named '~' here, where the trainer read the home.
  --config.KEY overrides keep theirs (expanded where used; cache defaults stay symbolic)."""
  parts = [(arg, *arg.partition('=')) for arg in argv]
  return [f'{flag}={os.path.expanduser(value)}' if eq and value.startswith('~') and
          re.fullmatch(r'-{1,2}[A-Za-z][\w-]*', flag) else arg for arg, flag, eq, value in parts]


def _help_asked(argv: Sequence[str]) -> bool:
  return any(a in HELP_FLAGS for a in argv[1:])


@contextlib.contextmanager
def guard(prog: str, *, help_argv: Sequence[str] = ()):
  """Turns user errors raised inside into `prog: error: ...` and exit 1; a help request
  that ends in SystemExit exits 0; Ctrl-C exits 130 without a traceback."""
  try:
    yield
  except SystemExit as e:
    if _help_asked(help_argv) and e.code not in (None, 0):
      sys.exit(0)
    raise
  except KeyboardInterrupt:
    print(f'{prog}: interrupted', file=sys.stderr, flush=True)
    sys.exit(EXIT_INTERRUPTED)
  except BaseException as e:  # pylint: disable=broad-except
    message = user_error_message(e)
    if message is None:
      raise
    fail(prog, message)


def run(main: Callable, *, prog: str, flags_parser: Callable | None = None,
        argv: Sequence[str] | None = None) -> None:
  """absl's `app.run(main)` with the error handling of this module (see the docstring)."""
  from absl import app  # pylint: disable=import-outside-toplevel
  from absl import flags  # pylint: disable=import-outside-toplevel
  argv = _config_file_first(locate_config_files(expand_home(sys.argv if argv is None else argv)))
  if any(map(_OVERRIDE.match, argv)):   # ml_collections reads them from sys.argv
    sys.argv[:] = argv
  argv = [a if a not in ('-h', '-?') else '--help' for a in argv]   # absl knows neither
  from bert_sym import tpu  # pylint: disable=import-outside-toplevel
  tpu.use_the_cpu_without_a_tpu()

  def parse(args):
    with guard(prog, help_argv=args):
      rest = (flags_parser or flags.FLAGS)(args)
      check_config_files()
      check_group_overrides()
      return rest

  def guarded_main(args):
    try:
      with guard(prog):
        return main(args)
    except SystemExit as e:
      if e.code not in (None, 0, EXIT_PREEMPTED):
        if not isinstance(e.code, int) and one_of_several_processes():
          print(e.code, file=sys.stderr)   # what the normal exit would print (os._exit won't)
        leave_a_multiprocess_run(e.code if isinstance(e.code, int) else EXIT_USER_ERROR)
      raise
    except BaseException:   # a bug
      if one_of_several_processes():
        traceback.print_exc()   # what the normal exit would print
        leave_a_multiprocess_run(EXIT_USER_ERROR)
      raise

  app.run(guarded_main, argv=argv, flags_parser=parse)


def leave_a_multiprocess_run(code: int) -> None:
  """Ends this process now if it is one of several (jax.distributed); else returns.

  A normal exit runs jax.distributed.shutdown, whose barrier waits for every process; the
  others may be blocked in a collective this one left (a checkpoint save, a train step),
  so both waited for the barrier's timeout (5 minutes) and aborted (exit 134). Without it
  they see the connection close and stop on their own error at once."""
  if one_of_several_processes():
    sys.stdout.flush()
    sys.stderr.flush()
    _leave_together()
    os._exit(code)  # pylint: disable=protected-access


# How long a leaving process waits for the others to leave too (an error every process met).
LEAVE_TOGETHER_MS = 10_000


def _leave_together() -> None:
  """Process 0 serves jax.distributed's coordination service: gone first, it made a host
  still on its way out of the same error abort (SIGABRT, "the JAX distributed service
  detected fatal errors") instead of exiting with its own code. So the processes meet at a
  short barrier and process 0 leaves last; a host that does not come (stuck in a collective
  this one left, or gone) only delays the exit by the barrier's timeout."""
  import jax  # pylint: disable=import-outside-toplevel
  from jax._src import distributed as jax_distributed  # pylint: disable=import-outside-toplevel
  client = jax_distributed.global_state.client
  try:
    client.wait_at_barrier('bert_sym_leave', LEAVE_TOGETHER_MS)
  except Exception:  # pylint: disable=broad-except
    return
  if jax.process_index() == 0:
    time.sleep(2.0)   # the others' os._exit first


def one_of_several_processes() -> bool:
  jax = sys.modules.get('jax')   # not imported: not started by jax.distributed either
  return jax is not None and jax.distributed.is_initialized() and jax.process_count() > 1


class ArgumentParser(argparse.ArgumentParser):
  """argparse with errors as one `prog: error: ...` line and exit 1 (not usage + exit 2)."""

  def error(self, message):
    raise UserError(f'{message} (see --help)')

"""One trainer per workdir: an flock on a lock file that names its holder; and one run
across hosts: the same config, and a workdir every host shares."""

import contextlib
import fcntl
import json
import os
import socket
import time

import jax

from bert_sym.checkpoint.core import absolute, allgather_json, flat_config
from bert_sym.cli import UserError, another_process_stopped


# ---- One trainer per workdir ----

LOCK_FILE = 'trainer.lock'
GLUE_LOCK_FILE = 'glue.lock'   # one GLUE command per --output_dir (bert_sym.glue.suite)
# The open lock file of each workdir this process holds (the lock lives as long as it is
# open: the kernel releases it when the holder dies, however it dies).
_HELD = {}


class WorkdirBusy(ValueError):
  """Another live trainer holds the workdir."""


class HostsDisagree(UserError, ValueError):
  """The processes of one multi-host run were not started as one run."""


def inputs_checked_on_every_host(check, what: str = 'run'):
  """`check()` (this host's checks of its inputs; it returns the config to run) on every
  host, then check_same_config_on_every_host. A host whose check raised used to leave
  while the others waited for it in the config comparison, their first collective, until
  they died in a traceback (gloo: "GetKeyValue() timed out"): a data path missing on one
  node's disk. It now tells them there before raising, so each stops in one line."""
  with _others_told_of_a_failure():
    config = check()
  check_same_config_on_every_host(config, what)
  return config


@contextlib.contextmanager
def _others_told_of_a_failure():
  """A host whose block raised says it at the others' next meeting (the [problem, theirs]
  allgather of _raise_if_any_stopped's callers), where they raise on it."""
  try:
    yield
  except Exception as e:
    if jax.process_count() > 1 and not another_process_stopped(str(e)):
      allgather_json([str(e) or type(e).__name__, None])
    raise


@contextlib.contextmanager
def checked_on_every_host(what: str = 'run'):
  """The block (this host's checks of what only it sees: a directory it creates, a file it
  reads), then a meeting of every host: one whose block raised tells the others there, so
  each stops in one line (as inputs_checked_on_every_host). Left alone, that host exited
  while the others went on into their next collective: they died on a lost connection, or
  aborted (SIGABRT) when the leaver was process 0, which serves jax.distributed. A
  collective inside the block must come before anything that can raise on one host only:
  that host's meeting here would otherwise meet the others' inner collective."""
  with _others_told_of_a_failure():
    yield
  if jax.process_count() > 1:
    _raise_if_any_stopped(allgather_json([None, None]), what)


def check_same_config_on_every_host(config, what: str = 'run') -> None:
  """Every process runs process 0's config (which alone is written to config.json).

  Hosts started with other overrides (total_steps, a seed, a learning rate) either hang in
  a collective that only some of them reach, or silently train one model from several
  recipes."""
  if jax.process_count() == 1:
    return
  gathered = allgather_json([None, flat_config(config)])
  _raise_if_any_stopped(gathered, what)
  everyone = [theirs for _, theirs in gathered]
  first = everyone[0]
  differing = {index: sorted(k for k in set(theirs) | set(first)
                             if theirs.get(k) != first.get(k))
               for index, theirs in enumerate(everyone) if theirs != first}
  if differing:
    index, keys = next(iter(differing.items()))
    shown = ', '.join(f'{k}={everyone[index].get(k)!r} (process 0: {first.get(k)!r})'
                      for k in keys[:3])
    raise HostsDisagree(
        f'the processes of this {what} were started with different configs: process '
        f'{index} differs from process 0 in {shown}{", ..." if len(keys) > 3 else ""} '
        f'({len(differing)} process(es) differ). Fix: start every process with the same '
        'command (the same --config file, overrides and data paths).')


def inputs_read_alike_on_every_host(build, what: str = 'run'):
  """`build()` (this host's input pipeline: an object with `train_iter` and `eval_iter`)
  on every host, then every host's iterator states compared with process 0's. The config
  comparison cannot see data: hosts given one shards_dir each read their own copy, and a
  node-local copy from another export (another block count or vocabulary) trained every
  host's rows from its own corpus, without a word, and saved their diverging positions."""
  with _others_told_of_a_failure():
    data = build()
  if jax.process_count() == 1:
    return data
  splits = (('train', data.train_iter), ('validation', data.eval_iter))
  gathered = allgather_json([None, {split: it.get_state() for split, it in splits if it}])
  _raise_if_any_stopped(gathered, what)
  first = gathered[0][1]
  for index, (_, theirs) in enumerate(gathered):
    for split in sorted(set(first) | set(theirs)):
      mine, ours = theirs.get(split, {}), first.get(split, {})
      keys = sorted(k for k in set(mine) | set(ours) if mine.get(k) != ours.get(k))
      if keys:
        shown = ', '.join(f'{k}={mine.get(k)!r} (process 0: {ours.get(k)!r})' for k in keys[:3])
        raise HostsDisagree(
            f'the processes of this {what} read different data: process {index}\'s {split} '
            f'split has {shown}{", ..." if len(keys) > 3 else ""}. Fix: give every host the '
            'same data (one shared config.data.shards_dir, the same text files and '
            'vocabulary, not node-local copies that differ), then rerun the same command '
            'on every host.')
  return data


def _raise_if_any_stopped(gathered, what: str) -> None:
  stopped = [(index, problem) for index, (problem, _) in enumerate(gathered) if problem]
  if stopped:   # its inputs failed its checks (inputs_checked_on_every_host)
    index, problem = stopped[0]
    raise HostsDisagree(
        f'process {index} of this {what} stopped on its inputs: {problem} '
        f'({len(stopped)} process(es) stopped). Fix that on every host (a path must be the '
        'same shared one on all), then rerun the same command on every host.')


@contextlib.contextmanager
def workdir_lock(workdir, log=print, *, lock_file: str = LOCK_FILE, kind: str = 'trainer',
                 flag: str = '--workdir', shared: bool = True):
  """Held by process 0 for the whole run: a second trainer on the same workdir stops at
  once instead of deleting the first one's saves and interleaving its metrics. (GLUE
  takes one on its --output_dir: `lock_file`, and the `kind` and `flag` its messages
  name, and `shared=False`: only process 0 writes there, so other hosts need not see it.)

  An flock on `trainer.lock`, which names the holder (host, pid, start) for the message.
  The kernel drops the lock when the holder dies (SIGKILL, OOM, a restarted container),
  so no guess about whether a pid is alive is needed, and two trainers taking over a dead
  one's lock at once cannot both win (a takeover by unlink could: each judged it stale).
  Object stores (gs://) and filesystems without locks: the lock is not taken (one trainer
  per workdir is then the user's job, as with any orbax run).
  """
  path = os.path.join(str(absolute(workdir)), lock_file)
  local = '://' not in str(workdir)
  problem, error, holder = None, None, None
  if local and jax.process_index() == 0:
    try:
      holder = _take_lock(path, log, kind, flag)
    except WorkdirBusy as e:
      problem = str(e)
    except Exception as e:  # pylint: disable=broad-except
      error, problem = e, f'{type(e).__name__}: {e}'   # every host stops, not only this one
  problem, holder = allgather_json([problem, holder])[0]
  if error is not None:
    raise error
  if problem:
    raise WorkdirBusy(problem)
  try:
    if shared:
      _check_every_host_sees(path, holder, workdir)
    yield
  finally:
    _release(path)


def _check_every_host_sees(path, holder, workdir) -> None:
  """Every host reads the lock file that process 0 wrote: else each host would write its
  share of every checkpoint into its own directory (a node-local path on a cluster), no
  step would ever be complete, and the run would hang at its first save."""
  if holder is None or jax.process_count() == 1:
    return
  blind = [index for index, sees in enumerate(allgather_json(_lock_holder(path) == holder))
           if not sees]
  if blind:
    raise HostsDisagree(
        f'--workdir={workdir} is not one directory shared by every process: process(es) '
        f'{", ".join(map(str, blind))} do not see the lock file {path} that process 0 wrote '
        'there (a node-local path?). Fix: a --workdir on a filesystem every host mounts '
        '(NFS, Lustre, ...) or gs://.')


def _release(path) -> None:
  if path in _HELD:
    fd = _HELD.pop(path)
    # Unlinked before it is unlocked: a trainer that opened it meanwhile then finds its
    # lock is on a deleted file and takes a fresh one (see _take_lock).
    with contextlib.suppress(OSError):
      if os.path.samestat(os.fstat(fd), os.stat(path)):
        os.unlink(path)
    os.close(fd)


def _lock_holder(path) -> dict:
  try:
    with open(path) as f:
      return _holder_text(f.read())
  except OSError:
    return {}


def _take_lock(path, log, kind: str = 'trainer', flag: str = '--workdir') -> dict | None:
  """The holder written into the lock file; None where the filesystem cannot lock."""
  me = {'host': socket.gethostname(), 'pid': os.getpid(),
        'started': time.strftime('%Y-%m-%d %H:%M:%S %Z')}
  for _ in range(5):
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      os.close(fd)
      holder = _lock_holder(path)
      raise WorkdirBusy(
          f'{os.path.dirname(path)} is in use by another {kind} (pid '
          f'{holder.get("pid", "?")} on {holder.get("host", "?")}, since '
          f'{holder.get("started", "?")}; lock file {path}). Wait for it to finish or use '
          f'another {flag}.') from None
    except OSError as e:   # ENOLCK / EOPNOTSUPP: e.g. an NFS mount without lockd, FUSE
      os.close(fd)
      log(f'WARNING: {path} cannot be locked on this filesystem ({e.strerror}); a second '
          f'{kind} on this {flag} would not be stopped.')
      return None
    try:   # the holder before us unlinked it between our open and our lock: not the lock
      current = os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
      current = False
    if not current:
      os.close(fd)
      continue
    with os.fdopen(os.dup(fd), 'r+') as f:
      previous = _holder_text(f.read())
      if previous:   # left by a trainer that died without releasing it
        log(f'WARNING: taking over {path}: its holder (pid {previous.get("pid", "?")} on '
            f'{previous.get("host", "?")}) is no longer running.')
      f.seek(0)
      f.truncate()
      json.dump(me, f)
    _HELD[path] = fd
    return me
  raise WorkdirBusy(f'Could not take the lock {path}; another {kind} keeps taking it.')


def _holder_text(text: str) -> dict:
  try:
    return json.loads(text) if text.strip() else {}
  except ValueError:
    return {'pid': '?'}

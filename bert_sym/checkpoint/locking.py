"""One trainer per workdir: a lock file taken atomically, aware of stale holders."""

import contextlib
import json
import os
import socket
import time

import jax

from bert_sym.checkpoint.core import absolute, allgather_json


# ---- One trainer per workdir ----

LOCK_FILE = 'trainer.lock'
# Lock files this process holds now. A lock naming this process's pid that is not here was
# left by an earlier process that had the same pid (a container restarted after a SIGKILL
# or OOM often gets the same pid and hostname): stale, not ours.
_HELD = set()


class WorkdirBusy(ValueError):
  """Another live trainer holds the workdir."""


@contextlib.contextmanager
def workdir_lock(workdir, log=print):
  """Held by process 0 for the whole run: a second trainer on the same workdir stops at
  once instead of deleting the first one's saves and interleaving its metrics.

  The lock file holds the holder's host and pid and is created atomically (O_EXCL). A lock
  left by a dead process on this host is taken over with a warning. Object stores (gs://)
  have no O_EXCL: there the lock is not taken (one trainer per gs:// workdir is the user's
  job, as with any orbax run).
  """
  path = os.path.join(str(absolute(workdir)), LOCK_FILE)
  local = '://' not in str(workdir)
  problem = None
  if local and jax.process_index() == 0:
    try:
      _take_lock(path, log)
    except WorkdirBusy as e:
      problem = str(e)
  problem = allgather_json(problem)[0]
  if problem:
    raise WorkdirBusy(problem)
  held = local and jax.process_index() == 0
  if held:
    _HELD.add(path)
  try:
    yield
  finally:
    if held:
      _HELD.discard(path)
      if _lock_holder(path).get('pid') == os.getpid():
        os.unlink(path)


def _lock_holder(path) -> dict:
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return {}


def _is_stale(path, holder: dict) -> bool:
  if not holder:   # unparsable: stale unless it is being written right now
    return time.time() - os.path.getmtime(path) > 30
  if holder.get('host') != socket.gethostname():
    return False   # cannot tell whether a process on another host is alive
  if holder.get('pid') == os.getpid():
    return path not in _HELD
  try:
    os.kill(int(holder['pid']), 0)
  except ProcessLookupError:
    return True
  except (PermissionError, ValueError, KeyError, TypeError):
    return False
  return False


def _take_lock(path, log) -> None:
  me = {'host': socket.gethostname(), 'pid': os.getpid(),
        'started': time.strftime('%Y-%m-%d %H:%M:%S %Z')}
  for _ in range(3):
    try:
      fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      holder = _lock_holder(path)
      if not _is_stale(path, holder):
        raise WorkdirBusy(
            f'{os.path.dirname(path)} is in use by another trainer (pid '
            f'{holder.get("pid", "?")} on {holder.get("host", "?")}, since '
            f'{holder.get("started", "?")}; lock file {path}). Wait for it to finish or use '
            'another --workdir; if that process is gone, delete the lock file.') from None
      log(f'WARNING: taking over {path}: its holder (pid {holder.get("pid", "?")} on this '
          'host) is no longer running.')   # (or was an earlier process with our pid)
      with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
      continue
    with os.fdopen(fd, 'w') as f:
      json.dump(me, f)
    return
  raise WorkdirBusy(f'Could not take the workdir lock {path}; another trainer keeps taking it.')

"""Saving a step; a failed save (disk full, permission, quota) stops the run at once."""

import errno
import logging as std_logging
import os
import sys
import threading
import time
import warnings
import weakref
from typing import Any

import jax
import orbax.checkpoint as ocp

from bert_sym import cli
from bert_sym.checkpoint.rotation import remove_rotated_out
from bert_sym.checkpoint.core import CheckpointSaveError, DATA_ITER, STATE, allgather_json, describe_error, finished_steps, is_closed_loop_error


def save(manager: ocp.CheckpointManager, step: int, state: dict, data_state: Any, *,
         force: bool = False, meter_state: dict | None = None,
         lineage: list | None = None) -> bool:
  """Saves (asynchronously if configured) and returns whether a save was started.

  Must be called by every process. Arrays are copied off the devices before this
  returns, so the caller may donate `state` to the next update step right away. A
  failure, here or in the previous background save, raises CheckpointSaveError.
  `meter_state` (JSON) and `lineage` (core.extend_lineage) go into the data_iter item
  beside the input positions.
  """
  # With the input positions, every process says whether its last background save failed:
  # all of them stop here together (check_saves left it to this boundary).
  failure = _background_failure(manager)
  gathered = allgather_json([data_state, _failure_kind(failure)])
  _raise_if_any_failed(manager, failure, [kind for _, kind in gathered])
  data_item = {'process_count': jax.process_count(), 'states': [g[0] for g in gathered]}
  if meter_state is not None:   # the same on every process (pretrain_loop.meter_state)
    data_item['meter'] = meter_state
  if lineage is not None:
    data_item['lineage'] = lineage
  _watch_writes(manager)
  try:
    # The previous (background) save's failure surfaces here. Once it is done, the steps
    # its rotation moved out can go: no rename into that folder is in flight.
    manager.wait_until_finished()
    remove_rotated_out(manager.directory)
    started = manager.save(step, force=force, args=ocp.args.Composite(**{
        STATE: ocp.args.StandardSave(state),
        DATA_ITER: ocp.args.JsonSave(data_item)}))
  except Exception as e:  # pylint: disable=broad-except
    raise _save_failed(manager, _failed_step(manager, step), e) from None
  _LAST_STARTED[manager] = step
  return started


# The step of each manager's latest started save: a background failure belongs to it.
_LAST_STARTED = weakref.WeakKeyDictionary()


def _failed_step(manager, current: int | None = None) -> int | None:
  previous = _LAST_STARTED.get(manager)
  if previous is not None and previous != current and previous not in manager.all_steps():
    return previous
  return current if current is not None else previous


# A background save's failure as this process first saw it (_write_failure), kept until
# every process stops on it: the error line (and its clean-up of the step's files) is made
# only then, when no process is still writing.
_FAILURES = weakref.WeakKeyDictionary()


def _background_failure(manager) -> Exception | None:
  if (failure := _write_failure(manager)) is not None:
    _FAILURES.setdefault(manager, failure)
  return _FAILURES.get(manager)


# Each orbax writer's failed background write, recorded as its thread ends (_watch_writes).
_WRITE_FAILURES = weakref.WeakKeyDictionary()


def _writer(manager):
  """orbax's background writer of asynchronous saves (None: synchronous saves, where a
  failure raises in `manager.save` itself, or an orbax whose layout this does not know)."""
  writer = getattr(getattr(manager, '_checkpointer', None), '_async_manager', None)
  return writer if hasattr(writer, '_thread_func') and hasattr(writer, '_exception') else None


def _watch_writes(manager) -> None:
  """Records each failed background write as the writer's thread ends, leaving orbax's
  stored error in place.

  `manager.check_for_errors()` takes that error. When it ran before orbax's own finalize
  thread looked, the thread saw none and rotated old checkpoints out as if the failed save
  had been committed (with keep_last=1, the only one). Otherwise the finalize thread took
  it, and held it (in a barrier with the other processes, for up to save_timeout_s) until
  the next save: the run trained on, unsaved, until then."""
  writer = _writer(manager)
  run = getattr(writer, '_thread_func', None)
  if writer is None or getattr(run, 'watched', False):
    return

  def watched_run(*args, **kwargs):
    run(*args, **kwargs)
    if writer._exception is not None:   # pylint: disable=protected-access
      _WRITE_FAILURES[writer] = writer._exception   # pylint: disable=protected-access
  watched_run.watched = True
  writer._thread_func = watched_run   # pylint: disable=protected-access


def _write_failure(manager) -> Exception | None:
  if (writer := _writer(manager)) is not None:
    return _WRITE_FAILURES.get(writer)
  try:   # an orbax layout _watch_writes does not know: its public check (takes the error)
    manager.check_for_errors()
  except Exception as e:  # pylint: disable=broad-except
    return e
  return None


def _failure_kind(failure) -> str | None:
  """What the other processes are told: 'failed' (this one's own write failed), 'waited'
  (it timed out waiting for another one), or None."""
  if failure is None:
    return None
  return 'waited' if cli.another_process_stopped(describe_error(failure)) else 'failed'


def check_saves(manager: ocp.CheckpointManager, *, together: bool = False) -> None:
  """Raises CheckpointSaveError if a background save has failed (cheap: call every step).

  One of several processes raises only `together` (a step where every process checks, the
  loop's log steps) or at the next `save`, and then so do the others: raised at a step of
  its own, it left them blocked in the next step's collective, where they aborted (SIGABRT)
  once it was gone (process 0 takes the coordination service with it)."""
  failure = _background_failure(manager)
  if not cli.one_of_several_processes():
    _raise_if_any_failed(manager, failure, [])
  elif together:
    _raise_if_any_failed(manager, failure, allgather_json(_failure_kind(failure)))


def _raise_if_any_failed(manager, failure, kinds) -> None:
  """This process's own failure first (it names the cause), else the others' (`kinds`,
  one per process: those whose own write failed, else those that timed out waiting)."""
  if failure is not None:
    raise _save_failed(manager, _failed_step(manager), failure) from None
  named = ([i for i, kind in enumerate(kinds) if kind == 'failed'] or
           [i for i, kind in enumerate(kinds) if kind == 'waited'])
  if named:
    raise _save_failed(manager, _failed_step(manager), None, failed_processes=named)


def finish_saves(manager: ocp.CheckpointManager) -> None:
  """Waits for the in-flight save; raises CheckpointSaveError if it failed."""
  if (failure := _FAILURES.get(manager)) is not None:
    raise _save_failed(manager, _failed_step(manager), failure) from None
  try:
    manager.wait_until_finished()
  except Exception as e:  # pylint: disable=broad-except
    raise _save_failed(manager, _failed_step(manager), e) from None
  remove_rotated_out(manager.directory)


_SAVE_CAUSES = ((errno.ENOSPC, 'the disk is full (ENOSPC)'),
                (errno.EDQUOT, 'the disk quota is exceeded (EDQUOT)'),
                (errno.EACCES, 'permission denied (EACCES)'),
                (errno.EROFS, 'the filesystem is read-only (EROFS)'))


def _mute_closed_loop_echoes() -> None:
  """After a failed save, TensorStore keeps calling back into orbax's closed event loop
  (dozens of "RuntimeError: Event loop is closed" tracebacks). The run is over by then."""
  previous_unraisable, previous_except = sys.unraisablehook, sys.excepthook
  sys.unraisablehook = lambda u: (None if is_closed_loop_error(u.exc_value)
                                  else previous_unraisable(u))
  sys.excepthook = lambda t, v, tb: None if is_closed_loop_error(v) else previous_except(t, v, tb)
  # The write tasks that failed are logged by asyncio when collected, at any later time up
  # to interpreter exit ("Task exception was never retrieved" + a traceback each).
  std_logging.getLogger('asyncio').addFilter(
      lambda record: 'exception was never retrieved' not in record.getMessage())


def _release_writers_left_waiting() -> None:
  """When creating the step's directory fails (ENOSPC, EACCES), orbax's writer threads of
  that save wait for a "directory created" signal that never comes, for the coordination
  timeout (300 s); they are not daemons, so the process hung that long after saying the
  error. The run is over: cancel them and send the signals they wait for, so they return."""
  try:
    from orbax.checkpoint._src.futures import future as orbax_future  # pylint: disable=g-import-not-at-top
  except ImportError:   # another orbax layout: nothing of ours to release
    return
  thread_class = getattr(orbax_future, '_SignalingThread', None)
  for thread in threading.enumerate() if thread_class else []:
    if isinstance(thread, thread_class) and thread.is_alive():
      thread.cancel()   # it returns as soon as its wait ends, without running the write
      try:
        orbax_future.set_signals(thread._receive_signals,   # pylint: disable=protected-access
                                 operation_id=thread._operation_id)  # pylint: disable=protected-access
      except Exception:  # pylint: disable=broad-except
        pass   # best effort: at worst the old wait-out-the-timeout behaviour


def remove_unfinished_steps(manager) -> None:
  """The temporary directories of saves that did not finish (orbax's own start-up would
  remove them; a run that stops on a failed save leaves none)."""
  for tmp in manager.directory.glob('*.orbax-checkpoint-tmp*') if jax.process_index() == 0 else []:
    # Writes of the failed save still running recreate files as it goes (ENOTEMPTY, seen
    # once in CI): a traceback over the one line that says the failure. Retried; what is
    # left, orbax's start-up removes.
    for attempt in range(3):
      try:
        tmp.rmtree(missing_ok=True)
        break
      except OSError:
        time.sleep(0.5 * (attempt + 1))


def _save_failed(manager, step, error, *, failed_processes=()) -> CheckpointSaveError:
  """One line naming step, path and cause (`error`, or the other processes whose save
  failed); the unfinished step's temporary files removed."""
  # The run ends here: orbax's abandoned write coroutines would each print a warning when
  # collected at exit, after the one line that says what happened.
  warnings.filterwarnings('ignore', 'coroutine .* was never awaited', RuntimeWarning)
  _mute_closed_loop_echoes()
  _release_writers_left_waiting()
  text = (f'process(es) {", ".join(map(str, failed_processes))} reported it failed'
          if failed_processes else describe_error(error))
  for chained in (error, error.__cause__, error.__context__) if error is not None else ():
    if isinstance(chained, OSError) and chained.errno is not None:
      text = describe_error(chained)
      break
  cause = next((why for number, why in _SAVE_CAUSES
                if os.strerror(number) in text or f'errno {number}' in text.lower()), text)
  fix = 'Free space or fix the permissions'
  if failed_processes or cli.another_process_stopped(text):   # this host's save was fine
    cause = f'another process of this run stopped or stalled in this save ({text[:200]})'
    fix = 'Its own log says why: fix that'
  elif 'RESOURCE_EXHAUSTED' in text:   # TensorStore's word for ENOSPC / EDQUOT
    cause = 'the disk is full or over quota (ENOSPC / EDQUOT)'
  elif 'PERMISSION_DENIED' in text:
    cause = 'permission denied (EACCES)'
  remove_unfinished_steps(manager)
  kept = [s for s in finished_steps(manager.directory) if s != step]
  previous = (f'the previous checkpoint (step {kept[-1]}) is intact' if kept
              else 'no earlier checkpoint exists')
  where = manager.directory / str(step) if step is not None else manager.directory
  return CheckpointSaveError(
      f'Saving checkpoint step {step} to {where} failed: {cause}. The run stops here; '
      f'{previous}. {fix}, then rerun the same command to resume.')

"""Muting orbax's echoes of a failed read or save, which would bury the one line that says
it: cancelled sibling reads reported when collected, "Task exception was never
retrieved", TensorStore callbacks into orbax's closed event loop."""

import contextlib
import gc
import logging as std_logging
import sys
import time
import traceback

from bert_sym.checkpoint.core import is_closed_loop_error

_failed_reads = [0]   # in this process, ever (restoring.failure_kind counts them)


def count_failed_read() -> None:
  _failed_reads[0] += 1


@contextlib.contextmanager
def quiet_orbax_echoes():
  """While restoring (and saving): the echoes of a failed orbax read (cancelled sibling reads, "Task
  exception was never retrieved", TensorStore callbacks after the loop closed) would bury
  the one warning that matters; they are dropped, anything else still prints. The
  previous hook is back when the restore is over."""
  previous, previous_except = sys.unraisablehook, sys.excepthook
  muted, failed_reads = [], _failed_reads[0]

  def hook(unraisable):
    if _is_echo_of_failed_read(unraisable):
      muted.append(unraisable.exc_type)
    else:
      previous(unraisable)

  def excepthook(kind, value, tb):   # TensorStore's callbacks into a closed loop
    if not is_closed_loop_error(value):
      previous_except(kind, value, tb)
  asyncio_filter = _AsyncioEchoFilter()
  sys.unraisablehook, sys.excepthook = hook, excepthook
  std_logging.getLogger('asyncio').addFilter(asyncio_filter)
  try:
    yield
  except BaseException:
    failed_reads = -1   # a failed save or read that left the block: it may echo too
    raise
  finally:
    # Cancelled reads are reported when collected: here, not later. Only a failure leaves
    # any, and a full collection costs 0.1-0.7 s in a process that imported TF (GLUE).
    if muted or _failed_reads[0] != failed_reads:
      gc.collect()
    if muted:      # a read failed: its last TensorStore callbacks land a moment later
      time.sleep(0.5)   # (on a loaded machine, later still: the restored hook drops those)
      gc.collect()
    sys.unraisablehook = _dropping_closed_loop_echoes(previous) if muted else previous
    sys.excepthook = previous_except
    std_logging.getLogger('asyncio').removeFilter(asyncio_filter)


def _dropping_closed_loop_echoes(hook):
  """`hook`, dropping TensorStore's late callbacks into orbax's closed loop (tracebacks)."""
  if getattr(hook, 'drops_closed_loop_echoes', False):
    return hook
  dropping = lambda u: None if is_closed_loop_error(u.exc_value) else hook(u)
  dropping.drops_closed_loop_echoes = True
  return dropping


class _AsyncioEchoFilter(std_logging.Filter):
  def filter(self, record):
    return 'exception was never retrieved' not in record.getMessage()


def _is_echo_of_failed_read(unraisable) -> bool:
  error = unraisable.exc_value
  if isinstance(error, RuntimeError) and 'Event loop is closed' in str(error):
    return True
  filenames = ''.join(frame.filename for frame in traceback.extract_tb(unraisable.exc_traceback))
  return 'orbax' in repr(unraisable.object) or 'orbax' in filenames

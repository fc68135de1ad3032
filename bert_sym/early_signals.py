"""Signals in the seconds before a run's own handlers exist (bert_sym.preemption): while
Python imports JAX and TensorFlow, the entry points (`python -m bert_sym.train`, `glue`)
stop in one line with the exit codes a launcher reads, not with the defaults (SIGTERM 143,
which launch/slurm_gpu.sbatch does not requeue; Ctrl-C a KeyboardInterrupt traceback out of
the import machinery, exit -2). Imports nothing heavy: it runs before those imports.
"""

import os
import signal
import sys

from bert_sym.cli import EXIT_INTERRUPTED, EXIT_PREEMPTED

# Set by bert_sym.ablate to its own pid for the runs it starts (stop_with_parent).
STOP_WITH_PARENT = 'BERT_SYM_STOP_WITH_PARENT'


def take_them_until_started() -> None:
  """SIGTERM exits EXIT_PREEMPTED and Ctrl-C EXIT_INTERRUPTED at once: nothing is written
  yet. The run's handler puts the SIGTERM one back when it closes, when everything is
  saved; the entry point hands Ctrl-C back (`hand_ctrl_c_back`) once its imports are done."""
  # Ctrl-C first (the tests wait for SIGTERM's), and left ignored where it was (a shell's
  # `train ... &`).
  if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    signal.signal(signal.SIGINT, _stop_on_ctrl_c)
  signal.signal(signal.SIGTERM, _stop_on_sigterm)
  stop_with_parent()


def stop_with_parent() -> None:
  """A SIGTERM when the ablation runner that started this process dies (Linux).

  The runner starts each run in a process group of its own, so that a Ctrl-C reaches it
  once (forwarded): a kill of the runner's group (`kill -9 -PGID`, a Jupyter kernel's
  restart) then left the run training on, orphaned and holding its workdir, until an output
  line met the closed pipe and it died unsaved. With this it saves and exits 42 instead."""
  parent = os.environ.pop(STOP_WITH_PARENT, '')
  if not parent.isdigit() or not sys.platform.startswith('linux'):
    return
  import ctypes  # pylint: disable=import-outside-toplevel
  try:
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)   # PR_SET_PDEATHSIG
  except (OSError, AttributeError):
    return
  # Its output went to the runner through a pipe, now closed: the first line written after
  # would raise BrokenPipeError and end the run before it saved.
  sys.stdout, sys.stderr = _DroppedWhenClosed(sys.stdout), _DroppedWhenClosed(sys.stderr)
  if os.getppid() != int(parent):   # it died before the prctl
    os.kill(os.getpid(), signal.SIGTERM)


class _DroppedWhenClosed:
  """A text stream that drops what it cannot write once its reader has gone."""

  def __init__(self, stream):
    self._stream = stream

  def write(self, text):
    try:
      return self._stream.write(text)
    except BrokenPipeError:
      self._drop()
      return len(text)

  def flush(self):
    try:
      self._stream.flush()
    except BrokenPipeError:
      self._drop()

  def _drop(self):
    self._stream = open(os.devnull, 'w', encoding='utf-8')   # pylint: disable=consider-using-with

  def __getattr__(self, name):
    return getattr(self._stream, name)


def hand_ctrl_c_back() -> None:
  """Ctrl-C is Python's KeyboardInterrupt again, which `cli.guard` and the run's handlers
  say in one line."""
  if signal.getsignal(signal.SIGINT) is _stop_on_ctrl_c:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def _stop_on_sigterm(signum, frame) -> None:
  del signum, frame
  # stdout, as the run's own stop line: stderr points at /dev/null while TF imports.
  print('Stopped by SIGTERM: before training started (or after it ended), nothing to save, '
        f'exiting with code {EXIT_PREEMPTED} (rerun the same command to resume).', flush=True)
  os._exit(EXIT_PREEMPTED)   # pylint: disable=protected-access


def _stop_on_ctrl_c(signum, frame) -> None:
  del signum, frame
  print('Stopped by Ctrl-C: before training started, nothing to save, exiting with code '
        f'{EXIT_INTERRUPTED} (rerun the same command to resume).', flush=True)
  os._exit(EXIT_INTERRUPTED)   # pylint: disable=protected-access

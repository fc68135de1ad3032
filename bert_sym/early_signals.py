"""Signals in the seconds before a run's own handlers exist (bert_sym.preemption): while
Python imports JAX and TensorFlow, the entry points (`python -m bert_sym.train`, `glue`)
stop in one line with the exit codes a launcher reads, not with the defaults (SIGTERM 143,
which launch/slurm_gpu.sbatch does not requeue; Ctrl-C a KeyboardInterrupt traceback out of
the import machinery, exit -2). Imports nothing heavy: it runs before those imports.
"""

import os
import signal

from bert_sym.cli import EXIT_INTERRUPTED, EXIT_PREEMPTED


def take_them_until_started() -> None:
  """SIGTERM exits EXIT_PREEMPTED and Ctrl-C EXIT_INTERRUPTED at once: nothing is written
  yet. The run's handler puts the SIGTERM one back when it closes, when everything is
  saved; the entry point hands Ctrl-C back (`hand_ctrl_c_back`) once its imports are done."""
  # Ctrl-C first (the tests wait for SIGTERM's), and left ignored where it was (a shell's
  # `train ... &`).
  if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    signal.signal(signal.SIGINT, _stop_on_ctrl_c)
  signal.signal(signal.SIGTERM, _stop_on_sigterm)


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

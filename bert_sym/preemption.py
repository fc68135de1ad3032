"""Stopping a run on a signal: SIGTERM (Cloud TPU preemption, SLURM's time limit) or
Ctrl-C sets a flag that the loop (bert_sym.loop.run) reads after each step, saves, and
exits with a code that tells a launcher "resume me" from "finished"."""

import signal
import sys
import threading

from absl import logging
import jax

from bert_sym import cli

# Exit codes of bert_sym.train and bert_sym.glue (launch/slurm_gpu.sbatch requeues on 42):
#   0   finished
#   1   a problem with the inputs (config, workdir, checkpoint) or a non-finite stop
#   42  stopped early by SIGTERM / preemption after saving a checkpoint: rerun to resume
#   130 stopped by Ctrl-C after saving a checkpoint: rerun to resume
PREEMPTED_EXIT_CODE = cli.EXIT_PREEMPTED
INTERRUPTED_EXIT_CODE = cli.EXIT_INTERRUPTED


class Preempted(Exception):
  """Raised after a SIGTERM / preemption stop once the checkpoint of `step` is saved."""

  def __init__(self, step: int | None, signal_name: str | None = 'SIGTERM'):
    self.step = step
    self.exit_code = (INTERRUPTED_EXIT_CODE if signal_name == 'SIGINT'
                      else PREEMPTED_EXIT_CODE)
    # The one line the entry point says (process 0 prints it, the others log it). No step:
    # stopped in start-up, before anything was trained, so nothing needed saving.
    saved = ('before training started, nothing to save' if step is None
             else f'saved step {step}')
    super().__init__(f'Stopped by {signal_name or "preemption"}: {saved}, exiting '
                     f'with code {self.exit_code} (rerun the same command to resume).')


class PreemptionFlag:
  """Set on SIGTERM (Cloud TPU preemption, SLURM time limit) or Ctrl-C: save, then exit
  with PREEMPTED_EXIT_CODE (INTERRUPTED_EXIT_CODE for Ctrl-C) so that a launcher can tell
  "resume me" from "finished". A second Ctrl-C stops at once, without saving, in one line.

  Multi-process runs use JAX's preemption sync point instead (through orbax), which makes
  every process stop at the same step on SIGTERM; a local handler would only stop one of
  them, so there Ctrl-C stops without saving (see the README). `close()` (or leaving it as
  a context manager) puts the previous handlers back.
  """

  def __init__(self, *, starting: bool = False):
    self._event = threading.Event()
    self.signal_name = None
    # `starting` (until stop_if_raised): nothing is trained yet, so a Ctrl-C stops at once
    # (KeyboardInterrupt), as with no handler; kept for the end of start-up, it was said as
    # "saving a checkpoint at the end of this step" while the input checks ran on.
    self._starting = starting
    self._previous = {}
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      for signum in (signal.SIGTERM, signal.SIGINT):
        # A shell starts its background jobs with SIGINT ignored, so that a Ctrl-C at the
        # terminal stops only the job in front; `train ... &` must not stop on it either.
        if signum == signal.SIGINT and signal.getsignal(signum) == signal.SIG_IGN:
          continue
        self._previous[signum] = signal.signal(signum, self._handle)

  def close(self) -> None:
    """Puts back the handlers that were there before."""
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    self._previous = {}

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  def _handle(self, signum, frame):
    del frame
    if signum == signal.SIGINT and self._event.is_set():
      # The entry point says it in one line (exit 130); with no argument, a Ctrl-C that
      # met no handler (start-up, closing), not a second one.
      raise KeyboardInterrupt('a second Ctrl-C')
    if signum == signal.SIGINT and self._starting:
      raise KeyboardInterrupt()   # a first Ctrl-C in start-up: nothing to save
    # Taken before it is said: Python runs a second signal's handler inside this one, and
    # one landing during the message must see the first taken, not be a first one again.
    self.signal_name = signal.Signals(signum).name
    self._event.set()
    if signum == signal.SIGINT:
      print('\nCtrl-C: saving a checkpoint at the end of this step (Ctrl-C again to '
            'quit without saving).', flush=True)

  def reached(self, manager, step: int) -> bool:
    if jax.process_count() > 1:
      return manager.reached_preemption(step)
    return self._event.is_set()

  def stop_if_raised(self) -> None:
    """Raises Preempted (no step: nothing was trained, so nothing needed saving) where a
    signal came before the run's first step could be reached, e.g. while inputs load.
    Ends start-up: a Ctrl-C from here on saves, as a SIGTERM does."""
    self._starting = False
    if self.raised_locally():
      raise Preempted(None, self.signal_name)

  def raised_locally(self) -> bool:
    """A signal seen by this (only) process; several stop at orbax's agreed step instead."""
    return jax.process_count() == 1 and self._event.is_set()


def exit_on(stop: Preempted) -> None:
  """Says the stop once (process 0 prints it, the others log it) and exits with its code."""
  if jax.process_index() == 0:
    print(stop, flush=True)
  else:
    logging.warning('%s', stop)
  sys.exit(stop.exit_code)

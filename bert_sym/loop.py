"""The host side of every training loop (pre-training and GLUE): input prefetch,
compile-once timing, the progress line (steps/s, tokens/s, MFU, ETA), the non-finite
stop/skip policy, metric rows, and the loop itself (`run`), which stops on the signals of
bert_sym.preemption.

The device side (what one step computes) is bert_sym.steps.
"""

import contextlib
import dataclasses
import importlib.util
import os
import queue
import threading
import time
from typing import Any, Callable

from absl import logging
import jax
import numpy as np

from bert_sym import files
from bert_sym import metrics_writer
# The stop signals (SIGTERM, Ctrl-C) and their exit codes, for the loop's callers too.
from bert_sym.preemption import (  # noqa: F401
    INTERRUPTED_EXIT_CODE, PREEMPTED_EXIT_CODE, Preempted, PreemptionFlag, exit_on)


class NonFiniteError(Exception):
  """A non-finite loss or gradient with on_nonfinite='stop' (the update was not applied),
  or too many consecutive skipped updates with on_nonfinite='skip'.

  `headline` says what happened, `onset` is the first step of the unhealthy streak (a loss
  spike or a non-finite step) that ended in it: checkpoints saved at `onset - 1` or later
  hold the diverging model.
  """

  def __init__(self, headline: str, onset: int, kept: str = ''):
    super().__init__(f'{headline} {kept}'.strip())
    self.headline, self.onset = headline, onset


# ---- Performance plumbing: compilation cache, input prefetch, compile once and time it ----

def enable_compilation_cache(cache_dir: str, max_gb: float = 0.0) -> str | None:
  """JAX's persistent compilation cache at `cache_dir` ('' = off): a rerun or a resumed
  run loads its compiled steps instead of compiling them again. Off means off, also when
  JAX_COMPILATION_CACHE_DIR is set (JAX would use that directory otherwise).

  `max_gb` (0 = no limit): JAX's own eviction of the least recently used entries, which
  keeps a cache that every run of every config adds to from filling the disk."""
  jax.config.update('jax_enable_compilation_cache', bool(cache_dir))
  if not cache_dir:
    return None
  path = files.cache_dir(cache_dir)
  jax.config.update('jax_compilation_cache_dir', path)
  if max_gb and importlib.util.find_spec('filelock') is None:   # JAX would raise at a compile
    logging.warning('compilation_cache_max_gb=%s not applied: JAX evicts under a file lock '
                    'and the filelock package is not installed (pip install filelock).', max_gb)
  elif max_gb:
    _date_undated_entries(path)
    jax.config.update('jax_compilation_cache_max_size', int(max_gb * 2**30))
  return path


def _date_undated_entries(path: str) -> None:
  """Gives each entry written with no limit (a cache from before compilation_cache_max_gb,
  or a run with it 0) the '-atime' file JAX's eviction reads for every entry: without it
  each write under a limit failed (a warning per compile) and nothing new was cached. Its
  last use is taken as its modification time, so it goes before the entries in use."""
  if files.local_path(path) is None or not os.path.isdir(path):   # gs://: a request an entry
    return
  for name in os.listdir(path):
    entry = os.path.join(path, name)
    if name.endswith('-cache') and not os.path.exists(entry[:-len('cache')] + 'atime'):
      with contextlib.suppress(OSError):   # evicted meanwhile by another run
        stamp = os.stat(entry).st_mtime_ns.to_bytes(8, 'little')   # as JAX writes it
        with open(entry[:-len('cache')] + 'atime', 'wb') as f:   # 8 bytes, as JAX's own
          f.write(stamp)


class Prefetcher:
  """Reads host batches and `jax.device_put`s them (via `to_global`) in a background
  thread, `depth` batches ahead of the update step.

  `state` is the input position after the last batch handed out, i.e. of the next batch
  the step will consume, not what the thread has read ahead: that is what a checkpoint
  must store for an exact resume.
  """

  def __init__(self, iterator, to_global, depth: int = 2):
    self._iterator, self._to_global = iterator, to_global
    self.state = iterator.get_state()
    self._queue = queue.Queue(maxsize=max(depth, 1))
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._work, daemon=True, name='prefetch')
    self._thread.start()

  def _work(self):
    while not self._stop.is_set():
      try:
        host = next(self._iterator)
        item = (self._to_global(host), self._iterator.get_state(), None)
      except BaseException as e:  # pylint: disable=broad-except
        item = (None, None, e)    # re-raised in the consumer's thread
      while not self._stop.is_set():
        try:
          self._queue.put(item, timeout=0.1)
          break
        except queue.Full:
          continue
      if item[2] is not None:
        return

  def __next__(self):
    while True:
      # Short waits: the OS may hand a signal to any thread (the reader's, XLA's), and its
      # handler runs here only once this thread runs Python: a Ctrl-C in a stalled read hung.
      with contextlib.suppress(queue.Empty):
        batch, state, error = self._queue.get(timeout=0.2)
        break
    if error is not None:
      raise error
    self.state = state
    return batch

  def close(self):
    self._stop.set()
    self._thread.join(timeout=10)


def compile_step(jitted, *args):
  """Lowers and compiles `jitted` for `args` once; returns (executable, seconds)."""
  start = time.perf_counter()
  compiled = jitted.lower(*args).compile()
  return compiled, time.perf_counter() - start


# ---- Metrics on the host: fetched lazily, throughput, the non-finite policy ----

class StepHealth:
  """The non-finite policy and the run's health, judged step by step in order.

  A step is unhealthy when its loss or gradient is non-finite, its loss is above
  `loss_ceiling` (for MLM: far worse than guessing uniformly, i.e. exploded weights), or,
  after `warmup_steps`, above `spike_factor` x the median of the last healthy losses. A
  checkpoint is good when the step after it was healthy: when a run stops, the streak
  of unhealthy steps that led there starts at `onset`, and checkpoints from `onset - 1` on
  hold the diverging model. `on_nonfinite='skip'` stops after `max_consecutive_skips`.
  """

  def __init__(self, on_nonfinite: str = 'stop', what: str = 'the run', *,
               loss_ceiling: float | None = None, warmup_steps: int = 0,
               spike_factor: float = 3.0, window: int = 16, max_consecutive_skips: int = 10):
    self.on_nonfinite, self.what = on_nonfinite, what
    self.loss_ceiling, self.warmup_steps = loss_ceiling, warmup_steps
    self.spike_factor, self.window = spike_factor, window
    self.max_consecutive_skips = max_consecutive_skips
    self.recent, self.onset, self.skipped_in_a_row = [], None, 0
    self.last_healthy = None   # the newest healthy step while no streak is open

  def _healthy_loss(self, step: int, loss: float) -> bool:
    if self.loss_ceiling is not None and loss > self.loss_ceiling:
      return False
    if step > self.warmup_steps and len(self.recent) >= 4:
      return loss <= self.spike_factor * float(np.median(self.recent))
    return True

  def observe(self, step: int, metrics: dict, last_saved=None) -> None:
    finite = bool(np.all(metrics['train/finite']))
    loss = float(np.max(metrics['train/loss']))
    if finite and self._healthy_loss(step, loss):
      self.recent = (self.recent + [loss])[-self.window:]
      self.onset, self.skipped_in_a_row, self.last_healthy = None, 0, step
      return
    self.onset = step if self.onset is None else self.onset
    if finite:
      logging.warning('Loss spike at step %d (loss %.4g): checkpoints from here on are not '
                      'counted as good until the loss recovers.', step, loss)
      return
    what = (f'Non-finite loss or gradient at step {step} (loss {metrics["train/loss"]}, '
            f'grad norm {metrics["train/grad_norm"]}).')
    if self.on_nonfinite == 'stop':
      raise NonFiniteError(
          f'{what} {self.what} stops; the update was not applied. Lower the learning rate, '
          'or set --config.on_nonfinite=skip to skip such updates.', self.onset,
          _kept_checkpoint(last_saved))
    self.skipped_in_a_row += 1
    logging.warning('%s Update skipped (%d in a row).', what, self.skipped_in_a_row)
    if self.skipped_in_a_row >= self.max_consecutive_skips:
      raise NonFiniteError(
          f'{self.skipped_in_a_row} consecutive non-finite steps up to step {step} with '
          f'on_nonfinite=skip (limit: --config.max_consecutive_nonfinite='
          f'{self.max_consecutive_skips}). {self.what} has diverged and stops; lower the '
          'learning rate.', self.onset, _kept_checkpoint(last_saved))

  def good_below(self, resumed_from: int | None = None) -> int | None:
    """Checkpoints saved at steps below this are good: the step after each was healthy
    (checkpoint.KeepNewestGood keeps the newest of them). The checkpoint a run resumed
    from counts as good; None before any judgement."""
    if self.onset is not None:
      return self.onset - 1
    if self.last_healthy is not None:
      return self.last_healthy
    return None if resumed_from is None else resumed_from + 1


def _kept_checkpoint(step) -> str:
  return ('No checkpoint was written before it.' if step is None else
          f'The last checkpoint written (step {step}) is kept.')


class Meter:
  """Step metrics stay on the device until a log or save needs them; then they are
  checked (non-finite policy) and averaged into one row with steps/s, tokens/s, TFLOP/s
  per device, MFU and ETA.

  Throughput counts the tokens each step really processed (`add(..., tokens=)`: GLUE's
  length buckets pad to less than max_seq_len), `tokens_per_step` when not given, and
  their FLOPs at that length when `flops_per_token` is a function of the sequence length
  (attention's share grows with it). MFU
  needs a known peak: with `peak_flops` 0 (an unknown device, or a CPU without
  config.peak_flops_per_device) no MFU is reported rather than a made-up one.
  Metrics may carry a leading axis (GLUE seeds trained together): rows average over it,
  `per_run` keeps it, and a step counts as non-finite when any run of it is.
  """

  def __init__(self, total_steps: int, tokens_per_step: float,
               flops_per_token: float | Callable[[int], float], peak_flops: float,
               on_nonfinite: str = 'stop', what: str = 'the run',
               num_devices: int | None = None):
    self.total_steps, self.tokens_per_step = total_steps, tokens_per_step
    self.flops_per_token, self.peak_flops = flops_per_token, peak_flops
    self.on_nonfinite, self.what = on_nonfinite, what
    self.num_devices = num_devices or jax.device_count()
    self.pending, self.interval = [], []
    self.timing = None            # (time, step) once the first step has compiled and run
    self.tokens = 0.0             # tokens of the steps timed since `timing`
    self.flops = 0.0              # and their model FLOPs
    self.compile_seconds = None   # written with the next row
    self.pause_seconds = {}       # 'eval' / 'save' -> durations so far, for the ETA
    self.last_saved = None
    self.health = StepHealth(on_nonfinite, what)

  def add(self, step: int, metrics, tokens: float | None = None,
          seq_len: int | None = None) -> None:
    self.pending.append((step, metrics))
    if self.timing is None:
      jax.block_until_ready(metrics)   # exclude compilation from the throughput
      self.timing = (time.perf_counter(), step)
      return
    tokens = self.tokens_per_step if tokens is None else tokens
    per_token = self.flops_per_token
    if callable(per_token):
      per_token = per_token(seq_len)
    self.tokens += tokens
    self.flops += tokens * per_token

  def fetch(self) -> None:
    """Brings metrics to the host; raises on a non-finite step when on_nonfinite=stop."""
    fetched, self.pending = jax.device_get(self.pending), []
    for at_step, m in fetched:
      self.health.observe(at_step, m, self.last_saved)   # raises per the policy
    self.interval.extend(fetched)

  def throughput(self, step: int, now: float) -> dict[str, float]:
    """steps/s, tokens/s, TFLOP/s per device and (with a known peak) MFU since `timing`."""
    seconds = now - self.timing[0]
    steps_per_sec = (step - self.timing[1]) / seconds
    tokens_per_sec = self.tokens / seconds
    tflops = self.flops / seconds / self.num_devices / 1e12
    out = {'perf/steps_per_sec': steps_per_sec, 'perf/tokens_per_sec': tokens_per_sec,
           'perf/tflops_per_device': tflops}
    if self.peak_flops:
      out['perf/mfu'] = tflops * 1e12 / self.peak_flops
    return out

  def row(self, step: int) -> tuple[dict, float, dict]:
    """(scalars, ETA seconds, per-run means) of the steps since the last row."""
    self.fetch()
    interval, self.interval = self.interval, []
    per_run = {k: np.mean([m[k] for _, m in interval], axis=0) for k in interval[0][1]
               if k not in ('train/finite', 'train/learning_rate')}
    scalars = {k: float(np.mean(v)) for k, v in per_run.items()}
    scalars['train/nonfinite_steps'] = sum(
        1 for _, m in interval if not np.all(m['train/finite']))
    scalars['train/learning_rate'] = float(np.mean(interval[-1][1]['train/learning_rate']))
    now, eta = time.perf_counter(), 0.0
    if step > self.timing[1]:
      scalars.update(self.throughput(step, now))
      eta = (self.total_steps - step) / scalars['perf/steps_per_sec']
      self.timing, self.tokens, self.flops = (now, step), 0.0, 0.0
    if self.compile_seconds is not None:
      scalars['perf/compile_seconds'], self.compile_seconds = self.compile_seconds, None
    return scalars, eta, per_run

  @contextlib.contextmanager
  def paused(self, state, kind: str | None = None):
    """Evals and saves do not count in steps/s, tokens/s and MFU (big_vision style); the
    durations of those of a `kind` are kept for the ETA (`pauses_left`)."""
    if self.timing is not None:
      jax.block_until_ready(state)   # the steps already dispatched still count
    start = time.perf_counter()
    yield
    seconds = time.perf_counter() - start
    if kind is not None:
      self.pause_seconds.setdefault(kind, []).append(seconds)
    if self.timing is not None:
      self.timing = (self.timing[0] + seconds, self.timing[1])

  def pauses_left(self, step: int, total_steps: int, cadences: dict[str, int]) -> float:
    """Seconds the evals and saves still due at steps `step`..`total_steps` will take, at
    the mean duration of each kind so far (0 for a kind not yet timed): the part of the
    ETA that steps/s leaves out. `step` counts: its log comes before its eval and save."""
    seconds = 0.0
    for kind, every in cadences.items():
      if self.pause_seconds.get(kind):
        due = 1   # every=0: the last step's only
        if every > 0:   # the multiples of `every` in [step, total_steps], and the last step
          due = total_steps // every - (step - 1) // every + (total_steps % every != 0)
        seconds += due * float(np.mean(self.pause_seconds[kind]))
    return seconds


# ---- The loop ----

@dataclasses.dataclass
class Hooks:
  """What a loop does besides stepping, each at its own cadence (every N steps and at the
  last step; 0 = only at the last step)."""
  log: Callable[[int, dict, float, dict], None]        # (step, scalars, eta, per_run)
  save: Callable[[Any, int], None]                      # (state, step)
  log_every: int
  save_every: int
  evaluate: Callable[[Any, int], None] | None = None    # (state, step)
  eval_every: int = 0
  console: Callable[..., None] = print
  name: str = 'train'
  check_saves: Callable[[bool], None] | None = None    # raises if a background save failed;
  # its argument: whether this is a step where all processes check together (a log step)
  finish_saves: Callable[[], None] | None = None       # waits; raises if the save failed
  # A row for the steps since the last one when stopped between rows. False where the save
  # keeps those steps (the trainer's meter state): the resumed run then writes the row at
  # its step, as an uninterrupted run does, instead of one off the schedule and one short.
  row_at_preemption: bool = True


def due(step, every, total) -> bool:
  """Whether a cadence of `every` steps (0: only the last) falls on `step`."""
  return step == total or (every > 0 and step % every == 0)


def run(state, step: int, total_steps: int, train_step, batches, meter: Meter, hooks: Hooks,
        preemption: PreemptionFlag | None = None, manager=None) -> tuple[Any, int, bool]:
  """Steps `state` from `step` to `total_steps`; returns (state, step, preempted).

  The step is compiled once (and the time said); metrics are fetched only at log and save
  time, so the host never waits for the device between steps. A preemption signal saves
  the current step and returns preempted=True (unless it was the last step: then the run
  is simply finished).
  """
  # One executable per batch shape: pre-training has one; GLUE's length buckets a few.
  compiled = {}
  while step < total_steps:
    with jax.profiler.StepTraceAnnotation(hooks.name, step_num=step):
      batch = next(batches)
      shape = tuple(sorted((k, tuple(v.shape)) for k, v in batch.items()))
      if shape not in compiled:   # compile once per shape, and say how long it took
        with meter.paused(state):   # a later shape's compilation is not step time
          compiled[shape], seconds = compile_step(train_step, state, batch)
        length = f' (length {batch["input_ids"].shape[-1]})' if len(compiled) > 1 else ''
        hooks.console(f'compiled {hooks.name} step{length} in {seconds:.1f} s')
        meter.compile_seconds = (meter.compile_seconds or 0.0) + seconds
      state, metrics = compiled[shape](state, batch)
    step += 1
    meter.add(step, metrics, tokens=batch['input_ids'].size,   # GLUE: the bucket's length
              seq_len=batch['input_ids'].shape[-1])
    log_due = due(step, hooks.log_every, total_steps)
    if hooks.check_saves is not None:
      hooks.check_saves(log_due)
    preempted = (preemption is not None and preemption.reached(manager, step)
                 and step < total_steps)
    if log_due or (preempted and hooks.row_at_preemption):
      scalars, eta, per_run = meter.row(step)
      eta += meter.pauses_left(step, total_steps, {'eval': hooks.eval_every,
                                                   'save': hooks.save_every})
      hooks.log(step, scalars, eta, per_run)
    eval_due = hooks.evaluate is not None and due(step, hooks.eval_every, total_steps)
    evaluated = eval_due and not preempted
    if evaluated:
      with meter.paused(state, 'eval'):
        hooks.evaluate(state, step)
    saving = due(step, hooks.save_every, total_steps) or preempted
    if saving:
      with meter.paused(state, 'save'):
        meter.fetch()   # never save after a non-finite step in 'stop' mode
        hooks.save(state, step)
        meter.last_saved = step
    # A signal during this step's eval or save: the step is saved, so stop here, not after
    # one more step and a second save inside the notice. (The rows since the last log are
    # in the saved meter state: the resumed run logs them as this one would have.)
    late = (saving and not preempted and step < total_steps and preemption is not None
            and preemption.raised_locally())
    if preempted or late:
      if finish := hooks.finish_saves or (manager and manager.wait_until_finished):
        finish()   # before saying 'saved'; the trainer's finish_saves raises in one line
      if eval_due and not evaluated:   # after the save: the notice (30 s on spot TPUs) is for it
        with meter.paused(state):
          hooks.evaluate(state, step)
      return state, step, True   # the caller raises Preempted, which its entry point says
  return state, step, False


def progress_logger(writer, console, total_steps: int):
  """hooks.log for one metrics writer: a TensorBoard/jsonl row and the console line."""
  def log(step, scalars, eta, per_run):
    del per_run
    writer.write_scalars(step, scalars)
    console(metrics_writer.format_progress(step, total_steps, scalars, eta))
  return log

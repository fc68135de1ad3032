"""Training metrics: TensorBoard event files, a JSON-lines copy, one console line per log.

TensorBoard events are written with the `tensorboard` package's own writer, which needs no
TensorFlow (GPU images without TF keep their event files). Without `tensorboard` installed
only `metrics.jsonl` is written. On multi-host runs only process 0 writes anything.
"""

import json
import logging as std_logging
import math
import os
import socket
import sys
import time

from absl import logging
from etils import epath
import jax

from bert_sym import files

# Peak dense bf16 FLOP/s per device (per chip for TPUs), for MFU. Matched as substrings of
# `device.device_kind`, first match wins (so 'v5 lite' is tested before 'v5').
PEAK_FLOPS_BY_DEVICE_KIND = (
    ('v6', 918e12),        # TPU v6e (Trillium)
    ('v5 lite', 197e12),   # TPU v5e
    ('v5e', 197e12),
    ('v5p', 459e12),
    ('v5', 459e12),
    ('v4', 275e12),
    ('h200', 989e12),
    ('h100', 989e12),
    ('a100', 312e12),
)


def peak_flops_per_device(device=None, override: float = 0.0) -> float:
  """The device's peak FLOP/s for MFU; 0 (no MFU) when unknown, e.g. on CPU, whose peak
  depends on the cores and vector units a run gets: set config.peak_flops_per_device."""
  if override:
    return float(override)
  device = device or jax.devices()[0]
  kind = device.device_kind.lower()
  for key, flops in PEAK_FLOPS_BY_DEVICE_KIND:
    if key in kind:
      return flops
  if device.platform == 'cpu':
    return 0.0
  logging.warning('Unknown device kind %r: MFU is not reported (set '
                  'config.peak_flops_per_device).', kind)
  return 0.0


def _format_duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f'{h}h{m:02d}m' if h else f'{m}m{s:02d}s'


def format_progress(step: int, total_steps: int, metrics: dict, eta_seconds: float) -> str:
  """The one console line: step, loss, throughput, MFU, ETA."""
  parts = [f'step {step}/{total_steps}', f'loss {metrics["train/loss"]:.4f}']
  if 'train/mlm_accuracy' in metrics:   # pre-training; GLUE's step has no accuracy
    parts.append(f'acc {metrics["train/mlm_accuracy"]:.3f}')
  parts.append(f'lr {metrics["train/learning_rate"]:.2e}')
  if 'perf/steps_per_sec' in metrics:
    parts += [f'{metrics["perf/steps_per_sec"]:.2f} steps/s',
              f'{metrics["perf/tokens_per_sec"]:,.0f} tok/s']
    if 'perf/mfu' in metrics:
      parts.append(f'MFU {100 * metrics["perf/mfu"]:.1f}%')
    parts.append(f'ETA {_format_duration(eta_seconds)}')
  return ' | '.join(parts)


def jsonl_row(step: int, scalars: dict) -> str:
  """One strict-JSON line: a NaN or infinity is written as null and its key listed under
  'nonfinite' (bare NaN tokens are rejected by strict JSON readers)."""
  row = {'step': int(step), 'time': time.time()}
  bad = sorted(k for k, v in scalars.items() if not math.isfinite(v))
  row.update({k: (None if k in bad else v) for k, v in scalars.items()})
  if bad:
    row['nonfinite'] = bad
  return json.dumps(row, allow_nan=False)


class MetricWriter:
  """Scalars to `{workdir}/tensorboard` (events) and `{workdir}/metrics.jsonl`."""

  def __init__(self, workdir, *, enabled: bool = True):
    self.enabled = enabled
    self._events = None
    self._jsonl = None
    if not enabled:
      return
    workdir = epath.Path(workdir)
    self._jsonl_path = workdir / 'metrics.jsonl'
    self._jsonl = self._jsonl_path.open('a')
    try:
      # The record writer and protos of the `tensorboard` package; its EventFileWriter
      # would import TensorFlow (seconds of start-up, and absent from GPU images).
      # pylint: disable=g-import-not-at-top
      from tensorboard.compat.proto import event_pb2, summary_pb2
      from tensorboard.summary.writer.record_writer import RecordWriter
      # pylint: enable=g-import-not-at-top
    except ImportError:
      logging.warning('tensorboard is not installed: metrics go to metrics.jsonl only.')
      return
    self._event_pb2, self._summary_pb2 = event_pb2, summary_pb2
    logdir = workdir / 'tensorboard'
    logdir.mkdir(parents=True, exist_ok=True)
    name = f'events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}'
    self._file = (logdir / name).open('wb')
    self._events = RecordWriter(self._file)
    self._write_event(event_pb2.Event(wall_time=time.time(), file_version='brain.Event:2'))

  def _write_event(self, event):
    self._events.write(event.SerializeToString())
    self._events.flush()

  def write_scalars(self, step: int, scalars: dict) -> None:
    if not self.enabled:
      return
    scalars = {k: float(v) for k, v in scalars.items()}
    self._jsonl.write(jsonl_row(step, scalars) + '\n')
    self._jsonl.flush()
    if self._events is not None:
      summary = self._summary_pb2.Summary(value=[
          self._summary_pb2.Summary.Value(tag=k, simple_value=v) for k, v in scalars.items()])
      self._write_event(self._event_pb2.Event(
          wall_time=time.time(), step=int(step), summary=summary))

  def drop_rows_after(self, step: int) -> None:
    """Removes metrics.jsonl rows past `step`: after a resume from `step` they are redone,
    and keeping both copies would make every plot double back. Rewritten atomically."""
    if not self.enabled:
      return
    self._jsonl.close()
    rows = self._jsonl_path.read_text().splitlines() if self._jsonl_path.exists() else []
    kept, cut_short = [], []
    for line in rows:
      try:
        if line.strip() and json.loads(line).get('step', 0) <= step:
          kept.append(line)
      except json.JSONDecodeError:   # a row cut off by a crash or a full disk
        cut_short.append(line)
    if cut_short:
      logging.warning('metrics.jsonl: dropped %d line(s) that are not JSON (written when '
                      'the previous attempt stopped): %s', len(cut_short),
                      ' | '.join(line[:200] for line in cut_short))
    if len(kept) != len(rows):
      files.write_atomically(self._jsonl_path, ''.join(r + '\n' for r in kept))
      logging.info('metrics.jsonl: dropped %d rows logged after step %d (resumed there).',
                   len(rows) - len(kept) - len(cut_short), step)
    self._jsonl = self._jsonl_path.open('a')

  def set_aside_rows(self) -> None:
    """A run starting from step 0 in a workdir with rows (an attempt killed before its
    first save, or --start_over) keeps them in metrics.jsonl.<time>.old, not mixed in."""
    if not self.enabled or not self._jsonl_path.exists() or not self._jsonl_path.read_text().strip():
      return
    self._jsonl.close()
    old = self._jsonl_path.parent / f'metrics.jsonl.{int(time.time())}.old'
    self._jsonl_path.rename(old)
    logging.warning('metrics.jsonl of the earlier attempt moved to %s.', old)
    self._jsonl = self._jsonl_path.open('a')

  def close(self):
    if not self.enabled:
      return
    if self._events is not None:
      self._events.close()
    self._jsonl.close()


def quiet_logs(verbose: bool, *, import_tf: bool = True) -> None:
  """INFO from orbax/absl (about 40 lines a save) and TF's native start-up chatter off.

  TF logs through C++ absl before anything can configure it ("failed call to cuInit" at
  error level on a CPU machine, oneDNN notices), so TensorFlow and TF Text (the input
  pipeline's tokeniser, `bert_sym.input.tokenizer`) are imported here, GPUs hidden, with
  the process's stderr pointed at /dev/null. `--verbosity=0` (absl; `verbose`) keeps
  everything; a user's own TF_CPP_MIN_LOG_LEVEL / TF_ENABLE_ONEDNN_OPTS are kept.
  """
  if verbose:
    return
  logging.set_verbosity(logging.WARNING)
  # Orbax warns on every restore that the `state` item has no _CHECKPOINT_METADATA,
  # which it never writes for items: not news.
  logging.get_absl_logger().addFilter(
      lambda record: '_CHECKPOINT_METADATA' not in record.getMessage())
  # A failed save is logged by orbax's threads with tracebacks, then raised to our code,
  # which says it in one line (bert_sym.checkpoint.CheckpointSaveError).
  logging.get_absl_logger().addFilter(
      lambda record: not (record.levelno >= std_logging.ERROR and '/orbax/' in record.pathname))
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
  os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')   # the input pipeline has no math
  if not import_tf:
    return
  saved_stderr, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
  sys.stderr.flush()
  os.dup2(devnull, 2)
  try:
    from bert_sym.input import tokenizer  # pylint: disable=g-import-not-at-top,import-outside-toplevel
    tokenizer.import_tf_text()
  except ImportError:
    pass   # reported where the input pipeline needs it, with stderr back
  finally:
    os.dup2(saved_stderr, 2)
    os.close(saved_stderr)
    os.close(devnull)

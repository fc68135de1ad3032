"""Training metrics: TensorBoard event files, a JSON-lines copy, one console line per log.

TensorBoard events are written with the `tensorboard` package's own writer, which needs no
TensorFlow (GPU images without TF keep their event files). Without `tensorboard` installed
only `metrics.jsonl` is written. On multi-host runs only process 0 writes anything.
"""

import contextlib
import io
import itertools
import json
import logging as std_logging
import math
import os
import socket
import sys
import time

from absl import logging
import fsspec
import jax

import bert_sym
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
    ('h200', 989e12),      # bf16 dense, the spec sheets' figure without sparsity
    ('h100 pcie', 756e12),   # the PCIe and NVL parts run slower clocks than the SXM one
    ('h100 nvl', 835e12),
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
  if getattr(device, 'platform', None) == 'cpu':   # benchmarks pass torch's name only
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


DROPPED_SUFFIX = '.dropped'   # rows past the step a run resumed from, appended at each resume


class _JsonLines:
  """metrics.jsonl, one row per line, each row on storage once written.

  Local: an append handle, flushed per row. Object stores (gs://): no append there
  (gcsfs turns 'a' into a fresh object, and an unfinished upload is invisible), so the
  rows are kept here and the whole file is uploaded again after each row, atomically
  (`files.write_atomically`): a few MB at most, every log_every_steps steps.
  """

  def __init__(self, path: str):
    local = files.local_path(path)
    self.path = local or path
    self._remote = local is None
    self._rows = self._read() if self._remote else None
    self._handle = None if self._remote else self._open()

  def _open(self):
    # Unbuffered: a row that fails to write (a full disk) is taken back whole in `append`,
    # and no buffer is left to fail again (over the first error) when the file is closed.
    handle = open(self.path, 'ab', buffering=0)
    if os.fstat(handle.fileno()).st_size:
      with open(self.path, 'rb') as f:
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
      # A last row without its newline (a hand edit): the next row was glued onto it, and
      # the next resume dropped the pair as a line that is not JSON.
      if last != b'\n':
        handle.write(b'\n')
    return handle

  def _read(self) -> list[str]:
    # Rows are ASCII (json.dumps); bytes that are not UTF-8 (a crash's garbage tail, an
    # edit in another encoding) read as U+FFFD, a line that is not a row, which a resume
    # moves aside (drop_rows_after): a UnicodeDecodeError was a traceback.
    if self._remote:
      fs, remote = fsspec.core.url_to_fs(self.path)
      return (fs.cat_file(remote).decode('utf-8', errors='replace').splitlines()
              if fs.exists(remote) else [])
    with open(self.path, encoding='utf-8', errors='replace') as f:
      return f.read().splitlines()

  def rows(self) -> list[str]:
    return list(self._rows) if self._remote else self._read()

  def append(self, row: str) -> None:
    if self._remote:
      self._rows.append(row)
      self._upload()
    else:
      size = os.fstat(self._handle.fileno()).st_size
      data = memoryview((row + '\n').encode('utf-8'))
      try:
        while data:
          data = data[self._handle.write(data):]
      except OSError as e:   # nothing half-written: the file ends at its last whole row
        with contextlib.suppress(OSError):
          os.ftruncate(self._handle.fileno(), size)
        raise OSError(e.errno, e.strerror, self.path) from None

  def replace(self, rows: list[str]) -> None:
    """The file becomes `rows` (a reader sees the old file or the new one)."""
    if self._remote:
      self._rows = list(rows)
      self._upload()
      return
    self._handle.close()
    files.write_atomically(self.path, ''.join(r + '\n' for r in rows))
    self._handle = self._open()

  def add_to(self, suffix: str, rows: list[str]) -> str:
    """Appends `rows` to path + suffix, rewritten whole (a reader sees it before or after)."""
    path = self.path + suffix
    fs, where = fsspec.core.url_to_fs(path)
    before = fs.cat_file(where).decode('utf-8') if fs.exists(where) else ''
    if before and not before.endswith('\n'):   # a hand edit: the next line is its own
      before += '\n'
    files.write_atomically(path, before + ''.join(r + '\n' for r in rows))
    return path

  def move_aside(self, suffix: str, new_suffix: str) -> str | None:
    """Renames path + suffix to path + new_suffix (-1, -2, ... where that is taken: two
    attempts in one second) and returns the new name; None if there was no such file.
    Moving metrics.jsonl itself (suffix '') starts an empty one."""
    fs, where = fsspec.core.url_to_fs(self.path + suffix)
    if not fs.exists(where):
      return None
    new = self.path + new_suffix
    for n in itertools.count(1):
      if not fs.exists(fsspec.core.url_to_fs(new)[1]):
        break
      new = f'{self.path}{new_suffix}-{n}'
    if suffix or self._remote:
      fs.mv(where, fsspec.core.url_to_fs(new)[1])
      if not suffix:
        self._rows = []
    else:
      self._handle.close()
      os.rename(self.path, new)
      self._handle = self._open()
    return new

  def _upload(self) -> None:
    files.write_atomically(self.path, ''.join(r + '\n' for r in self._rows))

  def close(self) -> None:
    if self._handle is not None:
      self._handle.close()


_WRITER_NUMBERS = itertools.count()


class MetricWriter:
  """Scalars to `{workdir}/tensorboard` (events) and `{workdir}/metrics.jsonl`."""

  def __init__(self, workdir, *, enabled: bool = True):
    self.enabled = enabled
    self._events = None
    self._jsonl = None
    if not enabled:
      return
    self._jsonl = _JsonLines(f'{str(workdir).rstrip("/")}/metrics.jsonl')
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
    # The writer's number keeps a second writer of this process in the same second (a
    # notebook resuming) from overwriting the first one's file. TensorBoard reads the
    # files in name order, and a restart's purge works only on the files before its own:
    # zero-padded, writer 10 sorts after writer 9 (it sorted first, and the old plots
    # came back).
    events_path = (f'{str(workdir).rstrip("/")}/tensorboard/events.out.tfevents.'
                   f'{int(time.time())}.{socket.gethostname()}.{os.getpid()}.'
                   f'{next(_WRITER_NUMBERS):06d}')
    local = files.local_path(events_path)
    # Object stores (gs://): an open upload is invisible until closed (gcsfs; and epath
    # uses gcsfs without TensorFlow), so the events are kept here and the whole file is
    # uploaded again after each row, as metrics.jsonl: ~1 KB a row.
    self._remote_events = None if local else events_path
    if local:
      os.makedirs(os.path.dirname(local), exist_ok=True)
    self._file = open(local, 'wb') if local else io.BytesIO()
    self._events = RecordWriter(self._file)
    self._write_event(event_pb2.Event(wall_time=time.time(), file_version='brain.Event:2'))

  def _write_event(self, event):
    self._events.write(event.SerializeToString())
    self._events.flush()
    if self._remote_events:
      files.write_atomically(self._remote_events, self._file.getvalue())

  def write_scalars(self, step: int, scalars: dict) -> None:
    if not self.enabled:
      return
    scalars = {k: float(v) for k, v in scalars.items()}
    self._jsonl.append(jsonl_row(step, scalars))
    if self._events is not None:
      summary = self._summary_pb2.Summary(value=[
          self._summary_pb2.Summary.Value(tag=k, simple_value=v) for k, v in scalars.items()])
      self._write_event(self._event_pb2.Event(
          wall_time=time.time(), step=int(step), summary=summary))

  def logged(self, step: int, tag: str) -> bool:
    """Whether metrics.jsonl holds a row at `step` with `tag` (False where not enabled)."""
    for line in self._jsonl.rows() if self.enabled else []:
      try:
        row = json.loads(line)
      except json.JSONDecodeError:
        continue
      if isinstance(row, dict) and row.get('step') == step and tag in row:
        return True
    return False

  def drop_rows_after(self, step: int) -> None:
    """Moves metrics.jsonl rows past `step` to metrics.jsonl.dropped: after a resume from
    `step` they are redone, and both copies would make every plot double back. They are
    kept there (a diverged or damaged timeline's rows are its record), after a line that
    names the resume, so that several timelines' rows do not run together; so are lines
    that are not rows (cut short by a crash, or edited). Rewritten atomically."""
    if not self.enabled:
      return
    rows = self._jsonl.rows()
    kept, cut_short, dropped = [], [], []
    for line in rows:
      try:
        row = json.loads(line) if line.strip() else {}
      except json.JSONDecodeError:   # a row cut off by a crash or a full disk
        row = None
      if not isinstance(row, dict):   # (or a hand edit that left JSON but not a row)
        cut_short.append(line)
      elif line.strip() and row.get('step', 0) <= step:
        kept.append(line)
      elif line.strip():
        dropped.append(line)
    if dropped or cut_short:   # first: a crash between the two writes leaves a copy, not a loss
      self._jsonl.add_to(DROPPED_SUFFIX, [
          json.dumps({'resumed_from_step': step, 'time': round(time.time(), 3)}),
          *dropped, *cut_short])
    if cut_short:
      logging.warning('metrics.jsonl: moved %d line(s) that are not JSON rows (written '
                      'when the previous attempt stopped, or edited) to metrics.jsonl%s: '
                      '%s', len(cut_short), DROPPED_SUFFIX,
                      ' | '.join(_printable(line[:200]) for line in cut_short))
    if len(kept) != len(rows):
      self._jsonl.replace(kept)
      logging.info('metrics.jsonl: %d rows logged after step %d (resumed there) moved to '
                   'metrics.jsonl%s.', len(dropped), step, DROPPED_SUFFIX)
    self._restart_at(step + 1)

  def _restart_at(self, step: int) -> None:
    """TensorBoard's own way to redo steps: reading a session START at `step`, it purges
    the earlier files' events from that step on (else every plot doubles back). Written
    twice: the TensorBoard server's reader takes a run's first START for its start, not a
    restart, and an earlier attempt wrote none (the legacy reader purged on either)."""
    if self._events is not None:
      for _ in range(2):
        self._write_event(self._event_pb2.Event(
            wall_time=time.time(), step=step,
            session_log=self._event_pb2.SessionLog(status=self._event_pb2.SessionLog.START)))

  def set_aside_rows(self) -> None:
    """A run starting from step 0 in a workdir with rows (an attempt killed before its
    first save, or --start_over) keeps them in metrics.jsonl.<time>.old (and its
    metrics.jsonl.dropped in metrics.jsonl.dropped.<time>.old), not mixed in; TensorBoard
    is told to drop its plots of them."""
    if not self.enabled:
      return
    stamp = int(time.time())
    dropped = self._jsonl.move_aside(DROPPED_SUFFIX, f'{DROPPED_SUFFIX}.{stamp}.old')
    rows = (self._jsonl.move_aside('', f'.{stamp}.old')
            if any(row.strip() for row in self._jsonl.rows()) else None)
    if rows or dropped:
      logging.warning('metrics of the earlier attempt moved to %s.',
                      ' and '.join(path for path in (rows, dropped) if path))
    if rows:
      self._restart_at(0)   # its events stay in their files, out of TensorBoard's plots

  @property
  def writes_tensorboard(self) -> bool:
    return self._events is not None

  def close(self):
    if not self.enabled:
      return
    if self._events is not None:
      self._events.close()
    self._jsonl.close()


def _orbax_errors_in_one_line(record) -> bool:
  """Drops orbax's error records. One is said here in a line: on a host other than process
  0 of several, orbax never raises its own failed background write to our code (its
  finalize thread takes the error, then waits at a barrier for the others), so the run
  stops only when the next save times out, and without this the host would say nothing."""
  if record.levelno < std_logging.ERROR or '/orbax/' not in record.pathname:
    return True
  error = record.exc_info[1] if record.exc_info else None
  if (error is not None and 'background save thread' in record.getMessage()
      and jax.process_count() > 1):
    print(f'WARNING: process {jax.process_index()}: writing its part of a checkpoint failed '
          f'({type(error).__name__}: {" ".join(str(error).split())[:300]}); every process '
          'stops at a log step or save, within config.checkpoint.save_timeout_s.',
          file=sys.stderr, flush=True)
  return False


def quiet_logs(verbose: bool, *, import_tf: bool = True) -> None:
  """INFO from orbax/absl (about 40 lines a save) and TF's native start-up chatter off.

  TF logs through C++ absl before anything can configure it ("failed call to cuInit" at
  error level on a CPU machine, oneDNN notices), so TensorFlow and TF Text (the input
  pipeline's tokeniser, `bert_sym.input.tokenizer`) are imported with the process's stderr
  pointed at /dev/null: here (`import_tf`), or wherever they are first needed. `--verbosity=0`
  (absl; `verbose`) keeps everything; a user's own TF_CPP_MIN_LOG_LEVEL /
  TF_ENABLE_ONEDNN_OPTS are kept.
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
  logging.get_absl_logger().addFilter(_orbax_errors_in_one_line)
  os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')   # the input pipeline has no math
  from bert_sym import input as input_lib  # pylint: disable=g-import-not-at-top,import-outside-toplevel
  # TF's own warnings off (a bad input's tf.data error comes with 'Local rendezvous is
  # aborting' lines; it is said in one line), XLA's kept: `import jax` has set the variable
  # to '1' by now, so only the level the user's environment held says it was a choice.
  input_lib.quiet_tensorflow_imports(   # also where TF is imported later (GLUE: if at all)
      '3' if bert_sym.USER_TF_CPP_MIN_LOG_LEVEL is None else None)
  if not import_tf:
    return
  try:
    from bert_sym.input import tokenizer  # pylint: disable=g-import-not-at-top,import-outside-toplevel
    tokenizer.import_tf_text()
  except ImportError:
    pass   # reported where the input pipeline needs it, with stderr back


def _printable(text: str) -> str:
  """`text` with control characters escaped: a line a crash filled with NULs was printed
  as raw NUL bytes to the console."""
  return ''.join(c if c.isprintable() else repr(c)[1:-1] for c in text)

"""The host side of the loops: bert_sym.loop.Meter's throughput and MFU against
hand-computed values (patched clock), the loop's order at a preemption, and
metrics.jsonl across resumes, local and on an object store."""

import itertools
import json
import os
import signal
import subprocess
import sys

from etils import epath
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bert_sym import checkpoint
from bert_sym import loop
from bert_sym import metrics_writer


class Clock:
  def __init__(self, now):
    self.now = now

  def __call__(self):
    return self.now


def _metrics(loss=2.0):
  return {'train/loss': np.float32(loss), 'train/grad_norm': np.float32(1.0),
          'train/learning_rate': np.float32(0.1), 'train/finite': np.bool_(True)}


class _Zeros:
  """The loop tests' input: the same small batch every step."""

  def __next__(self):
    return {'input_ids': jnp.zeros((2, 4), jnp.int32)}


@jax.jit
def _count_step(state, batch):
  """A train step that counts: state + 1, with healthy metrics."""
  del batch
  return state + 1, _metrics()


def test_tokens_per_second_tflops_and_mfu_are_exact(monkeypatch):
  clock = Clock(100.0)
  monkeypatch.setattr(loop.time, 'perf_counter', clock)
  meter = loop.Meter(total_steps=10, tokens_per_step=1000, flops_per_token=6e6,
                     peak_flops=1e12, num_devices=2)
  meter.add(1, _metrics())                  # the first step: compilation, not timed
  meter.add(2, _metrics(), tokens=640)      # GLUE length buckets: fewer tokens
  meter.add(3, _metrics(), tokens=320)
  meter.add(4, _metrics())                  # no count given: tokens_per_step
  clock.now = 104.0
  scalars, eta, _ = meter.row(4)
  # 3 steps and 640 + 320 + 1000 tokens in 4 s, on 2 devices of 1 TFLOP/s peak.
  assert scalars['perf/steps_per_sec'] == 0.75
  assert scalars['perf/tokens_per_sec'] == 490.0
  assert scalars['perf/tflops_per_device'] == pytest.approx(490 * 6e6 / 2 / 1e12, rel=1e-12)
  assert scalars['perf/mfu'] == pytest.approx(490 * 6e6 / 2 / 1e12, rel=1e-12)
  assert eta == 8.0                         # 6 steps left at 0.75 steps/s
  assert scalars['train/loss'] == 2.0

  # An eval of 10 s does not count; the next interval starts afresh.
  with meter.paused(state=None):
    clock.now = 114.0
  meter.add(5, _metrics(), tokens=500)
  clock.now = 116.0
  scalars, eta, _ = meter.row(5)
  assert scalars['perf/steps_per_sec'] == 0.5
  assert scalars['perf/tokens_per_sec'] == 250.0
  assert eta == 10.0


def test_no_mfu_without_a_known_peak(monkeypatch):
  clock = Clock(0.0)
  monkeypatch.setattr(loop.time, 'perf_counter', clock)
  meter = loop.Meter(total_steps=4, tokens_per_step=100, flops_per_token=1e6,
                     peak_flops=metrics_writer.peak_flops_per_device(), num_devices=1)
  meter.add(1, _metrics())
  meter.add(2, _metrics())
  clock.now = 1.0
  scalars, _, _ = meter.row(2)
  assert scalars['perf/tokens_per_sec'] == 100.0
  assert scalars['perf/tflops_per_device'] == pytest.approx(1e-4)
  assert 'perf/mfu' not in scalars          # CPU: no made-up peak
  assert 'MFU' not in metrics_writer.format_progress(2, 4, scalars, 2.0)
  assert metrics_writer.peak_flops_per_device(override=5e11) == 5e11


def test_a_device_known_by_name_only_gets_its_peak_or_none():
  """benchmarks/accelerator.py looks up the Hugging Face peer's GPU by torch's device name:
  an unknown name raised AttributeError (no .platform) and lost the measured HF result."""
  by_name = lambda name: type('Device', (), {'device_kind': name})()
  assert metrics_writer.peak_flops_per_device(by_name('NVIDIA H200')) == 989e12
  # H100s by part (nvidia-smi's names): the PCIe card had the SXM peak, MFU 30% low.
  assert metrics_writer.peak_flops_per_device(by_name('NVIDIA H100 80GB HBM3')) == 989e12
  assert metrics_writer.peak_flops_per_device(by_name('NVIDIA H100 PCIe')) == 756e12
  assert metrics_writer.peak_flops_per_device(by_name('NVIDIA H100 NVL')) == 835e12
  assert metrics_writer.peak_flops_per_device(by_name('NVIDIA B200')) == 0.0
  # First match wins: 'TPU v5 lite' (v5e) is not a v5p.
  assert metrics_writer.peak_flops_per_device(by_name('TPU v5 lite')) == 197e12
  assert metrics_writer.peak_flops_per_device(by_name('TPU v5p')) == 459e12
  assert metrics_writer.peak_flops_per_device(by_name('TPU v4')) == 275e12


def test_the_loop_counts_each_batch_at_its_padded_length(monkeypatch):
  """GLUE's length buckets: a step on a batch padded to 4 tokens counts 4 per row, not
  the longest bucket's 8."""
  clock = Clock(0.0)
  monkeypatch.setattr(loop.time, 'perf_counter', clock)

  class Batches:   # one second of wall time per batch
    def __init__(self, lengths):
      self.lengths = iter(lengths)

    def __next__(self):
      clock.now += 1.0
      return {'input_ids': jnp.zeros((2, next(self.lengths)), jnp.int32)}

  @jax.jit
  def train_step(state, batch):
    return state + 1, {'train/loss': jnp.float32(1.0) + batch['input_ids'].sum(),
                       'train/grad_norm': jnp.float32(1.0),
                       'train/learning_rate': jnp.float32(0.1), 'train/finite': jnp.bool_(True)}

  rows = []
  hooks = loop.Hooks(log=lambda step, scalars, eta, per_run: rows.append(scalars),
                     save=lambda state, step: None, log_every=4, save_every=0,
                     console=lambda *a, **k: None)
  meter = loop.Meter(4, tokens_per_step=2 * 8, flops_per_token=1.0, peak_flops=0.0,
                     num_devices=1)
  loop.run(jnp.int32(0), 0, 4, train_step, Batches([8, 4, 4, 8]), meter, hooks)
  # Steps 2-4 (the first is compilation) in 3 s: 2 x (4 + 4 + 8) tokens.
  assert rows[-1]['perf/steps_per_sec'] == 1.0
  assert rows[-1]['perf/tokens_per_sec'] == 32 / 3
  # FLOPs per token as a function of the length (attention grows with it), as GLUE's:
  # each bucket counts its tokens at its own length, not at max_seq_len.
  meter = loop.Meter(4, tokens_per_step=2 * 8, flops_per_token=lambda length: 1e12 * length,
                     peak_flops=0.0, num_devices=1)
  loop.run(jnp.int32(0), 0, 4, train_step, Batches([8, 4, 4, 8]), meter, hooks)
  assert rows[-1]['perf/tflops_per_device'] == pytest.approx((8 * 4 + 8 * 4 + 16 * 8) / 3)


def test_slow_evals_and_saves_inside_the_loop_do_not_count_in_steps_per_second(monkeypatch):
  """loop.run pauses the meter around evals and saves: a 100 s eval every 2 steps and a
  50 s save every 4 leave 1 step/s (each batch takes 1 s), not 3 steps in 103 s. The ETA
  adds the evals and saves still due, at their mean duration so far (it was the steps'
  time only: 4 s at step 8, where 404 s were left)."""
  clock = Clock(0.0)
  monkeypatch.setattr(loop.time, 'perf_counter', clock)

  class Batches(_Zeros):
    def __next__(self):
      clock.now += 1.0
      return super().__next__()

  def slow(seconds):
    def hook(state, step):
      del state, step
      clock.now += seconds
    return hook

  rows = []
  hooks = loop.Hooks(log=lambda step, scalars, eta, per_run: rows.append((step, scalars, eta)),
                     save=slow(50.0), log_every=4, save_every=4, evaluate=slow(100.0),
                     eval_every=2, console=lambda *a, **k: None)
  meter = loop.Meter(12, tokens_per_step=8, flops_per_token=1.0, peak_flops=0.0,
                     num_devices=1)
  loop.run(jnp.int32(0), 0, 12, _count_step, Batches(), meter, hooks)
  assert [step for step, _, _ in rows] == [4, 8, 12]
  for step, scalars, eta in rows:
    assert scalars['perf/steps_per_sec'] == 1.0, (step, scalars)
    assert scalars['perf/tokens_per_sec'] == 8.0
  # A step's log comes before its eval and save. At step 4 only the eval at step 2 was
  # timed: 8 steps and 5 evals (4..12) left; at 8, 4 steps, 3 evals and 2 saves (8, 12);
  # at 12 its own eval and save.
  assert [eta for _, _, eta in rows] == [8 + 5 * 100, 4 + 3 * 100 + 2 * 50, 100 + 50]
  assert clock.now - (8 + 3 * 100 + 50) == 404   # what was left at step 8 indeed


def test_the_eta_counts_each_kind_of_pause_at_its_own_cadence():
  meter = loop.Meter(10, tokens_per_step=1, flops_per_token=1.0, peak_flops=0.0,
                     num_devices=1)
  meter.pause_seconds = {'eval': [2.0, 4.0], 'save': [10.0]}
  # Evals at 3, 6, 9 and the last step 10; a save only at the last step (every=0).
  assert meter.pauses_left(4, 10, {'eval': 3, 'save': 0}) == 3 * 3.0 + 10.0
  assert meter.pauses_left(10, 10, {'eval': 5, 'save': 5}) == 3.0 + 10.0
  assert meter.pauses_left(4, 10, {'eval': 3, 'other': 1}) == 9.0   # never timed: 0


class _SignalAt:
  """A preemption flag that says SIGTERM came once the loop reaches `step`."""
  signal_name = 'SIGTERM'

  def __init__(self, step):
    self.step = step

  def reached(self, manager, step):
    del manager
    return step == self.step


class _RecordingManager:
  def __init__(self, calls):
    self.calls = calls

  def wait_until_finished(self):
    self.calls.append(('save finished', None))


def _recording_hooks(calls, **kwargs):
  """Hooks that append (what, step) to `calls`, with no cadence of their own."""
  return loop.Hooks(log=lambda step, *a: calls.append(('log', step)),
                    save=lambda state, step: calls.append(('save', step)),
                    log_every=0, save_every=0, console=lambda *a, **k: None, **kwargs)


def test_a_preemption_saves_before_the_eval_that_is_due_at_that_step(tmp_path):
  """Spot TPUs give 30 s between the notice and the kill: that time is for the checkpoint.
  An eval due at the preempted step runs after the save has finished, not before it."""
  calls = []
  hooks = _recording_hooks(calls, evaluate=lambda state, step: calls.append(('eval', step)),
                           eval_every=1)
  meter = loop.Meter(8, tokens_per_step=8, flops_per_token=1.0, peak_flops=0.0,
                     num_devices=1)
  state, step, preempted = loop.run(jnp.int32(0), 0, 8, _count_step, _Zeros(), meter, hooks,
                                    _SignalAt(3), _RecordingManager(calls))
  assert (int(state), step, preempted) == (3, 3, True)
  # The steps since the last row get their row where the save does not keep them (GLUE):
  # the resumed run starts after them.
  assert calls == [('eval', 1), ('eval', 2), ('log', 3), ('save', 3), ('save finished', None),
                   ('eval', 3)]
  # The trainer's save keeps them (its meter state): no row off the schedule (SIGTERM at
  # 41 of a run logging every 7 wrote a row at 41, then one at 42 of a single step).
  calls.clear()
  hooks.row_at_preemption = False
  meter = loop.Meter(8, tokens_per_step=8, flops_per_token=1.0, peak_flops=0.0,
                     num_devices=1)
  loop.run(jnp.int32(0), 0, 8, _count_step, _Zeros(), meter, hooks, _SignalAt(3),
           _RecordingManager(calls))
  assert calls == [('eval', 1), ('eval', 2), ('save', 3), ('save finished', None), ('eval', 3)]
  assert [step for step, _ in meter.interval] == [1, 2, 3]   # what the save's meter state holds
  hooks.row_at_preemption = True

  # The background save of that step fails (disk full): the trainer's hook says it in one
  # line (CheckpointSaveError), and the eval does not run. Before, the raw OSError of
  # manager.wait_until_finished() ended the run in a traceback.
  from bert_sym import checkpoint  # pylint: disable=g-import-not-at-top

  class FullDiskManager:
    directory = epath.Path(tmp_path)

    def wait_until_finished(self):
      raise OSError(28, 'No space left on device')

    def all_steps(self):
      return []
  manager = FullDiskManager()
  calls.clear()
  hooks.finish_saves = lambda: checkpoint.finish_saves(manager)
  meter = loop.Meter(8, tokens_per_step=8, flops_per_token=1.0, peak_flops=0.0,
                     num_devices=1)
  with pytest.raises(checkpoint.CheckpointSaveError, match='the disk is full'):
    loop.run(jnp.int32(0), 0, 8, _count_step, _Zeros(), meter, hooks, _SignalAt(3), manager)
  assert calls == [('eval', 1), ('eval', 2), ('log', 3), ('save', 3)]


def test_a_signal_during_an_eval_or_save_stops_at_that_steps_save():
  """SIGTERM while step 4 evaluates (or saves): that step's save is the preemption save.
  The loop went on to train step 5 and wrote a second checkpoint inside the notice (which
  could push an older one out under keep_last); and it said 'saved' before the save had
  finished."""

  class Manager:
    def wait_until_finished(self):
      calls.append(('save finished', None))

  for during in ('eval', 'save'):
    calls = []

    def hook(what, during=during):
      def record(state, step):
        del state
        calls.append((what, step))
        if what == during and step == 4:
          os.kill(os.getpid(), signal.SIGTERM)   # the real signal, to the real handler
      return record
    hooks = loop.Hooks(log=lambda step, *a: calls.append(('log', step)),
                       save=hook('save'), log_every=3, save_every=2, evaluate=hook('eval'),
                       eval_every=4)
    meter = loop.Meter(8, tokens_per_step=8, flops_per_token=1.0, peak_flops=0.0,
                       num_devices=1)
    with loop.PreemptionFlag() as flag:
      state, step, preempted = loop.run(jnp.int32(0), 0, 8, _count_step, _Zeros(), meter,
                                        hooks, flag, Manager())
    assert (int(state), step, preempted) == (4, 4, True), during
    # No row at step 4: the rows since step 3 are in the saved meter state, and the
    # resumed run logs them at step 6 as an uninterrupted one would.
    assert calls == [('save', 2), ('log', 3), ('eval', 4), ('save', 4),
                     ('save finished', None)], during
    assert [at_step for at_step, _ in meter.interval] == [4], during


def test_a_signal_between_saves_stops_at_the_next_step_with_its_save():
  """SIGTERM while step 2 is logged, saves every 8 steps: step 3 is saved and the run stops
  there, in the notice; not at the next scheduled save, 5 steps on."""
  calls = []

  def log(step, *args):
    del args
    calls.append(('log', step))
    if step == 2:
      os.kill(os.getpid(), signal.SIGTERM)   # the real signal, to the real handler

  class Manager:
    def wait_until_finished(self):
      calls.append(('save finished', None))
  hooks = loop.Hooks(log=log, save=lambda state, step: calls.append(('save', step)),
                     log_every=1, save_every=8)
  meter = loop.Meter(20, tokens_per_step=8, flops_per_token=1.0, peak_flops=0.0,
                     num_devices=1)
  with loop.PreemptionFlag() as flag:
    state, step, preempted = loop.run(jnp.int32(0), 0, 20, _count_step, _Zeros(), meter,
                                      hooks, flag, Manager())
  assert (int(state), step, preempted) == (3, 3, True)
  assert calls == [('log', 1), ('log', 2), ('log', 3), ('save', 3), ('save finished', None)]


def test_a_second_ctrl_c_during_the_first_ones_message_quits(monkeypatch):
  """Python runs a signal's handler inside a handler still running: a second Ctrl-C that
  lands while the first one prints its message must find the first one taken, or both are
  taken as a first one (the message twice, and a run held at a batch never stops: CI's
  hang of test_second_ctrl_c_quits_in_one_line)."""
  printed = []

  def print_and_press_again(*args, **kwargs):
    del kwargs
    printed.append(args)
    if len(printed) == 1:
      os.kill(os.getpid(), signal.SIGINT)   # the real second signal, mid-message

  monkeypatch.setattr('builtins.print', print_and_press_again)
  with loop.PreemptionFlag() as flag:
    with pytest.raises(KeyboardInterrupt):
      flag._handle(signal.SIGINT, None)   # pylint: disable=protected-access
  assert len(printed) == 1, printed


def test_a_run_started_with_ctrl_c_ignored_leaves_it_ignored():
  """`python -m bert_sym.train ... &` from a script: the shell ignores SIGINT in its
  background jobs, so that a Ctrl-C at the terminal stops only the command in front. The
  run must keep ignoring it (POSIX programs do; so does Python's own KeyboardInterrupt),
  not save and stop; SIGTERM (preemption) is still taken."""
  previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
  try:
    with loop.PreemptionFlag() as flag:
      assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
      assert signal.getsignal(signal.SIGTERM) == flag._handle   # pylint: disable=protected-access
      os.kill(os.getpid(), signal.SIGINT)   # a real Ctrl-C meant for another job
      assert not flag.reached(None, 1) and flag.signal_name is None
    assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
  finally:
    signal.signal(signal.SIGINT, previous)


def test_the_flag_puts_the_handlers_back_and_runs_off_the_main_thread():
  """A notebook training in a background thread: only the main thread may set a handler
  (signal.signal raises ValueError elsewhere), so there the run has none, and no error."""
  import threading  # pylint: disable=g-import-not-at-top
  handlers = lambda: [signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)]
  before = handlers()
  with loop.PreemptionFlag() as flag:
    assert handlers() == [flag._handle] * 2   # pylint: disable=protected-access
  assert handlers() == before
  errors = []

  def train_in_a_thread():
    try:
      with loop.PreemptionFlag() as flag:
        assert not flag.reached(None, 1)
    except BaseException as e:  # pylint: disable=broad-except
      errors.append(e)
  thread = threading.Thread(target=train_in_a_thread)
  thread.start()
  thread.join()
  assert not errors and handlers() == before


@pytest.mark.parametrize('where', ['local', 'object_store'])
def test_metrics_jsonl_rows_survive_a_resume_locally_and_on_an_object_store(
    tmp_path, monkeypatch, where):
  """Object stores have no append (gcsfs makes 'a' a fresh object, and a buffered upload
  is not there until closed): rows are uploaded whole, after each row. A resumed writer
  keeps the rows up to the restored step, and a fresh start sets the old rows aside."""
  import fsspec  # pylint: disable=g-import-not-at-top
  monkeypatch.setitem(sys.modules, 'tensorboard.compat.proto', None)   # metrics.jsonl only
  workdir = (str(tmp_path) if where == 'local'
             else f'memory://bucket/{tmp_path.name}')
  fs, root = fsspec.core.url_to_fs(workdir)
  read = lambda: [{k: v for k, v in json.loads(row).items() if k != 'time'} for row in
                  fs.cat_file(f'{root}/metrics.jsonl').decode().splitlines()]
  first = metrics_writer.MetricWriter(workdir)
  for step in (1, 2, 3):
    first.write_scalars(step, {'train/loss': 10.0 - step})
    assert [r['step'] for r in read()] == list(range(1, step + 1))   # there once written
  del first   # killed: never closed
  resumed = metrics_writer.MetricWriter(workdir)
  resumed.drop_rows_after(2)
  resumed.write_scalars(3, {'train/loss': 6.5})
  assert read() == [{'step': 1, 'train/loss': 9.0}, {'step': 2, 'train/loss': 8.0},
                    {'step': 3, 'train/loss': 6.5}]
  resumed.drop_rows_after(1)   # rows dropped at each resume are kept, in order (were lost)
  dropped = fs.cat_file(f'{root}/metrics.jsonl.dropped').decode().splitlines()
  assert [(r.get('resumed_from_step'), r.get('step'), r.get('train/loss'))
          for r in map(json.loads, dropped)] == [   # each resume's rows after a line naming it
      (2, None, None), (None, 3, 7.0), (1, None, None), (None, 2, 8.0), (None, 3, 6.5)]
  resumed.write_scalars(2, {'train/loss': 8.5})
  resumed.write_scalars(3, {'train/loss': 6.5})
  resumed.close()
  fresh = metrics_writer.MetricWriter(workdir)
  fresh.set_aside_rows()
  fresh.write_scalars(1, {'train/loss': 9.5})
  assert read() == [{'step': 1, 'train/loss': 9.5}]
  [old] = [f for f in fs.ls(root, detail=False) if f.endswith('.old') and 'dropped' not in f]
  assert [json.loads(r)['step'] for r in fs.cat_file(old).decode().splitlines()] == [1, 2, 3]
  # The earlier attempt's dropped rows go aside with its rows (were appended to by the next)
  [old_dropped] = [f for f in fs.ls(root, detail=False) if '.dropped.' in f]
  assert fs.cat_file(old_dropped).decode().splitlines() == dropped
  assert not fs.exists(f'{root}/metrics.jsonl.dropped')
  fresh.close()


@pytest.mark.parametrize('where', ['local', 'object_store'])
def test_tensorboard_reads_every_row_before_the_writer_is_closed(tmp_path, where):
  """TensorBoard's own loader reads the event file after each row, with the writer still
  open (a run in progress, or killed). On object stores an open upload is invisible until
  closed, so the file is uploaded whole after each row."""
  import fsspec  # pylint: disable=g-import-not-at-top
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path) if where == 'local' else f'memory://bucket/tb_{tmp_path.name}'
  fs, root = fsspec.core.url_to_fs(workdir)

  def scalars_tensorboard_sees():
    [name] = fs.ls(f'{root}/tensorboard', detail=False)
    local = tmp_path / 'read' / name.rsplit('/', 1)[-1]   # the loader reads local files
    local.parent.mkdir(exist_ok=True)
    local.write_bytes(fs.cat_file(name))
    events = event_accumulator.EventAccumulator(str(local.parent))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)]
            for tag in events.Tags()['scalars']}

  writer = metrics_writer.MetricWriter(workdir)
  writer.write_scalars(4, {'train/loss': 7.5, 'perf/mfu': 0.25})
  assert scalars_tensorboard_sees() == {'train/loss': [(4, 7.5)], 'perf/mfu': [(4, 0.25)]}
  writer.write_scalars(8, {'train/loss': 6.0, 'perf/mfu': 0.5})
  assert scalars_tensorboard_sees() == {'train/loss': [(4, 7.5), (8, 6.0)],
                                        'perf/mfu': [(4, 0.25), (8, 0.5)]}
  writer.close()


def test_tensorboard_shows_a_resumed_run_once(tmp_path, monkeypatch):
  """A run killed after logging steps 2-6 but saving only step 3 redoes steps 4-6. The
  rows after 3 are dropped from metrics.jsonl; TensorBoard, which keeps the old event file,
  showed them twice (..., 5, 6, 4, 5, 6) until the new file told it to purge them.
  The three writers are the process's 9th-11th in one second: file names numbered 8, 9, 10
  sorted 10 first, and TensorBoard showed the old plots again (a CI flake)."""
  monkeypatch.setattr(metrics_writer, '_WRITER_NUMBERS', itertools.count(8))
  monkeypatch.setattr(metrics_writer.time, 'time', lambda: 1_796_000_000.0)
  first = metrics_writer.MetricWriter(tmp_path)
  for step in range(2, 7):
    first.write_scalars(step, {'train/loss': 10.0 - step})
  del first   # killed
  resumed = metrics_writer.MetricWriter(tmp_path)   # same process, same second: a notebook
  resumed.drop_rows_after(3)
  for step in range(4, 8):
    resumed.write_scalars(step, {'train/loss': 20.0 - step})
  resumed.close()
  assert len(list((tmp_path / 'tensorboard').iterdir())) == 2
  # Both of TensorBoard's readers: the server's (plugin_event_accumulator) takes the first
  # session START of a run for its start, not a restart, and showed 2..6, 4..7 when the
  # resume's START was the run's first; the legacy reader purged on it.
  want = [(2, 8.0), (3, 7.0), (4, 16.0), (5, 15.0), (6, 14.0), (7, 13.0)]
  assert _tensorboard_curves(tmp_path / 'tensorboard', 'train/loss') == (want, want)

  # Killed again before its first save (or --start_over): a fresh start from step 0 sets
  # the rows aside, and TensorBoard, which kept both files, showed 2..7 then 1, 2.
  fresh = metrics_writer.MetricWriter(tmp_path)
  fresh.set_aside_rows()
  for step in (1, 2):
    fresh.write_scalars(step, {'train/loss': 30.0 - step})
  fresh.close()
  want = [(1, 29.0), (2, 28.0)]
  assert _tensorboard_curves(tmp_path / 'tensorboard', 'train/loss') == (want, want)


def _tensorboard_curves(directory, tag):
  """(step, value) of `tag` as TensorBoard's two readers see it: the legacy
  EventAccumulator and the plugin one behind the TensorBoard server."""
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
  from tensorboard.backend.event_processing import plugin_event_accumulator  # pylint: disable=g-import-not-at-top
  from tensorboard.util import tensor_util  # pylint: disable=g-import-not-at-top
  legacy = event_accumulator.EventAccumulator(str(directory))
  server = plugin_event_accumulator.EventAccumulator(str(directory))
  legacy.Reload()
  server.Reload()
  return ([(e.step, e.value) for e in legacy.Scalars(tag)],
          [(e.step, float(tensor_util.make_ndarray(e.tensor_proto)))
           for e in server.Tensors(tag)])


@pytest.mark.parametrize('setting', ['', 'own'])
def test_compilation_cache_off_means_off_even_with_jax_s_variable(tmp_path, setting):
  """--config.compilation_cache_dir='' turns JAX's persistent cache off: JAX would
  otherwise still use $JAX_COMPILATION_CACHE_DIR (set here, as the test session does)."""
  from tests.train_fixtures import REPO_ROOT  # pylint: disable=g-import-not-at-top
  inherited, own = tmp_path / 'inherited', tmp_path / 'own'
  inherited.mkdir()
  script = ('import sys, jax, jax.numpy as jnp; from bert_sym import loop; '
            'loop.enable_compilation_cache(sys.argv[1]); '
            'jax.jit(lambda x: jnp.sin(x) * 3 + 1)(jnp.ones(7)).block_until_ready()')
  env = dict(os.environ, PYTHONPATH=REPO_ROOT, JAX_PLATFORMS='cpu',
             JAX_COMPILATION_CACHE_DIR=str(inherited),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0')
  subprocess.run([sys.executable, '-c', script, str(own) if setting else ''], env=env,
                 check=True, capture_output=True, timeout=120)
  assert not list(inherited.iterdir())
  assert bool(own.exists() and list(own.iterdir())) == bool(setting)


def _compile_into_cache(cache, limit_gb: float, first: int = 0, count: int = 8):
  """`count` distinct tiny programs compiled in a fresh process with our cache settings."""
  from tests.train_fixtures import REPO_ROOT  # pylint: disable=g-import-not-at-top
  script = ('import sys, jax, jax.numpy as jnp; from bert_sym import loop; '
            'loop.enable_compilation_cache(sys.argv[1], float(sys.argv[2])); '
            '[jax.jit(lambda x, k=k: jnp.sin(x) * k + 1)(jnp.ones(7 + k)).block_until_ready() '
            'for k in range(int(sys.argv[3]), int(sys.argv[3]) + int(sys.argv[4]))]')
  env = dict(os.environ, PYTHONPATH=REPO_ROOT, JAX_PLATFORMS='cpu',
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0')
  return subprocess.run([sys.executable, '-c', script, str(cache), str(limit_gb), str(first),
                         str(count)], env=env, check=True, capture_output=True, text=True,
                        timeout=120)


def _cache_entries(cache):
  return sorted(p for p in cache.iterdir() if p.name.endswith('-cache'))


def test_the_compilation_cache_stays_under_its_limit(tmp_path):
  """Every run of every config added its compiled steps to ~/.cache/bert_sym/jax, which
  never shrank; config.compilation_cache_max_gb hands JAX a limit, under which it deletes
  the least recently used entries (entries here: about 3 KB each; limit 8 KB)."""
  sizes = {}
  for limit in (0, 8e3 / 2**30):
    _compile_into_cache(tmp_path / f'cache_{limit}', limit)
    entries = _cache_entries(tmp_path / f'cache_{limit}')
    sizes[limit] = (len(entries), sum(p.stat().st_size for p in entries))
  assert sizes[0][0] >= 8, sizes   # no limit: every compile kept
  assert 0 < sizes[8e3 / 2**30][1] <= 8e3 and sizes[8e3 / 2**30][0] < sizes[0][0], sizes


def test_a_cache_written_without_a_limit_still_takes_new_entries_under_one(tmp_path):
  """Entries written with no limit (every cache from before compilation_cache_max_gb, or a
  run with it 0) have no '-atime' file, which JAX's eviction reads for every entry: each
  later write under the default limit failed ('Error writing persistent compilation cache
  entry ... FileNotFoundError ...-atime', one warning per compile) and nothing was cached."""
  cache = tmp_path / 'cache'
  for limit, first in ((0, 0), (10, 4)):   # no limit, then the default's 10 GB
    result = _compile_into_cache(cache, limit, first, count=4)
    assert 'Error writing persistent compilation cache' not in result.stderr, result.stderr
    if not limit:
      unlimited = _cache_entries(cache)
  assert len(_cache_entries(cache)) > len(unlimited) >= 4, (unlimited, _cache_entries(cache))


def test_a_loss_worse_than_twice_a_uniform_guess_is_unhealthy_even_in_warm_up():
  """The trainer's health: with vocab 1000, ln(1000) = 6.91 is guessing uniformly; a loss
  above 2 x 6.91 means exploded weights, spike rule or not (warm-up has none)."""
  from bert_sym import pretrain_loop  # pylint: disable=g-import-not-at-top
  from tests import train_fixtures  # pylint: disable=g-import-not-at-top
  config = train_fixtures.tiny_config(model__vocab_size=1000, optimizer__warmup_steps=100)
  health = pretrain_loop.make_meter(config, None).health
  ok = lambda loss: {'train/finite': True, 'train/loss': loss}
  health.observe(1, ok(13.8))            # below 2 ln(1000) = 13.816
  assert health.onset is None and health.good_below() == 1
  health.observe(2, ok(13.83))
  assert health.onset == 2 and health.good_below() == 1
  health.observe(3, ok(7.0))             # recovered
  assert health.onset is None and health.good_below() == 3


def test_tensorflow_start_up_lines_are_hidden_unless_verbose():
  """quiet_logs (the default; --verbosity=N keeps everything) imports TF and TF Text with
  stderr pointed away: their native start-up lines (oneDNN, cuInit) never show, also
  where they are imported later, as GLUE does where its tokens cache misses
  (import_tf=False). TF's warnings later on are off too: a bad input's check failing in
  tf.data (invalid UTF-8) is said in one line, without 'Local rendezvous is aborting'
  lines, although `import jax` sets TF_CPP_MIN_LOG_LEVEL=1 before quiet_logs runs, and
  XLA's level stays jax's. The control run, without it, shows them, so the check can fail."""
  code = ('{first}from bert_sym import metrics_writer\n'
          'if {quiet}: metrics_writer.quiet_logs(False, import_tf={now})\n'
          'from bert_sym.input import tokenizer\n'
          'tf, _ = tokenizer.import_tf_text()\n'
          'print(int(tf.reduce_sum(tf.constant([1, 2]))))\n'
          'bad = tf.data.Dataset.range(1).map(lambda x: (tf.debugging.Assert(x > 0, [x]), x)[1])\n'
          'try: next(iter(bad))\n'
          'except tf.errors.InvalidArgumentError: print("refused")\n'
          'import os; print(os.environ["TF_CPP_MIN_LOG_LEVEL"])\n')
  env = {k: v for k, v in os.environ.items()
         if k not in ('TF_CPP_MIN_LOG_LEVEL', 'TF_ENABLE_ONEDNN_OPTS')}
  run = lambda quiet, now=True, first='': subprocess.run(
      [sys.executable, '-c', code.format(quiet=quiet, now=now, first=first)], env=env,
      capture_output=True, text=True, timeout=300)
  loud, quiet, quiet_later = run(False), run(True), run(True, now=False)
  jax_first = run(True, first='import jax\n')   # a notebook: jax's '1' is not the user's
  assert (loud.stdout == quiet.stdout == quiet_later.stdout == jax_first.stdout
          == '3\nrefused\n1\n'), quiet.stderr
  assert 'local_rendezvous' in loud.stderr, 'TensorFlow warned nothing: the check cannot fail'
  assert quiet.stderr == quiet_later.stderr == jax_first.stderr == ''


def _health_row(loss, finite=True, lr=0.1):
  return {'train/loss': np.asarray(loss, np.float32), 'train/grad_norm': np.float32(1.0),
          'train/learning_rate': np.float32(lr), 'train/finite': np.asarray(finite)}


def test_step_health_rules_one_by_one():
  """The non-finite policy and the spike rule, each on a pattern built to show one rule."""
  # Seeds trained together (GLUE): one seed's non-finite step is the step's, and stops.
  with pytest.raises(loop.NonFiniteError, match='Non-finite loss or gradient at step 3'):
    loop.StepHealth('stop').observe(3, _health_row([0.5, np.nan], finite=[True, False]))
  # 'skip' stops after N consecutive bad steps; scattered ones never add up to a stop.
  scattered = loop.StepHealth('skip', max_consecutive_skips=2)
  for step in range(1, 41):
    scattered.observe(step, _health_row(1.0, finite=step % 2 == 0))
  in_a_row = loop.StepHealth('skip', max_consecutive_skips=2)
  in_a_row.observe(1, _health_row(np.nan, finite=False))
  with pytest.raises(loop.NonFiniteError, match='2 consecutive non-finite steps'):
    in_a_row.observe(2, _health_row(np.nan, finite=False))
  # The spike rule compares with the median of the *latest* healthy losses: after a long
  # descent from 10 to 0.5, a loss of 3.5 is a spike (3x the first losses' median is not).
  health = loop.StepHealth('stop', window=4)
  for step, loss in enumerate(np.linspace(10.0, 0.5, 40), start=1):
    health.observe(step, _health_row(loss))
  assert health.onset is None and health.last_healthy == 40
  health.observe(41, _health_row(3.5))
  assert health.onset == 41 and health.good_below() == 40


def test_a_row_logs_the_learning_rate_of_its_last_step():
  """A row averages the interval's losses but reports the schedule where it stands now
  (the last step's rate), as the step-parity test checks step by step."""
  meter = loop.Meter(10, tokens_per_step=8, flops_per_token=1.0, peak_flops=0.0,
                     num_devices=1)
  meter.timing = (0.0, 0)
  for step, lr in ((1, 0.1), (2, 0.2), (3, 0.3)):
    meter.add(step, _health_row(float(step), lr=lr))
  scalars, _, _ = meter.row(3)
  assert scalars['train/learning_rate'] == pytest.approx(0.3)
  assert scalars['train/loss'] == pytest.approx(2.0)


def test_an_infinite_value_is_written_as_null_and_named():
  """Strict JSON has no Infinity: json.dumps(allow_nan=False) raised on the first inf loss
  (a run with on_nonfinite=skip crashed where it should skip)."""
  row = json.loads(metrics_writer.jsonl_row(1, {'l': float('inf'), 'm': float('-inf'),
                                                'n': float('nan'), 'ok': 1.5}))
  assert row['nonfinite'] == ['l', 'm', 'n'] and row['l'] is None and row['ok'] == 1.5


def test_a_signal_at_the_last_step_finishes_the_run_not_preempts_it():
  """SIGTERM that lands on step == total_steps: the run is simply finished (exit 0), one
  save, not a preemption exit 42 that makes a launcher rerun it."""
  calls = []
  meter = loop.Meter(4, tokens_per_step=8, flops_per_token=1.0, peak_flops=0.0,
                     num_devices=1)
  state, step, preempted = loop.run(jnp.int32(0), 0, 4, _count_step, _Zeros(), meter,
                                    _recording_hooks(calls), _SignalAt(4),
                                    _RecordingManager(calls))
  assert (int(state), step, preempted) == (4, 4, False)
  assert calls == [('log', 4), ('save', 4)]


def test_a_row_counts_the_non_finite_steps_of_its_interval():
  meter = loop.Meter(8, tokens_per_step=8, flops_per_token=1.0, peak_flops=0.0,
                     on_nonfinite='skip', num_devices=1)
  bad = dict(_metrics(), **{'train/finite': np.bool_(False)})
  for step, m in enumerate([_metrics(), bad, _metrics(), _metrics()], start=1):
    meter.add(step, m)
  scalars, _, _ = meter.row(4)
  assert scalars['train/nonfinite_steps'] == 1
  # Seeds trained together (GLUE): a step where one seed of two is non-finite counts.
  meter.add(5, _health_row([1.0, 1.0], finite=[True, True]))
  meter.add(6, _health_row([1.0, np.nan], finite=[True, False]))
  scalars, _, _ = meter.row(6)
  assert scalars['train/nonfinite_steps'] == 1


def test_the_checkpoint_resumed_from_is_kept_before_any_step_is_judged():
  """Resumed from step 8, no step judged yet: a rotation (keep_last=1) must not drop 8,
  the only checkpoint known to be good."""
  health = loop.StepHealth()
  keep = checkpoint.KeepNewestGood()
  keep.good_below = lambda: health.good_below(resumed_from=8)
  Ckpt = type('Ckpt', (), {})
  checkpoints = []
  for s in (4, 8, 12):
    c = Ckpt()
    c.step = s
    checkpoints.append(c)
  assert keep.should_preserve(checkpoints, context=None) == [False, True, False]


def test_a_divergence_names_the_last_checkpoint_the_run_wrote():
  """The stop message says which checkpoint is kept: the one saved at step 2 here, not
  'no checkpoint' (the run's own saves count, not only the step it resumed from)."""
  def diverging_step(state, batch):
    del batch
    finite = state < 3
    return state + 1, dict(_metrics(), **{'train/loss': jnp.where(finite, 2.0, jnp.nan),
                                          'train/finite': finite})

  meter = loop.Meter(8, tokens_per_step=8, flops_per_token=1.0, peak_flops=0.0,
                     on_nonfinite='stop', num_devices=1)
  hooks = loop.Hooks(log=lambda *a: None, save=lambda state, step: None, log_every=1,
                     save_every=2, console=lambda *a, **k: None)
  with pytest.raises(loop.NonFiniteError,
                     match=r'at step 4.*The last checkpoint written \(step 2\) is kept'):
    loop.run(jnp.int32(0), 0, 8, jax.jit(diverging_step), _Zeros(), meter, hooks)


_FULL_FILE_SCRIPT = """
import resource, signal, sys
from bert_sym import metrics_writer
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # a write past the limit fails (EFBIG)
resource.setrlimit(resource.RLIMIT_FSIZE, (3000, resource.RLIM_INFINITY))
writer = metrics_writer.MetricWriter(sys.argv[1])
try:
  for step in range(1000):
    writer.write_scalars(step, {'train/loss': 1.0 / (step + 1), 'perf/tokens_per_sec': 1e4})
except OSError as e:
  print('stopped', step, e)
writer.close()   # nothing buffered to fail again
print('closed')
"""


def test_a_row_that_does_not_fit_is_not_left_half_written(tmp_path):
  """A full disk (here a file size limit) mid-row left metrics.jsonl ending in a cut-off
  row, and the error named no file; closing the writer then failed again on its buffer."""
  result = subprocess.run([sys.executable, '-c', _FULL_FILE_SCRIPT, str(tmp_path)],
                          capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=os.getcwd()))
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'closed' in result.stdout and f"{tmp_path}/metrics.jsonl" in result.stdout, result.stdout
  text = (tmp_path / 'metrics.jsonl').read_text()
  assert text.endswith('\n') and 2900 < len(text) <= 3000, len(text)
  rows = [json.loads(line) for line in text.splitlines()]
  assert [r['step'] for r in rows] == list(range(len(rows)))
  stopped_at = int(result.stdout.split()[1])
  assert stopped_at == len(rows)


def test_a_json_line_that_is_not_a_row_does_not_stop_a_resume(tmp_path, monkeypatch):
  """A hand edit that leaves valid JSON but not an object (`[1, 2]`) in metrics.jsonl: the
  resume's row checks called .get on it (AttributeError). It is dropped with a warning, as
  a row cut short by a crash is; every row around it is kept."""
  monkeypatch.setitem(sys.modules, 'tensorboard.compat.proto', None)   # metrics.jsonl only
  first = metrics_writer.MetricWriter(str(tmp_path))
  for step in (1, 2, 3):
    first.write_scalars(step, {'train/loss': 10.0 - step})
  first.close()
  rows = (tmp_path / 'metrics.jsonl').read_text().splitlines()
  (tmp_path / 'metrics.jsonl').write_text('\n'.join(rows[:1] + ['[1, 2]'] + rows[1:]) + '\n')
  resumed = metrics_writer.MetricWriter(str(tmp_path))
  assert resumed.logged(2, 'train/loss') and not resumed.logged(4, 'train/loss')
  resumed.drop_rows_after(2)
  resumed.close()
  assert [json.loads(r)['step'] for r in
          (tmp_path / 'metrics.jsonl').read_text().splitlines()] == [1, 2]
  # Kept, not deleted: the line goes to metrics.jsonl.dropped with the rows after step 2
  assert (tmp_path / 'metrics.jsonl.dropped').read_text().splitlines()[1:] == [
      rows[2], '[1, 2]']


@pytest.mark.parametrize('where', ['local', 'object_store'])
def test_a_last_line_of_bytes_that_are_not_utf8_does_not_stop_a_resume(tmp_path, monkeypatch,
                                                                       where):
  """A crash's garbage tail (or a hand edit saved in another encoding): reading
  metrics.jsonl raised UnicodeDecodeError, a traceback from the trainer's resume. The line
  is dropped with a warning, as a row cut short is; the rows before it are kept."""
  import fsspec  # pylint: disable=g-import-not-at-top
  monkeypatch.setitem(sys.modules, 'tensorboard.compat.proto', None)   # metrics.jsonl only
  workdir = str(tmp_path) if where == 'local' else f'memory://bucket/bytes_{tmp_path.name}'
  fs, root = fsspec.core.url_to_fs(workdir)
  first = metrics_writer.MetricWriter(workdir)
  for step in (1, 2):
    first.write_scalars(step, {'train/loss': 10.0 - step})
  first.close()
  rows = fs.cat_file(f'{root}/metrics.jsonl').decode().splitlines()
  fs.pipe_file(f'{root}/metrics.jsonl', '\n'.join(rows).encode() + b'\n{"step": 3, "ti\xff\xfe')
  resumed = metrics_writer.MetricWriter(workdir)
  assert resumed.logged(2, 'train/loss') and not resumed.logged(3, 'train/loss')
  resumed.drop_rows_after(2)
  resumed.write_scalars(3, {'train/loss': 7.0})
  resumed.close()
  assert [json.loads(r)['step'] for r in
          fs.cat_file(f'{root}/metrics.jsonl').decode().splitlines()] == [1, 2, 3]
  dropped = fs.cat_file(f'{root}/metrics.jsonl.dropped').decode().splitlines()
  assert len(dropped) == 2 and dropped[1].startswith('{"step": 3, "ti'), dropped


@pytest.mark.parametrize('where', ['local', 'object_store'])
def test_two_attempts_set_aside_in_one_second_keep_both(tmp_path, monkeypatch, where):
  """Two runs from step 0 (each killed before its first save) in one second: the second
  set-aside renamed its rows onto the first's metrics.jsonl.<time>.old (os.replace), and
  that attempt's rows were gone."""
  import fsspec  # pylint: disable=g-import-not-at-top
  monkeypatch.setitem(sys.modules, 'tensorboard.compat.proto', None)   # metrics.jsonl only
  monkeypatch.setattr(metrics_writer.time, 'time', lambda: 1700000000.0)
  workdir = str(tmp_path) if where == 'local' else f'memory://bucket/old_{tmp_path.name}'
  fs, root = fsspec.core.url_to_fs(workdir)
  for loss in (5.0, 6.0, 7.0):
    writer = metrics_writer.MetricWriter(workdir)
    writer.set_aside_rows()
    writer.write_scalars(1, {'train/loss': loss})
    writer.close()
  olds = sorted(f for f in fs.ls(root, detail=False) if '.old' in f)
  assert [f.rsplit('/', 1)[1] for f in olds] == ['metrics.jsonl.1700000000.old',
                                                 'metrics.jsonl.1700000000.old-1']
  assert sorted(json.loads(fs.cat_file(f))['train/loss'] for f in olds) == [5.0, 6.0]


_FULL_DISK_AT_RESUME_SCRIPT = """
import json, resource, signal, sys
sys.modules['tensorboard.compat.proto'] = None   # metrics.jsonl only
from bert_sym import metrics_writer
workdir, resume_at = sys.argv[1], int(sys.argv[2])
writer = metrics_writer.MetricWriter(workdir)
for step in range(1, 41):
  writer.write_scalars(step, {'train/loss': 1.0 / step})
writer.close()
resumed = metrics_writer.MetricWriter(workdir)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # a write past the limit fails (EFBIG)
resource.setrlimit(resource.RLIMIT_FSIZE, (1000, resource.RLIM_INFINITY))
try:
  resumed.drop_rows_after(resume_at)
except OSError as e:
  print('stopped', e)
"""


@pytest.mark.parametrize('resume_at', [5, 38])
def test_a_full_disk_while_a_resume_moves_rows_aside_loses_no_row(tmp_path, resume_at):
  """A resume rewrites metrics.jsonl without the rows after its step and appends those to
  metrics.jsonl.dropped; the disk fills (here a 1000-byte file size limit) during one of
  the two writes: at 5 the dropped rows do not fit, at 38 the kept ones. Every row of the
  40 is still in metrics.jsonl, as before the resume."""
  result = subprocess.run([sys.executable, '-c', _FULL_DISK_AT_RESUME_SCRIPT, str(tmp_path),
                           str(resume_at)], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=os.getcwd()))
  assert result.returncode == 0 and 'stopped' in result.stdout, result.stderr[-3000:]
  lines = (tmp_path / 'metrics.jsonl').read_text().splitlines()
  assert len(lines) == 40, lines[-2:]
  assert [json.loads(line)['step'] for line in lines] == list(range(1, 41))



def test_a_last_row_without_its_newline_keeps_the_next_row_apart(tmp_path, monkeypatch):
  """metrics.jsonl edited by hand, its last row left without a newline: the resumed run's
  first row was appended onto that line, and the next resume dropped both rows as a line
  that is not JSON."""
  monkeypatch.setitem(sys.modules, 'tensorboard.compat.proto', None)   # metrics.jsonl only
  (tmp_path / 'metrics.jsonl').write_text('{"step": 1, "train/loss": 3.0}\n'
                                          '{"step": 2, "train/loss": 2.0}')
  for resumed_at, step in ((2, 3), (3, 4)):
    writer = metrics_writer.MetricWriter(str(tmp_path))
    writer.drop_rows_after(resumed_at)
    writer.write_scalars(step, {'train/loss': 1.0})
    writer.close()
  assert [json.loads(line)['step'] for line in
          (tmp_path / 'metrics.jsonl').read_text().splitlines()] == [1, 2, 3, 4]
  # metrics.jsonl.dropped too: the next resume's line naming it starts a line of its own
  dropped = tmp_path / 'metrics.jsonl.dropped'
  for resumed_at in (3, 1):
    writer = metrics_writer.MetricWriter(str(tmp_path))
    writer.drop_rows_after(resumed_at)   # 3: moves step 4's row there
    writer.close()
    dropped.write_text(dropped.read_text().rstrip('\n'))   # a hand edit
  assert all(isinstance(json.loads(line), dict) for line in dropped.read_text().splitlines())


def test_a_line_of_nul_bytes_is_named_escaped_in_the_warning(tmp_path, caplog):
  """A crash (or a full disk) can leave a run of NUL bytes where a row was being written:
  the warning that moves it aside printed them raw to the console."""
  (tmp_path / 'metrics.jsonl').write_text('{"step": 1, "train/loss": 9.0}\n' + '\0' * 5 + '\n')
  writer = metrics_writer.MetricWriter(str(tmp_path))
  with caplog.at_level('WARNING'):
    writer.drop_rows_after(1)
  writer.close()
  assert 'not JSON rows' in caplog.text and '\\x00\\x00\\x00\\x00\\x00' in caplog.text
  assert '\0' not in caplog.text
  assert (tmp_path / 'metrics.jsonl.dropped').read_text().splitlines()[-1] == '\0' * 5

"""benchmarks/accelerator.py end to end at --size=tiny on CPU: subprocess per config, JSON."""

import contextlib
import json
import os
import pathlib
import signal
import subprocess
import sys

import pytest

from tests.test_run_gpu_script import BENCH_BATCH, BENCH_SEQ, BENCH_STEPS
from tests.test_run_gpu_script import tiny_benchmark_on_the_gpu_image
from tests.train_fixtures import REPO_ROOT


def test_accelerator_benchmark_runs_at_tiny_size_and_writes_json(tmp_path_factory):
  """The tiny run (symmetric, fused, 64 x 2, with the HF peer and the profile) is shared
  with tests/test_run_gpu_script.py, which runs it under the GPU image's stand-in."""
  folder, run = tiny_benchmark_on_the_gpu_image(tmp_path_factory)
  steps, batch, seq = BENCH_STEPS, BENCH_BATCH, BENCH_SEQ
  wall_s = run['wall_s']   # measured around the command, independently of the benchmark
  assert run['returncode'] == 0, run['stderr'][-3000:]
  out = folder / 'bench.json'
  summary = json.loads(out.read_text())
  assert summary['device'] and summary['versions']['jax'] and summary['date']
  by_impl = {r['impl']: r for r in summary['results']}
  assert set(by_impl) == {'ours', 'hf'}, summary['results']
  assert all(r['status'] == 'ok' for r in summary['results']), summary['results']
  ours, hf = by_impl['ours'], by_impl['hf']
  assert ours['kernel'] == 'xla'    # auto on CPU
  # The layout `python -m bert_sym.train` runs (unscanned) unless --scan_layers says: the
  # GPU runs timed scanned layers while the trainer ran them unscanned.
  assert ours['scan_layers'] is False and '| scan 0 |' in run['stdout']
  assert ours['lean_backward'] == 1 and '| lean 1' in run['stdout']   # the trainer's default
  # Its milestones, in order: a configuration killed at its limit names the last one.
  assert [p.split(' (')[0].split(' in ')[0] for p in ours['progress']] == [
      'state and batch on the device', 'compiled', 'first step ended'], ours['progress']
  # Both configurations ran inside this command: their compile and timed steps fit in its
  # wall time, so each served at least steps * batch * seq tokens in it.
  assert ours['compile_s'] + (ours['step_ms'] + hf['step_ms']) * steps / 1e3 < wall_s
  floor = steps * batch * seq / wall_s
  assert ours['tokens_per_s'] > floor and hf['tokens_per_s'] > floor
  assert ours['vs_hf'] == pytest.approx(ours['tokens_per_s'] / hf['tokens_per_s'])
  assert 9.0 < ours['loss'] < 11.5   # ~ln(30522) on random tokens
  # The compiled step holds at least the state: tiny BERT's float32 parameters and Adam's
  # two moments (the MLM head's bias and the pooler aside, 4.4M parameters at hidden 128).
  assert ours['compiled_memory_gib'] * 2**30 > 3 * 4 * 4.0e6
  # Each line is printed as it is measured, before the JSON is written.
  assert run['stdout'].count('| kernel ') == 2 and 'ours/HF' in run['stdout']


def test_benchmark_imports_neither_tensorflow_nor_seqio():
  code = ('import sys; sys.argv = ["x"]; import benchmarks.accelerator as a, bert_sym.train, '
          'bert_sym.hf_export; bad = [m for m in ("tensorflow", "seqio") if m in sys.modules]; '
          'print(bad); assert not bad, bad')
  run = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                       cwd=REPO_ROOT, timeout=120)
  assert run.returncode == 0, run.stdout + run.stderr


@pytest.mark.parametrize('script', sorted(
    p.name for p in (pathlib.Path(REPO_ROOT) / 'benchmarks').glob('*.py')))
def test_every_benchmark_starts_as_documented(script):
  """`python benchmarks/<script> --help` from the repository root, with no PYTHONPATH
  (as the README and `make benchmarks` run them): the script finds bert_sym itself."""
  env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
  run = subprocess.run([sys.executable, os.path.join('benchmarks', script), '--help'],
                       capture_output=True, text=True, timeout=300, cwd=REPO_ROOT, env=env)
  assert run.returncode == 0, run.stderr[-3000:]
  assert 'usage' in run.stdout.lower()


def test_the_synthetic_batch_masks_what_the_sparse_head_can_predict():
  """Rows with more than max_predictions_per_seq targets lost some in our sparse MLM head
  while HF's dense loss counted them all: the two losses were of different targets."""
  from benchmarks import accelerator  # pylint: disable=g-import-not-at-top
  batch = accelerator.synthetic_batch(256, 128, 30522)
  per_row = batch['mlm_weights'].sum(axis=1)
  assert per_row.max() <= accelerator.predictions_per_seq(128) == 20
  assert abs(per_row.mean() / 127 - 0.15) < 0.01   # still BERT's 15% on average
  assert ((batch['mlm_targets'] != 0) == (batch['mlm_weights'] > 0)).all()


def _hanging_worker(tmp_path, monkeypatch):
  """run_one(*printed): runs a stand-in worker that prints `printed` lines, then hangs
  past run_one's 2 s limit (the benchmark's `python` for its subprocesses)."""
  from benchmarks import accelerator  # pylint: disable=g-import-not-at-top
  worker = tmp_path / 'python'
  monkeypatch.setattr(accelerator.sys, 'executable', str(worker))

  def run_one(*printed):
    worker.write_text('#!/bin/sh\n' + ''.join(f"echo '{line}'\n" for line in printed) +
                      'exec sleep 120\n')
    worker.chmod(0o755)
    return accelerator.run_one({'impl': 'ours'}, timeout_s=2)
  return run_one


def test_a_worker_killed_after_printing_its_result_keeps_the_result(tmp_path, monkeypatch):
  """A worker that measured, printed its RESULT line and then hung on the way out (a
  device or thread that does not let go) was recorded as a timeout: the measurement lost."""
  run_one = _hanging_worker(tmp_path, monkeypatch)
  result = run_one('RESULT {"status": "ok", "step_ms": 12.5}')
  assert result['status'] == 'ok' and result['step_ms'] == 12.5, result
  assert 'killed after 2 s' in result['note']
  assert run_one()['status'] == 'timeout'   # nothing measured: still a timeout


def test_a_configuration_killed_at_its_limit_says_how_far_it_got(tmp_path, monkeypatch):
  """cuDNN's in-kernel dropout was killed at 70 s on an H100 with no other word: a compile
  that never ended and a first step that never ended are different bugs."""
  run_one = _hanging_worker(tmp_path, monkeypatch)
  result = run_one('PROGRESS state and batch on the device', 'PROGRESS compiled in 31.5 s')
  assert result['status'] == 'timeout', result
  assert result['error'] == 'killed after 2 s; its last milestone: compiled in 31.5 s'
  assert result['progress'] == ['state and batch on the device', 'compiled in 31.5 s']
  assert run_one()['error'] == 'killed after 2 s; before its state was on the device'


def test_a_child_of_a_killed_worker_holding_its_pipes_does_not_stall_the_parent(
    tmp_path, monkeypatch):
  """A worker killed at its limit whose own child (a compiler it started) lived on kept
  its stdout open: run_one waited for that child, past the limit, and run_gpu.sh's kill
  then took the whole benchmark with every configuration measured before it."""
  from benchmarks import accelerator  # pylint: disable=g-import-not-at-top
  worker, child_pid = tmp_path / 'python', tmp_path / 'child.pid'
  worker.write_text("#!/bin/sh\necho 'PROGRESS compiled in 1.0 s'\n"
                    f'sleep 120 & echo $! > {child_pid}\nexec sleep 120\n')
  worker.chmod(0o755)
  monkeypatch.setattr(accelerator.sys, 'executable', str(worker))
  result = accelerator.run_one({'impl': 'ours'}, timeout_s=2)
  child = int(child_pid.read_text())
  try:
    # No clock: run_one returned while the child holding its pipes still lives (waiting
    # for it, run_one came back only once the child had exited: gone, or a zombie where
    # no init reaps it).
    stat = pathlib.Path(f'/proc/{child}/stat')
    assert stat.exists() and stat.read_text().rsplit(')', 1)[1].split()[0] != 'Z', (
        f'run_one waited for the killed worker\'s child to exit: {result}')
  finally:
    with contextlib.suppress(ProcessLookupError):
      os.kill(child, signal.SIGKILL)
  assert result['status'] == 'timeout' and result['progress'] == ['compiled in 1.0 s'], result


class _Device:
  device_kind = 'NVIDIA H100 80GB HBM3'

  def __init__(self, limit):
    self.limit = limit

  def memory_stats(self):
    return None if self.limit is None else {'bytes_limit': self.limit}


def test_a_step_over_the_devices_memory_is_refused_before_it_runs(monkeypatch):
  """bert-base at 512 x 256 needs 87 GiB (compiled for an H200): on an 80 GB H100 it was an
  allocator failure after compiling; it is now one line with both figures, before any step."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from benchmarks import accelerator  # pylint: disable=g-import-not-at-top
  compiled = jax.jit(lambda x, y: (x @ y).sum(0)).lower(
      jnp.ones((256, 512)), jnp.ones((512, 512))).compile()
  stats = compiled.memory_analysis()
  needed = (stats.argument_size_in_bytes + stats.output_size_in_bytes
            - stats.alias_size_in_bytes + stats.temp_size_in_bytes
            + stats.generated_code_size_in_bytes)
  assert needed >= (256 * 512 + 512 * 512) * 4   # the two arguments at least
  assert accelerator.compiled_bytes_that_fit(compiled, _Device(None)) == needed   # CPU: no limit
  assert accelerator.compiled_bytes_that_fit(compiled, _Device(needed)) == needed
  monkeypatch.setenv('XLA_PYTHON_CLIENT_MEM_FRACTION', '0.95')
  with pytest.raises(MemoryError, match=(
      r'not run: the compiled step needs 0\.0 GiB, the NVIDIA H100 80GB HBM3 lets JAX have '
      r'0\.0 GiB \(XLA_PYTHON_CLIENT_MEM_FRACTION=0\.95\)')):
    accelerator.compiled_bytes_that_fit(compiled, _Device(needed - 1))


def test_a_summary_that_fails_to_serialize_leaves_no_file(tmp_path):
  """The JSON was dumped into the open file: a failure (or run_gpu.sh's SIGKILL) midway left
  a truncated record under the final name. It is now written whole or not at all."""
  import argparse  # pylint: disable=g-import-not-at-top
  from benchmarks import accelerator  # pylint: disable=g-import-not-at-top
  out = tmp_path / 'accelerator_gpu.json'
  good = dict(impl='ours', status='ok', device='cpu', attention='standard', path='fused',
              seq=64, batch=2)
  args = argparse.Namespace(out=str(out))
  with pytest.raises(TypeError):   # a set is not JSON
    accelerator.write_summary(args, '2026-12-05', 0.0, [dict(good, odd={1})])
  assert list(tmp_path.iterdir()) == []
  accelerator.write_summary(args, '2026-12-05', 0.0, [good])
  assert json.loads(out.read_text())['results'] == [good]


def test_a_backend_without_memory_analysis_skips_the_check():
  """Compiled.memory_analysis() is None where a backend does not implement it: every row
  of ours became an AttributeError; the check is skipped instead."""
  from benchmarks import accelerator  # pylint: disable=g-import-not-at-top

  class NoAnalysis:
    def memory_analysis(self):
      return None
  assert accelerator.compiled_bytes_that_fit(NoAnalysis(), _Device(1)) is None


def test_a_record_names_the_kernel_the_executable_holds():
  """README figures say '(cuDNN)': the record named the config's choice, whatever the
  compiled step held; a fused path that compiled without its kernel is now an error row."""
  sys.path.insert(0, os.path.join(REPO_ROOT, 'benchmarks'))
  import accelerator  # pylint: disable=g-import-not-at-top
  cudnn = ('%a = custom-call(%q), custom_call_target="__cudnn$fmhaSoftmaxDropout"\n'
           '%b = custom-call(%g), custom_call_target="__cudnn$fmhaSoftmaxDropoutBackward"')
  assert accelerator.kernel_that_ran('cudnn', cudnn) == 'cudnn'
  assert accelerator.kernel_that_ran('splash', 'custom_call_target="tpu_custom_call"') == 'splash'
  assert accelerator.kernel_that_ran('xla', 'custom_call_target="Sharding"') == 'xla'
  pallas = ('%f = custom-call(%s, %q), custom_call_target="__gpu$xla.gpu.triton", '
            'backend_config={name = "flash_dropout_forward"}')
  assert accelerator.kernel_that_ran('pallas', pallas) == 'pallas'
  # jaxlib after 0.10.2 (the GPU image's 0.11.2) compiles the kernel itself: another target.
  newer = pallas.replace('__gpu$xla.gpu.triton', 'triton_kernel_call_ffi')
  assert accelerator.kernel_that_ran('pallas', newer) == 'pallas'
  with pytest.raises(RuntimeError, match='chose the pallas kernel but compiled without it'):
    accelerator.kernel_that_ran('pallas', 'custom_call_target="__gpu$xla.gpu.triton"')
  with pytest.raises(RuntimeError, match=r"chose the cudnn kernel but compiled without it "
                                         r"\(custom calls: \['Sharding'\]\)"):
    accelerator.kernel_that_ran('cudnn', 'custom_call_target="Sharding"')


def test_ours_runs_on_one_device_of_a_host_with_several():
  """tokens/s and MFU are per accelerator (one device's peak, the HF peer's one GPU): on a
  host with 4 GPUs or TPU chips the step ran over all of them, its MFU 4x too high."""
  from tests.train_fixtures import cpu_devices_flags  # pylint: disable=g-import-not-at-top
  code = ('import sys; sys.argv = ["x"]; import jax; import benchmarks.accelerator as a\n'
          'spec = dict(size="tiny", path="fused", attention="symmetric", seq=64, batch=4, '
          'scan_layers=0)\n'
          'state, _, batch = a._ours_state_step_batch(a._ours_config(spec), spec)\n'
          'print(jax.device_count(), len(batch["input_ids"].devices()), '
          'len(jax.tree.leaves(state)[0].devices()))')
  run = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                       cwd=REPO_ROOT, timeout=300,
                       env=dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS=cpu_devices_flags(4)))
  assert run.returncode == 0, run.stderr[-3000:]
  assert run.stdout.split()[-3:] == ['4', '1', '1'], run.stdout


def test_no_warmup_steps_times_the_steps_alone():
  """--warmup=0 (compilation is timed apart): every row of ours was an UnboundLocalError."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from benchmarks import accelerator  # pylint: disable=g-import-not-at-top
  step = jax.jit(lambda state, batch: (state + 1, {'train/loss': state}))
  seconds, metrics = accelerator._timed_steps(step, jnp.int32(0), None, 0, 3)  # pylint: disable=protected-access
  assert seconds > 0 and int(metrics['train/loss']) == 2

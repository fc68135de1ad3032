"""benchmarks/accelerator.py --profile: the top-ops table read from jax.profiler's trace."""

import glob
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), 'benchmarks'))
import accelerator  # pylint: disable=g-import-not-at-top,wrong-import-position


def _gpu_like_trace():
  """A trace shaped as jax.profiler writes it on a GPU: a /device:GPU:0 process whose
  'XLA Ops' line holds the HLO ops (its stream lines repeat the same work as kernels)."""
  meta = [
      dict(ph='M', pid=1, name='process_name', args=dict(name='/device:GPU:0')),
      dict(ph='M', pid=1, tid=1, name='thread_name', args=dict(name='XLA Ops')),
      dict(ph='M', pid=1, tid=2, name='thread_name', args=dict(name='Stream #13(Compute)')),
      dict(ph='M', pid=7, name='process_name', args=dict(name='/host:CPU')),
      dict(ph='M', pid=7, tid=3, name='thread_name', args=dict(name='python')),
  ]
  ops = []
  for step in range(2):
    t = 1000.0 * step
    ops += [dict(ph='X', pid=1, tid=1, ts=t, dur=300.0, name='fusion.12'),
            dict(ph='X', pid=1, tid=1, ts=t + 300, dur=100.0, name='custom-call.3'),
            dict(ph='X', pid=1, tid=1, ts=t + 400, dur=50.0, name='fusion.12'),
            dict(ph='X', pid=1, tid=2, ts=t, dur=999.0, name='some_cuda_kernel'),
            dict(ph='X', pid=7, tid=3, ts=t, dur=5000.0, name='PjitFunction(step)')]
  return meta + ops


def test_gpu_trace_counts_the_xla_ops_line_only():
  rows, busy_ms = accelerator.top_device_ops(_gpu_like_trace(), steps=2)
  assert rows == [('fusion.12', 2.0, 0.35), ('custom-call.3', 1.0, 0.1)]
  assert abs(busy_ms - 0.45) < 1e-9
  table = accelerator.format_top_ops(rows, busy_ms, step_ms=0.9, title='standard_fused')
  assert 'fusion.12' in table.splitlines()[3] and '38.9%' in table.splitlines()[3]
  assert '77.8%' in table.splitlines()[3]                     # 0.35 of 0.45 ms busy


def test_top_keeps_the_longest():
  events = _gpu_like_trace()
  rows, _ = accelerator.top_device_ops(events, steps=2, top=1)
  assert [r[0] for r in rows] == ['fusion.12']


def test_real_cpu_trace_from_jax_profiler(tmp_path):
  step = jax.jit(lambda x: jnp.tanh(x @ x).sum())
  x = jnp.ones((128, 128))
  step(x).block_until_ready()
  jax.profiler.start_trace(str(tmp_path), create_perfetto_trace=True)
  for _ in range(3):
    step(x).block_until_ready()
  jax.profiler.stop_trace()
  [trace] = glob.glob(str(tmp_path / 'plugins' / 'profile' / '*' / '*.trace.json.gz'))
  events = accelerator.load_trace(trace)
  threads, kind = accelerator._op_threads(events)  # pylint: disable=protected-access
  assert kind == 'cpu' and threads
  rows, busy_ms = accelerator.top_device_ops(events, steps=3)
  assert rows and busy_ms > 0
  assert all(not name.startswith(('ThunkExecutor', 'end: ')) for name, _, _ in rows)
  assert all(calls > 0 and ms >= 0 for _, calls, ms in rows)

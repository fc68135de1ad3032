r"""The real train step (forward, backward, clipping, AdamW) on one accelerator, every
variant on both attention recipes, against Hugging Face's PyTorch BertForMaskedLM.

  python benchmarks/accelerator.py                  # bert-base, ~5 min on one H100
  python benchmarks/accelerator.py --size=tiny --steps=3 --shapes=64x4   # CPU smoke run

Configurations (bert-base: seq 128 at batch 256 and seq 512 at batch 32):
  ours  standard | symmetric | pairwise, each on
        fused   attention_impl=auto, attention_dropout_rate=0 (cuDNN on GPU, splash on
                TPU, xla on CPU): the fast recipe
        xla     attention_impl=xla, attention_dropout_rate=0.1: the paper-exact recipe
  hf    transformers.BertForMaskedLM (standard attention), sdpa attention, bf16 autocast
        and fused AdamW on CUDA (fp32 and plain AdamW on CPU); attention dropout 0 / 0.1
        to pair with our two recipes. HF computes the MLM head at every position (dense),
        ours at the masked ones (model.sparse_mlm, as original BERT).

Layers are laid out as `python -m bert_sym.train` lays them out (configs/common.py:
model.scan_layers=False) unless --scan_layers=1 scans them (compiled for an H100, the
scanned step's stacked residuals cost 5 GiB more at 128 x 256; benchmarks/RESULTS.md).

Each configuration runs in its own subprocess under a hard time limit (killed on expiry),
so one that hangs or runs out of memory costs only its own slot; the parent never
initialises an accelerator itself; one killed at its limit names its last milestone (state
on the device, compiled, first step ended). A result line is printed and flushed as soon
as it is measured: compile seconds (lower().compile(), once) apart from the step time, tokens/s,
MFU (model FLOPs from model.train_flops_per_token; peak from metrics_writer) and peak
device memory. All lines go to benchmarks/results/accelerator_<device>_<date>.json.

--profile also traces the first of our configurations with jax.profiler (5 steps after the
timed ones) and writes, beside the trace, top_ops.txt: the 30 device ops that took the
most time (XLA op / fusion name, calls and ms per step, share of the measured step and of
the device's busy time), so one short GPU run gives the material to work on offline:

  python benchmarks/accelerator.py --shapes=128x256 --variants=standard --paths=fused \
      --no_hf --profile        # -> benchmarks/results/profile_<config>/top_ops.txt

Imports nothing that imports TensorFlow or seqio (synthetic random tokens): runs on a GPU
image with jax, flax, optax, orbax, ml-collections, torch and transformers only.
"""

import argparse
import datetime
import json
import math
import os
import subprocess
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)
from bert_sym import files  # pylint: disable=g-import-not-at-top,wrong-import-position  (no jax)

SHAPES = {'base': ['128x256', '512x32'], 'small': ['128x64', '512x16'],
          'tiny': ['64x8', '128x4']}
VARIANTS = ('standard', 'symmetric', 'pairwise')
PATHS = {  # name: (attention_impl, attention_dropout_rate)
    'fused': ('auto', 0.0),
    'xla': ('xla', 0.1),
    # The paper's attention dropout inside cuDNN flash attention (GPU; layers unscanned,
    # bert_sym/attention.py; it failed on an H100, 2026-12-06). Not in the default --paths.
    'fused_dropout': ('cudnn', 0.1),
    # The same, inside our Pallas (Triton) flash attention (bert_sym/flash_dropout.py; GPU).
    'pallas_dropout': ('pallas', 0.1),
}
DEFAULT_PATHS = ('fused', 'xla')
PROFILE_STEPS = 5
TOP_OPS = 30
RESULT_PREFIX = 'RESULT '
# A worker's milestones, printed as reached: a configuration killed at its time limit
# says how far it got (compiling, or its first step never ending: different bugs).
PROGRESS_PREFIX = 'PROGRESS '


def predictions_per_seq(seq_len):
  """Original BERT's max_predictions_per_seq: 20 at 128, 80 at 512 (15% rounded up)."""
  return {128: 20, 512: 80}.get(seq_len, math.ceil(0.15 * seq_len))


def synthetic_batch(batch, seq_len, vocab_size, seed=0):
  import numpy as np  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  weights = (rng.random((batch, seq_len)) < 0.15).astype(np.float32)
  weights[:, 0] = 0.0
  # At most max_predictions_per_seq per row, as the input pipeline gives: beyond it our
  # sparse MLM head would drop targets that HF's dense loss still counts.
  weights[np.cumsum(weights, axis=1) > predictions_per_seq(seq_len)] = 0.0
  targets = rng.integers(1000, vocab_size, (batch, seq_len)).astype(np.int32)
  return dict(input_ids=rng.integers(1000, vocab_size, (batch, seq_len)).astype(np.int32),
              token_type_ids=np.zeros((batch, seq_len), np.int32),
              attention_mask=np.ones((batch, seq_len), np.int32),
              mlm_targets=np.where(weights > 0, targets, 0).astype(np.int32),
              mlm_weights=weights)


# ----------------------------------------------------------------------------------------
# Workers (one configuration each, in a subprocess).
# ----------------------------------------------------------------------------------------

def _ours_config(spec):
  from configs import common  # pylint: disable=g-import-not-at-top
  impl, attention_dropout = PATHS[spec['path']]
  config = common.base_config(spec['size'], spec['attention'])
  config.batch_size, config.data.max_seq_len = spec['batch'], spec['seq']
  config.data.max_predictions_per_seq = predictions_per_seq(spec['seq'])
  config.model.attention_impl = impl
  config.model.attention_dropout_rate = attention_dropout
  # cuDNN's in-kernel dropout cannot run in scanned layers (bert_sym/kernel_choice.py).
  config.model.scan_layers = bool(spec['scan_layers']) and spec['path'] != 'fused_dropout'
  config.optimizer.warmup_steps = 10
  config.prng_impl = spec.get('prng_impl', 'threefry')
  config.xla_gpu_flags = bool(spec.get('xla_gpu_flags', 1))
  config.model.lean_backward = bool(spec.get('lean_backward', 1))
  return config


def _ours_state_step_batch(config, spec):
  """The trainer's step (bert_sym.train.build_mlm_step), its state and a global batch, on
  ONE device: tokens/s and MFU are per accelerator, against one device's peak and the
  Hugging Face peer's one GPU (a mesh over all of a host's GPUs or TPU chips made both
  N times too high)."""
  import jax  # pylint: disable=g-import-not-at-top
  from bert_sym import objectives, sharding, steps, train  # pylint: disable=g-import-not-at-top
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  mlm = train.build_mlm_step(config, mesh)
  state = mlm.spec.init(jax.random.key(0),
                        steps.dropout_key(jax.random.key(1), config.prng_impl))
  host = objectives.host_mlm_positions(
      synthetic_batch(spec['batch'], spec['seq'], config.model.vocab_size),
      config.data.max_predictions_per_seq)
  batch = sharding.host_batch_to_global(host, mesh=mesh, global_batch_size=spec['batch'],
                                        rules=mlm.rules)
  return state, mlm.train_step, batch


def _progress(what):
  print(f'{PROGRESS_PREFIX}{what}', flush=True)


def _timed_steps(compiled, state, batch, warmup, num_steps):
  """(seconds per step, last metrics) over `num_steps` after `warmup` untimed steps."""
  import jax  # pylint: disable=g-import-not-at-top
  metrics = None   # --warmup=0: nothing ran yet (it raised UnboundLocalError)
  for i in range(warmup):
    state, metrics = compiled(state, batch)
    if i == 0:   # the first step apart: one that never ends is named as such
      start = time.perf_counter()
      jax.block_until_ready((state, metrics))
      _progress(f'first step ended ({time.perf_counter() - start:.1f} s)')
  jax.block_until_ready((state, metrics))
  start = time.perf_counter()
  for _ in range(num_steps):
    state, metrics = compiled(state, batch)
  jax.block_until_ready((state, metrics))
  return (time.perf_counter() - start) / num_steps, metrics


def _profile(compiled, state, batch, profile_dir):
  """PROFILE_STEPS steps under jax.profiler; the path of the trace it wrote."""
  import glob  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  jax.profiler.start_trace(profile_dir, create_perfetto_trace=True)
  try:
    for _ in range(PROFILE_STEPS):
      state, metrics = compiled(state, batch)
    jax.block_until_ready((state, metrics))
  finally:
    jax.profiler.stop_trace()
  traces = sorted(glob.glob(os.path.join(profile_dir, 'plugins', 'profile', '*',
                                         '*.trace.json.gz')), key=os.path.getmtime)
  if not traces:
    raise FileNotFoundError(f'jax.profiler wrote no *.trace.json.gz under {profile_dir}')
  return traces[-1]


def compiled_bytes_that_fit(compiled, device) -> int | None:
  """The compiled step's bytes (bert_sym.aot.memory_report's total; None where the backend
  gives no memory analysis). Where they exceed what the device lets JAX allocate (its
  XLA_PYTHON_CLIENT_MEM_FRACTION), MemoryError before any step runs: one line with both
  figures, not an allocator dump (bert-base at 512 x 256 on an 80 GB H100, say)."""
  from bert_sym import aot  # pylint: disable=g-import-not-at-top
  if compiled.memory_analysis() is None:
    return None
  needed = aot.memory_report(compiled)['total']
  limit = (device.memory_stats() or {}).get('bytes_limit')   # None on CPU
  if limit and needed > limit:
    fraction = os.environ.get('XLA_PYTHON_CLIENT_MEM_FRACTION', '0.75, JAX default')
    raise MemoryError(
        f'not run: the compiled step needs {needed / 2**30:.1f} GiB, the '
        f'{device.device_kind} lets JAX have {limit / 2**30:.1f} GiB '
        f'(XLA_PYTHON_CLIENT_MEM_FRACTION={fraction})')
  return needed


def kernel_that_ran(chosen: str, hlo_text: str) -> str:
  """The attention kernel in the compiled step: cuDNN flash attention (__cudnn$fmha...
  custom calls), our Pallas kernel (Triton custom calls of bert_sym.flash_dropout), splash
  (Mosaic: tpu_custom_call) or xla. A record names what ran, not what the config chose: a
  fused path compiled without its kernel raises (the row is an error, not a fallback timed
  under the kernel's name)."""
  from bert_sym import aot  # pylint: disable=g-import-not-at-top
  targets = set(aot.CUSTOM_CALL.findall(hlo_text))
  ran = ('cudnn' if any(t.startswith('__cudnn$fmha') for t in targets) else
         'pallas' if targets & set(aot.TRITON_CALLS) and 'flash_dropout' in hlo_text else
         'splash' if 'tpu_custom_call' in targets else 'xla')
  if chosen in ('cudnn', 'pallas', 'splash') and ran != chosen:
    raise RuntimeError(f'the step chose the {chosen} kernel but compiled without it '
                       f'(custom calls: {sorted(targets) or "none"})')
  return ran


def run_ours(spec):
  from bert_sym import gpu_flags  # pylint: disable=g-import-not-at-top  (before jax starts)
  gpu_flags.set_xla_gpu_flags(bool(spec.get('xla_gpu_flags', 1)))
  import jax  # pylint: disable=g-import-not-at-top
  from bert_sym import kernel_choice, loop, metrics_writer  # pylint: disable=g-import-not-at-top
  from bert_sym import model as model_lib  # pylint: disable=g-import-not-at-top

  config = _ours_config(spec)
  if spec['compilation_cache_dir']:
    loop.enable_compilation_cache(spec['compilation_cache_dir'])
  state, step, batch = _ours_state_step_batch(config, spec)
  _progress('state and batch on the device')
  compiled, compile_s = loop.compile_step(step, state, batch)
  _progress(f'compiled in {compile_s:.1f} s')
  compiled_bytes = compiled_bytes_that_fit(compiled, jax.devices()[0])
  step_s, metrics = _timed_steps(compiled, state, batch, spec['warmup'], spec['steps'])
  profile = {}
  if spec.get('profile_dir'):
    # _timed_steps donated `state`: a fresh one for the profiled steps.
    state, _, batch = _ours_state_step_batch(config, spec)
    trace = _profile(compiled, state, batch, spec['profile_dir'])
    table = os.path.join(spec['profile_dir'], 'top_ops.txt')
    rows, device_ms = top_device_ops(load_trace(trace), steps=PROFILE_STEPS)
    files.write_atomically(table, format_top_ops(rows, device_ms, step_ms=step_s * 1e3,
                                                 title=config_name(spec)))
    profile = dict(profile_trace=trace, profile_table=table)

  device = jax.devices()[0]
  tokens_per_s = spec['batch'] * spec['seq'] / step_s
  flops = model_lib.train_flops_per_token(config.model, spec['seq'],
                                          model_lib.mlm_predicted_fraction(config))
  peak = metrics_writer.peak_flops_per_device()
  stats = device.memory_stats() or {}
  impl, attention_dropout = PATHS[spec['path']]
  chosen = impl
  if impl == 'auto':
    chosen = kernel_choice.resolve_implementation(
        impl, training_dropout=attention_dropout > 0, return_weights=False,
        seq_len=spec['seq'], dtype=model_lib.compute_dtype(config.model.dtype),
        scanned=bool(config.model.scan_layers),
        head_dim=config.model.hidden_size // config.model.num_heads)
  return dict(
      compile_s=compile_s, step_ms=step_s * 1e3, tokens_per_s=tokens_per_s,
      mfu=(tokens_per_s * flops / peak) if peak else None,
      peak_memory_gib=stats.get('peak_bytes_in_use', 0) / 2**30 or None,
      compiled_memory_gib=None if compiled_bytes is None else compiled_bytes / 2**30,
      kernel=kernel_that_ran(chosen, compiled.as_text()),
      loss=float(metrics['train/loss']), device=device.device_kind,
      platform=device.platform, jax=jax.__version__, scan_layers=config.model.scan_layers,
      xla_flags=os.environ.get('XLA_FLAGS', ''), **profile, **_cuda_versions(jax))


def _cuda_versions(jax):
  try:
    from jax._src.lib import cuda_versions  # pylint: disable=g-import-not-at-top
    if cuda_versions is None:
      return {}
    return {'cuda_runtime': cuda_versions.cuda_runtime_get_version(),
            'cudnn': cuda_versions.cudnn_get_version()}
  except Exception:  # pylint: disable=broad-except
    del jax
    return {}


def run_hf(spec):
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  from bert_sym import hf_export as export  # pylint: disable=g-import-not-at-top  (NumPy only)
  from bert_sym import model as model_lib  # pylint: disable=g-import-not-at-top
  from configs import common  # pylint: disable=g-import-not-at-top

  cfg = common.model_config(spec['size'], 'standard')
  _, attention_dropout = PATHS[spec['path']]
  hf_config = transformers.BertConfig(**export.hf_bert_config_kwargs(cfg))
  hf_config.attention_probs_dropout_prob = attention_dropout
  cuda = torch.cuda.is_available()
  device = torch.device('cuda' if cuda else 'cpu')
  torch.manual_seed(0)
  model = transformers.BertForMaskedLM._from_config(  # pylint: disable=protected-access
      hf_config, attn_implementation='sdpa').to(device).train()
  optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01,
                                **({'fused': True} if cuda else {}))
  host = synthetic_batch(spec['batch'], spec['seq'], cfg.vocab_size)
  labels = host['mlm_targets'].astype('int64')
  labels[host['mlm_weights'] == 0] = -100
  as_torch = lambda x: torch.from_numpy(x.astype('int64')).to(device)
  inputs = dict(input_ids=as_torch(host['input_ids']),
                token_type_ids=as_torch(host['token_type_ids']),
                attention_mask=as_torch(host['attention_mask']), labels=as_torch(labels))
  sync = torch.cuda.synchronize if cuda else (lambda: None)

  def step():
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=cuda):
      loss = model(**inputs).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss

  for _ in range(spec['warmup']):
    loss = step()
  sync()
  start = time.perf_counter()
  for _ in range(spec['steps']):
    loss = step()
  sync()
  step_s = (time.perf_counter() - start) / spec['steps']
  tokens_per_s = spec['batch'] * spec['seq'] / step_s
  flops = model_lib.train_flops_per_token(cfg, spec['seq'], 1.0)   # dense head
  peak = 0.0
  if cuda:   # the same peak table as ours, by name (no JAX backend is started here)
    from bert_sym import metrics_writer  # pylint: disable=g-import-not-at-top
    kind = type('Device', (), {'device_kind': torch.cuda.get_device_name()})()
    peak = metrics_writer.peak_flops_per_device(device=kind)
  return dict(
      compile_s=None, step_ms=step_s * 1e3, tokens_per_s=tokens_per_s,
      flops_per_token=flops, mfu=None if not peak else tokens_per_s * flops / peak,
      peak_memory_gib=(torch.cuda.max_memory_allocated() / 2**30) if cuda else None,
      kernel='sdpa', loss=float(loss), device=(torch.cuda.get_device_name() if cuda
                                               else 'cpu'),
      torch=torch.__version__, transformers=transformers.__version__,
      torch_cuda=torch.version.cuda)


# ----------------------------------------------------------------------------------------
# The profile: jax.profiler's trace (Chrome trace JSON) -> the top device ops.
# ----------------------------------------------------------------------------------------

def load_trace(path):
  import gzip  # pylint: disable=g-import-not-at-top
  with (gzip.open if path.endswith('.gz') else open)(path, 'rt') as f:
    trace = json.load(f)
  return trace['traceEvents'] if isinstance(trace, dict) else trace


def _op_threads(events):
  """{(pid, tid)} of the events that are device ops: on a GPU/TPU the 'XLA Ops' line of
  each /device: process (else all its lines); on CPU, where XLA runs its thunks on host
  threads, the tf_XLA* threads of /host:CPU."""
  processes, threads = {}, {}
  for e in events:
    if e.get('ph') == 'M' and e.get('name') == 'process_name':
      processes[e['pid']] = e['args']['name']
    elif e.get('ph') == 'M' and e.get('name') == 'thread_name':
      threads[(e['pid'], e['tid'])] = e['args']['name']
  devices = {p for p, name in processes.items()
             if name.startswith('/device:') and 'CUSTOM' not in name}
  if devices:
    xla_ops = {k for k, name in threads.items() if k[0] in devices and name == 'XLA Ops'}
    return xla_ops or {k for k in threads if k[0] in devices}, 'device'
  host = {p for p, name in processes.items() if name.startswith('/host:CPU')}
  return {k for k, name in threads.items()
          if k[0] in host and name.startswith('tf_XLA')}, 'cpu'


def top_device_ops(events, *, steps: int, top: int = TOP_OPS):
  """([(name, calls per step, ms per step)], device busy ms per step), longest first."""
  chosen, _ = _op_threads(events)
  totals, counts = {}, {}
  for e in events:
    if e.get('ph') != 'X' or (e.get('pid'), e.get('tid')) not in chosen:
      continue
    name = e['name']
    if name.startswith(('end: ', 'ThunkExecutor')):   # XLA:CPU's wrappers, not ops
      continue
    totals[name] = totals.get(name, 0.0) + float(e.get('dur', 0.0))
    counts[name] = counts.get(name, 0) + 1
  busy_ms = sum(totals.values()) / 1e3 / steps
  rows = sorted(((n, counts[n] / steps, totals[n] / 1e3 / steps) for n in totals),
                key=lambda r: -r[2])
  return rows[:top], busy_ms


def format_top_ops(rows, device_ms, *, step_ms, title=''):
  lines = [f'Top {len(rows)} device ops by time{": " + title if title else ""}',
           f'step {step_ms:.2f} ms (timed), device busy {device_ms:.2f} ms per step '
           f'(profiled, {PROFILE_STEPS} steps)',
           f"{'#':>3}  {'op':<48} {'calls/step':>10} {'ms/step':>9} {'% step':>7} "
           f"{'% busy':>7}"]
  for i, (name, calls, ms) in enumerate(rows, 1):
    lines.append(f'{i:>3}  {name[:48]:<48} {calls:>10.1f} {ms:>9.3f} '
                 f'{100 * ms / step_ms if step_ms else 0:>6.1f}% '
                 f'{100 * ms / device_ms if device_ms else 0:>6.1f}%')
  return '\n'.join(lines) + '\n'


def config_name(spec):
  return f"{spec['attention']}_{spec['path']}_{spec['seq']}x{spec['batch']}"


def worker(spec):
  result = dict(spec)
  try:
    result.update(run_hf(spec) if spec['impl'] == 'hf' else run_ours(spec))
    result['status'] = 'ok'
  except Exception as e:  # pylint: disable=broad-except
    result.update(status='error', error=f'{type(e).__name__}: {e}'[:2000])
  print(RESULT_PREFIX + json.dumps(result), flush=True)


# ----------------------------------------------------------------------------------------
# The parent: one subprocess per configuration, hard time limits, lines as they come.
# ----------------------------------------------------------------------------------------

def configurations(args):
  specs = []
  common_fields = dict(size=args.size, steps=args.steps, warmup=args.warmup,
                       scan_layers=args.scan_layers, prng_impl=args.prng_impl,
                       xla_gpu_flags=args.xla_gpu_flags, lean_backward=args.lean_backward,
                       compilation_cache_dir=args.compilation_cache_dir)
  if args.steps < 1 or args.warmup < 0:   # else every worker compiled, then divided by 0
    raise SystemExit(f'--steps={args.steps} --warmup={args.warmup}: need steps >= 1, '
                     'warmup >= 0')
  for attention in args.variants.split(','):
    if attention not in VARIANTS:
      raise SystemExit(f'--variants: unknown variant {attention!r}; use some of {VARIANTS}')
  for shape in args.shapes.split(','):
    try:
      seq, batch = (int(v) for v in shape.split('x'))
      if seq < 1 or batch < 1:
        raise ValueError
    except ValueError:
      raise SystemExit(f'--shapes: {shape!r} is not SEQxBATCH (e.g. 128x256)') from None
    hf_rates = set()   # one HF run per attention-dropout rate: the peer of every path with it
    for path in args.paths.split(','):
      if path not in PATHS:
        raise SystemExit(f'--paths: unknown path {path!r}; use some of {sorted(PATHS)}')
      for attention in args.variants.split(','):
        specs.append(dict(common_fields, impl='ours', attention=attention, path=path,
                          seq=seq, batch=batch))
      if args.hf and PATHS[path][1] not in hf_rates:
        hf_rates.add(PATHS[path][1])
        specs.append(dict(common_fields, impl='hf', attention='standard', path=path,
                          seq=seq, batch=batch))
  if args.profile:   # the first of ours, traced after its timed steps
    first = next((s for s in specs if s['impl'] == 'ours'), None)
    if first is not None:
      first['profile_dir'] = os.path.join(args.profile_root, 'profile_' + config_name(first))
  return specs


def _text(data) -> str:
  return data.decode(errors='replace') if isinstance(data, bytes) else (data or '')


def run_one(spec, timeout_s):
  """Runs `spec` in a subprocess; SIGKILL after timeout_s. Returns the result dict."""
  command = [sys.executable, os.path.abspath(__file__), '--worker', json.dumps(spec)]
  start = time.perf_counter()
  process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, cwd=REPO_ROOT)
  timed_out = False
  try:
    out, err = process.communicate(timeout=timeout_s)
  except subprocess.TimeoutExpired:
    process.kill()   # SIGKILL: a wedged kernel or compiler does not get a say
    try:
      out, err = process.communicate(timeout=5)
    except subprocess.TimeoutExpired as e:   # a child of it (ptxas...) holds the pipes
      out, err = (_text(e.output), _text(e.stderr))
      process.wait()
    timed_out = True
  reached = [l[len(PROGRESS_PREFIX):] for l in out.splitlines() if l.startswith(PROGRESS_PREFIX)]
  for line in out.splitlines():   # measured, then stuck on the way out: still a result
    if line.startswith(RESULT_PREFIX):
      result = json.loads(line[len(RESULT_PREFIX):])
      result.update(wall_s=time.perf_counter() - start, progress=reached)
      if timed_out:
        result['note'] = f'killed after {timeout_s} s, after printing this result'
      return result
  if timed_out:
    return dict(spec, status='timeout', wall_s=time.perf_counter() - start,
                error=f'killed after {timeout_s:.0f} s; ' + (
                    f'its last milestone: {reached[-1]}' if reached else
                    'before its state was on the device'), progress=reached)
  return dict(spec, status='crashed', error=(err or out)[-2000:],
              returncode=process.returncode, wall_s=time.perf_counter() - start)


def format_line(r):
  name = f"{r['impl']:<4} {r['attention']:<9} {r['path']:<5} seq {r['seq']:>4} x {r['batch']:>3}"
  if r['status'] != 'ok':
    return f"{name} | {r['status'].upper()}: {r.get('error', '')[:300]}"
  fmt = lambda v, f: '-' if v is None else format(v, f)
  line = (f"{name} | kernel {r['kernel']:<6} | compile {fmt(r['compile_s'], '.1f')} s | "
          f"step {r['step_ms']:.1f} ms | {r['tokens_per_s']:,.0f} tok/s | "
          f"MFU {fmt(r['mfu'] and 100 * r['mfu'], '.1f')}% | "
          f"mem {fmt(r['peak_memory_gib'], '.2f')} GiB | loss {r['loss']:.3f}")
  if r.get('vs_hf') is not None:
    line += f" | ours/HF {r['vs_hf']:.2f}x"
  if r['impl'] == 'ours':
    line += f" | scan {int(bool(r.get('scan_layers')))}"
    line += f" | prng {r.get('prng_impl', 'threefry')} | xla_gpu_flags {r.get('xla_gpu_flags', 1)}"
    line += f" | lean {r.get('lean_backward', 1)}"
  if r.get('profile_table'):
    line += f" | profile {r['profile_table']}"
  return line


def parse_args():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--size', default='base', choices=sorted(SHAPES))
  parser.add_argument('--shapes', default='', help='SEQxBATCH,... (default: per size)')
  parser.add_argument('--variants', default=','.join(VARIANTS))
  parser.add_argument('--paths', default=','.join(DEFAULT_PATHS),
                      help=f'of {sorted(PATHS)}')
  parser.add_argument('--prng_impl', default='threefry',
                      choices=('threefry', 'rbg', 'unsafe_rbg'), help='config.prng_impl')
  parser.add_argument('--xla_gpu_flags', type=int, default=1,
                      help='1: the trainer\'s XLA GPU flags (bert_sym/gpu_flags.py); 0: off')
  parser.add_argument('--lean_backward', type=int, default=1,
                      help='1: model.lean_backward (bert_sym/lean_backward.py); 0: JAX '
                      'autodiff\'s backward')
  parser.add_argument('--profile', action='store_true',
                      help='trace the first of our configs; write top_ops.txt beside it')
  parser.add_argument('--profile_root', default=os.path.join(REPO_ROOT, 'benchmarks',
                                                             'results'))
  parser.add_argument('--steps', type=int, default=20, help='timed steps per config')
  parser.add_argument('--warmup', type=int, default=2)
  parser.add_argument('--no_hf', dest='hf', action='store_false')
  parser.add_argument('--scan_layers', type=int, default=None,
                      help='1: model.scan_layers=True (compile time independent of depth); '
                      '0: unscanned. Default: the trainer\'s (configs/common.py)')
  parser.add_argument('--timeout_s', type=float, default=75.0, help='per configuration')
  parser.add_argument('--budget_s', type=float, default=285.0,
                      help='total; configurations not started in time are skipped')
  parser.add_argument('--compilation_cache_dir', default='',
                      help="'' (default): every compile is measured cold")
  parser.add_argument('--out', default='', help='JSON path (default benchmarks/results/...)')
  parser.add_argument('--worker', default='', help=argparse.SUPPRESS)
  args = parser.parse_args()
  args.shapes = args.shapes or ','.join(SHAPES[args.size])
  if args.scan_layers is None:   # what `python -m bert_sym.train` runs, unless told
    from configs import common  # pylint: disable=g-import-not-at-top  (ml_collections only)
    args.scan_layers = int(common.base_config(args.size, 'standard').model.scan_layers)
  return args


def _same_shape(r, spec):
  """Same shape and attention-dropout rate (the HF peer of every path with that rate)."""
  return ((r['seq'], r['batch'], PATHS[r['path']][1]) ==
          (spec['seq'], spec['batch'], PATHS[spec['path']][1]))


def add_hf_ratio(result, spec, results) -> None:
  """ours/HF tokens/s at the same shape and recipe, on whichever line comes second."""
  if result['status'] != 'ok':
    return
  if result['impl'] == 'hf':
    for r in results:   # ours lines already printed at this shape and path
      if r['impl'] == 'ours' and r['status'] == 'ok' and _same_shape(r, spec):
        r['vs_hf'] = r['tokens_per_s'] / result['tokens_per_s']
    return
  hf = [r for r in results if r['impl'] == 'hf' and r['status'] == 'ok' and _same_shape(r, spec)]
  if hf:
    result['vs_hf'] = result['tokens_per_s'] / hf[0]['tokens_per_s']


def write_summary(args, date, started, results) -> None:
  ok = [r for r in results if r['status'] == 'ok']
  print('ours/HF tokens/s ratios (same shape and attention-dropout recipe):', flush=True)
  for r in ok:
    if r.get('vs_hf') is not None:
      print(f"  {r['attention']:<9} {r['path']:<5} seq {r['seq']:>4}: {r['vs_hf']:.2f}x",
            flush=True)
  ours = [r for r in ok if r['impl'] == 'ours']
  device = ours[0]['device'] if ours else (ok[0]['device'] if ok else 'unknown')
  summary = dict(
      date=date, device=device, command=' '.join(sys.argv),
      versions={k: ours[0].get(k) for k in ('jax', 'cuda_runtime', 'cudnn', 'platform')}
      if ours else {},
      hf_versions={k: r.get(k) for r in ok if r['impl'] == 'hf'
                   for k in ('torch', 'transformers', 'torch_cuda')},
      wall_s=time.perf_counter() - started, results=results)
  out = args.out or os.path.join(
      REPO_ROOT, 'benchmarks', 'results',
      f"accelerator_{device.replace(' ', '-').lower()}_{date[:10]}.json")
  # Whole or not at all: run_gpu.sh's SIGKILL may land while it is written.
  files.write_atomically(out, json.dumps(summary, indent=1))
  print(f'wrote {out} ({summary["wall_s"]:.0f} s)', flush=True)


def main():
  args = parse_args()
  if args.worker:
    worker(json.loads(args.worker))
    return
  started = time.perf_counter()
  date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')
  print(f'benchmarks/accelerator.py --size={args.size} shapes {args.shapes} '
        f'steps {args.steps} ({date})', flush=True)
  results = []
  for spec in configurations(args):
    left = args.budget_s - (time.perf_counter() - started)
    if left < 5:
      result = dict(spec, status='skipped', error=f'total budget {args.budget_s} s spent')
    else:
      result = run_one(spec, min(args.timeout_s, left))
    add_hf_ratio(result, spec, results)
    results.append(result)
    print(format_line(result), flush=True)
  write_summary(args, date, started, results)


if __name__ == '__main__':
  main()

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

Each configuration runs in its own subprocess under a hard time limit (killed on expiry),
so one that hangs or runs out of memory costs only its own slot; the parent never
initialises an accelerator itself. A result line is printed and flushed as soon as it is
measured: compile seconds (lower().compile(), once) apart from the step time, tokens/s,
MFU (model FLOPs from model.train_flops_per_token; peak from metrics_writer) and peak
device memory. All lines go to benchmarks/results/accelerator_<device>_<date>.json.

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

SHAPES = {'base': ['128x256', '512x32'], 'small': ['128x64', '512x16'],
          'tiny': ['64x8', '128x4']}
VARIANTS = ('standard', 'symmetric', 'pairwise')
PATHS = {  # name: (attention_impl, attention_dropout_rate)
    'fused': ('auto', 0.0),
    'xla': ('xla', 0.1),
}
RESULT_PREFIX = 'RESULT '


def predictions_per_seq(seq_len):
  """Original BERT's max_predictions_per_seq: 20 at 128, 80 at 512 (15% rounded up)."""
  return {128: 20, 512: 80}.get(seq_len, math.ceil(0.15 * seq_len))


def synthetic_batch(batch, seq_len, vocab_size, seed=0):
  import numpy as np  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  weights = (rng.random((batch, seq_len)) < 0.15).astype(np.float32)
  weights[:, 0] = 0.0
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
  config.model.scan_layers = bool(spec['scan_layers'])
  config.optimizer.warmup_steps = 10
  return config


def _ours_state_step_batch(config, spec):
  """The trainer's pieces: state created sharded (steps.create_state), its update step
  jitted under the kernel mesh (steps.jit_train_step), a global batch."""
  import jax  # pylint: disable=g-import-not-at-top
  from bert_sym import model as model_lib  # pylint: disable=g-import-not-at-top
  from bert_sym import objectives, optim, sharding, steps, train  # pylint: disable=g-import-not-at-top
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.logical_rules(config)
  batch_sharding = sharding.batch_sharding(mesh, rules)
  model = model_lib.BertForMaskedLM(config.model)
  tx, schedule = optim.make_optimizer(config.optimizer, config.total_steps)
  state_spec = steps.create_state(
      lambda key: model.init(key, *model_lib.dummy_inputs(1, spec['seq']))['params'],
      tx, mesh, rules)
  state = state_spec.init(jax.random.key(0), jax.random.key(1))
  step = steps.jit_train_step(
      train.make_train_step(config, model, tx, schedule, mesh, batch_sharding),
      state_spec.shardings, batch_sharding, sharding.replicated(mesh), rules)
  host = objectives.host_mlm_positions(
      synthetic_batch(spec['batch'], spec['seq'], config.model.vocab_size),
      config.data.max_predictions_per_seq)
  batch = sharding.host_batch_to_global(host, mesh=mesh, global_batch_size=spec['batch'],
                                        rules=rules)
  return state, step, batch


def _timed_steps(compiled, state, batch, warmup, num_steps):
  """(seconds per step, last metrics) over `num_steps` after `warmup` untimed steps."""
  import jax  # pylint: disable=g-import-not-at-top
  for _ in range(warmup):
    state, metrics = compiled(state, batch)
  jax.block_until_ready((state, metrics))
  start = time.perf_counter()
  for _ in range(num_steps):
    state, metrics = compiled(state, batch)
  jax.block_until_ready((state, metrics))
  return (time.perf_counter() - start) / num_steps, metrics


def run_ours(spec):
  import jax  # pylint: disable=g-import-not-at-top
  from bert_sym import attention, loop, metrics_writer  # pylint: disable=g-import-not-at-top
  from bert_sym import model as model_lib  # pylint: disable=g-import-not-at-top

  config = _ours_config(spec)
  if spec['compilation_cache_dir']:
    loop.enable_compilation_cache(spec['compilation_cache_dir'])
  state, step, batch = _ours_state_step_batch(config, spec)
  compiled, compile_s = loop.compile_step(step, state, batch)
  step_s, metrics = _timed_steps(compiled, state, batch, spec['warmup'], spec['steps'])

  device = jax.devices()[0]
  tokens_per_s = spec['batch'] * spec['seq'] / step_s
  flops = model_lib.train_flops_per_token(config.model, spec['seq'],
                                          model_lib.mlm_predicted_fraction(config))
  peak = metrics_writer.peak_flops_per_device()
  stats = device.memory_stats() or {}
  impl, attention_dropout = PATHS[spec['path']]
  chosen = impl
  if impl == 'auto':
    chosen = attention.resolve_implementation(
        impl, training_dropout=attention_dropout > 0, return_weights=False,
        seq_len=spec['seq'], dtype=model_lib.compute_dtype(config.model.dtype))
  return dict(
      compile_s=compile_s, step_ms=step_s * 1e3, tokens_per_s=tokens_per_s,
      mfu=(tokens_per_s * flops / peak) if peak else None,
      peak_memory_gib=stats.get('peak_bytes_in_use', 0) / 2**30 or None,
      kernel=chosen, loss=float(metrics['train/loss']), device=device.device_kind,
      platform=device.platform, jax=jax.__version__, **_cuda_versions(jax))


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
  from bert_sym import export  # pylint: disable=g-import-not-at-top  (NumPy only)
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
                       scan_layers=args.scan_layers,
                       compilation_cache_dir=args.compilation_cache_dir)
  for shape in args.shapes.split(','):
    seq, batch = (int(v) for v in shape.split('x'))
    for path in args.paths.split(','):
      for attention in args.variants.split(','):
        specs.append(dict(common_fields, impl='ours', attention=attention, path=path,
                          seq=seq, batch=batch))
      if args.hf:
        specs.append(dict(common_fields, impl='hf', attention='standard', path=path,
                          seq=seq, batch=batch))
  return specs


def run_one(spec, timeout_s):
  """Runs `spec` in a subprocess; SIGKILL after timeout_s. Returns the result dict."""
  command = [sys.executable, os.path.abspath(__file__), '--worker', json.dumps(spec)]
  start = time.perf_counter()
  process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, cwd=REPO_ROOT)
  try:
    out, err = process.communicate(timeout=timeout_s)
  except subprocess.TimeoutExpired:
    process.kill()   # SIGKILL: a wedged kernel or compiler does not get a say
    out, err = process.communicate()
    return dict(spec, status='timeout', error=f'killed after {timeout_s} s',
                wall_s=time.perf_counter() - start)
  for line in out.splitlines():
    if line.startswith(RESULT_PREFIX):
      result = json.loads(line[len(RESULT_PREFIX):])
      result['wall_s'] = time.perf_counter() - start
      return result
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
  return line


def parse_args():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--size', default='base', choices=sorted(SHAPES))
  parser.add_argument('--shapes', default='', help='SEQxBATCH,... (default: per size)')
  parser.add_argument('--variants', default=','.join(VARIANTS))
  parser.add_argument('--paths', default=','.join(PATHS))
  parser.add_argument('--steps', type=int, default=20, help='timed steps per config')
  parser.add_argument('--warmup', type=int, default=2)
  parser.add_argument('--no_hf', dest='hf', action='store_false')
  parser.add_argument('--scan_layers', type=int, default=1,
                      help='1: model.scan_layers=True (compile time independent of depth)')
  parser.add_argument('--timeout_s', type=float, default=75.0, help='per configuration')
  parser.add_argument('--budget_s', type=float, default=285.0,
                      help='total; configurations not started in time are skipped')
  parser.add_argument('--compilation_cache_dir', default='',
                      help="'' (default): every compile is measured cold")
  parser.add_argument('--out', default='', help='JSON path (default benchmarks/results/...)')
  parser.add_argument('--worker', default='', help=argparse.SUPPRESS)
  return parser.parse_args()


def _same_shape(r, spec):
  return (r['seq'], r['batch'], r['path']) == (spec['seq'], spec['batch'], spec['path'])


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
  os.makedirs(os.path.dirname(out), exist_ok=True)
  with open(out, 'w') as f:
    json.dump(summary, f, indent=1)
  print(f'wrote {out} ({summary["wall_s"]:.0f} s)', flush=True)


def main():
  args = parse_args()
  if args.worker:
    worker(json.loads(args.worker))
    return
  args.shapes = args.shapes or ','.join(SHAPES[args.size])
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

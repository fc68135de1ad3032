"""Training-step time of the three attention variants on the current device, in one run.

  python benchmarks/attention_variants.py --size=small --batch=8 --seq_len=128

Times one jitted forward+backward (value_and_grad of the sparse-head MLM loss, as the
trainer runs it, no optimizer update) per variant. Variants are interleaved round by
round so that drift of the machine (thermal, other load) hits all of them alike; the
reported time is the median over rounds, and the ratio to standard also as the median
of per-round ratios. Writes benchmarks/results/attention_variants_<device>.json.

  python benchmarks/attention_variants.py --scope=attention --size=small --batch=8 --seq_len=128

times one attention block alone, where the variants differ. The compiler's FLOP count of
each compiled step is printed too: on a shared CPU it is the noise-free half of the story.
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bert_sym import model as bert  # noqa: E402
from bert_sym.attention import SelfAttention  # noqa: E402
from configs.common import model_config  # noqa: E402

VARIANTS = ('standard', 'symmetric', 'pairwise')


def make_batch(cfg, batch, seq_len, num_predictions, seed=0):
  rng = np.random.default_rng(seed)
  input_ids = rng.integers(1, cfg.vocab_size, (batch, seq_len)).astype(np.int32)
  token_type_ids = (np.arange(seq_len) >= seq_len // 2).astype(np.int32)[None].repeat(batch, 0)
  attention_mask = np.ones((batch, seq_len), np.int32)
  positions = np.sort(rng.permuted(np.tile(np.arange(seq_len), (batch, 1)), axis=1)
                      [:, :num_predictions], axis=1).astype(np.int32)
  labels = rng.integers(0, cfg.vocab_size, (batch, num_predictions)).astype(np.int32)
  return tuple(jnp.asarray(a) for a in
               (input_ids, token_type_ids, attention_mask, positions, labels))


def build_step(cfg, deterministic):
  model = bert.BertForMaskedLM(cfg)

  def loss_fn(params, batch, rng):
    input_ids, token_type_ids, attention_mask, positions, labels = batch
    logits = model.apply({'params': params}, input_ids, token_type_ids, attention_mask,
                         masked_positions=positions, deterministic=deterministic,
                         rngs={'dropout': rng})
    log_probs = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(log_probs, labels[..., None], -1))

  return model, jax.jit(jax.value_and_grad(loss_fn))


def build_attention_step(cfg, batch, seq_len):
  """One SelfAttention block alone (fwd+bwd of a scalar of its output): isolates the
  part of the step where the variants differ from the shared FFN, embeddings and head."""
  dtype = bert.compute_dtype(cfg.dtype)
  module = SelfAttention(
      hidden_size=cfg.hidden_size, num_heads=cfg.num_heads, attention=cfg.attention,
      attention_impl=cfg.attention_impl, attention_dropout_rate=0.0, dtype=dtype)
  x = jax.random.normal(jax.random.key(0), (batch, seq_len, cfg.hidden_size), dtype)
  mask = jnp.ones((batch, 1, 1, seq_len), bool)
  params = nn.meta.unbox(module.init(jax.random.key(0), x, mask, deterministic=True)['params'])

  def loss_fn(params, x, rng):
    del rng
    out = module.apply({'params': params}, x, mask, deterministic=True)
    return jnp.mean(jnp.square(out.astype(jnp.float32)))

  step = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1)))
  return params, x, step


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--size', default='small', choices=['base', 'small', 'tiny'])
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--seq_len', type=int, default=128)
  parser.add_argument('--predictions', type=int, default=0,
                      help='masked positions per sequence (0 = 15%% of seq_len, rounded up)')
  parser.add_argument('--steps', type=int, default=1,
                      help='timed steps per variant per round (1 = finest interleaving)')
  parser.add_argument('--rounds', type=int, default=15, help='interleaved rounds')
  parser.add_argument('--warmup', type=int, default=2)
  parser.add_argument('--dtype', default='auto', help="compute dtype: auto|float32|bfloat16")
  parser.add_argument('--impl', default='auto', choices=['auto', 'xla', 'cudnn', 'splash'])
  parser.add_argument('--train_mode', action='store_true',
                      help='dropout on (auto then runs the xla attention path: the fused '
                           'kernels have no attention-probability dropout)')
  parser.add_argument('--variants', default=','.join(VARIANTS))
  parser.add_argument('--scope', default='model', choices=['model', 'attention'],
                      help='model: the MLM training step; attention: one attention block')
  parser.add_argument('--out', default='')
  args = parser.parse_args()

  variants = args.variants.split(',')
  num_predictions = args.predictions or -(-args.seq_len * 15 // 100)
  device = jax.devices()[0]
  device_name = f'{device.platform}-{device.device_kind}'.replace(' ', '_').lower()
  if device.platform == 'cpu':
    device_name = f'cpu-{os.cpu_count()}core'

  steps, params, xla_flops, batch = {}, {}, {}, None
  for attention in variants:
    cfg = model_config(args.size, attention)
    cfg.dtype, cfg.attention_impl = args.dtype, args.impl
    if args.scope == 'attention':
      params[attention], batch, step = build_attention_step(cfg, args.batch, args.seq_len)
    else:
      batch = batch or make_batch(cfg, args.batch, args.seq_len, num_predictions)
      model, step = build_step(cfg, deterministic=not args.train_mode)
      params[attention] = nn.meta.unbox(
          jax.jit(model.init)(jax.random.key(0), *batch[:3])['params'])
    rng = jax.random.key(1)
    # Compiled once: the executable is timed below and its FLOPs, counted by the
    # compiler, are a noise-free check on the timings (a shared CPU is noisy) and on the
    # analytic FLOP formula.
    step = step.lower(params[attention], batch, rng).compile()
    steps[attention] = step
    cost = step.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    xla_flops[attention] = float(cost.get('flops', float('nan'))) if cost else float('nan')
    for _ in range(args.warmup):   # first runs
      jax.block_until_ready(step(params[attention], batch, rng))

  times = {a: [] for a in variants}
  round_medians = {a: [] for a in variants}
  rng = jax.random.key(2)
  order_rng = np.random.default_rng(0)
  for _ in range(args.rounds):
    # A fresh order each round, so no variant always runs right after another one.
    for attention in order_rng.permutation(variants):
      round_times = []
      for _ in range(args.steps):
        start = time.perf_counter()
        jax.block_until_ready(steps[attention](params[attention], batch, rng))
        round_times.append(time.perf_counter() - start)
      times[attention] += round_times
      round_medians[attention].append(statistics.median(round_times))

  tokens = args.batch * args.seq_len
  baseline = statistics.median(times['standard']) if 'standard' in times else None
  results = {}
  print(f'{args.scope}: {args.size}  batch {args.batch} x seq {args.seq_len}  predictions {num_predictions}'
        f'  dtype {jnp.dtype(bert.compute_dtype(args.dtype)).name}  impl {args.impl}  device {device_name}')
  print(f'{"variant":<10} {"step ms":>9} {"p10-p90 ms":>14} {"tokens/s":>10} {"vs std (paired)":>16}'
        f' {"model TFLOP/s":>13} {"XLA GFLOP/step":>15} {"vs standard":>12}')
  for attention in variants:
    t = np.array(times[attention])
    median = float(np.median(t))
    cfg = model_config(args.size, attention)
    flops = bert.train_flops_per_token(cfg, args.seq_len, num_predictions / args.seq_len)
    if args.scope == 'attention':   # one layer's projections and scores, no MLM head
      d, head_dim = cfg.hidden_size, cfg.hidden_size // cfg.num_heads
      projections = 4 if attention == 'standard' else 3
      flops = 3 * (2 * projections * d * d + 4 * args.seq_len * d
                   + (2 * d * head_dim if attention == 'pairwise' else 0))
    results[attention] = dict(
        step_s_median=median, step_s_p10=float(np.percentile(t, 10)),
        step_s_p90=float(np.percentile(t, 90)), samples=len(t), tokens_per_s=tokens / median,
        ratio_to_standard=median / baseline if baseline else None,
        # Median of per-round ratios: each pairs runs seconds apart, which cancels slow
        # drift of a shared machine better than the ratio of the overall medians.
        paired_ratio_to_standard=(float(np.median(np.array(round_medians[attention])
                                                  / np.array(round_medians['standard'])))
                                  if baseline else None),
        model_tflops_per_s=flops * tokens / median / 1e12,
        model_gflops_per_step=flops * tokens / 1e9,
        xla_gflops_per_step=xla_flops[attention] / 1e9,
        xla_flops_ratio_to_standard=(xla_flops[attention] / xla_flops['standard']
                                     if baseline else None))
    r = results[attention]
    ratio = (f'{r["ratio_to_standard"]:.3f}/{r["paired_ratio_to_standard"]:.3f}x'
             if baseline else '-')
    print(f'{attention:<10} {1e3 * median:9.1f} {1e3 * r["step_s_p10"]:6.1f}-{1e3 * r["step_s_p90"]:<7.1f}'
          f' {r["tokens_per_s"]:10.0f} {ratio:>16} {r["model_tflops_per_s"]:13.3f}'
          f' {r["xla_gflops_per_step"]:15.2f} {r["xla_flops_ratio_to_standard"] or 0:11.3f}x')

  out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results',
                                 f'attention_variants_{args.scope}_{device_name}.json'
                                 if args.scope != 'model' else
                                 f'attention_variants_{device_name}.json')
  os.makedirs(os.path.dirname(out), exist_ok=True)
  with open(out, 'w') as f:
    json.dump(dict(
        args=vars(args), device=device_name, device_kind=device.device_kind,
        jax=jax.__version__, python=platform.python_version(),
        date=datetime.date.today().isoformat(), num_predictions=num_predictions,
        compute_dtype=jnp.dtype(bert.compute_dtype(args.dtype)).name, results=results), f, indent=2)
  print(f'wrote {out}')


if __name__ == '__main__':
  main()

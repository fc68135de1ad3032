"""Training-step time of the three attention variants on the current device, in one run.

  python benchmarks/attention_variants.py --size=small --batch=8 --seq_len=128

Times one jitted forward+backward per variant of the trainer's loss,
`objectives.mlm_loss_fn` (sparse MLM head, normalised by `objectives.mlm_weight`), no
optimizer update. Variants are interleaved round by round so that drift of the machine
(thermal, other load) hits all of them alike; the reported time is the median over
rounds, and the ratio to standard also as the median of per-round ratios. Writes
attention_variants_<device>.json into --out_dir (default runs/benchmarks); --record
writes it to benchmarks/results/ instead, the committed record.

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

from bert_sym import files  # noqa: E402
from bert_sym import model as bert  # noqa: E402
from bert_sym import objectives  # noqa: E402
from bert_sym.attention import SelfAttention  # noqa: E402
from configs.common import model_config  # noqa: E402

VARIANTS = ('standard', 'symmetric', 'pairwise')


def make_batch(cfg, batch, seq_len, num_predictions, seed=0):
  """A masked-LM batch as the trainer's iterator gives it (dense targets and weights, and
  the host-computed sparse positions)."""
  rng = np.random.default_rng(seed)
  positions = np.sort(rng.permuted(np.tile(np.arange(seq_len), (batch, 1)), axis=1)
                      [:, :num_predictions], axis=1)
  weights = np.zeros((batch, seq_len), np.float32)
  np.put_along_axis(weights, positions, 1.0, axis=1)
  host = {
      'input_ids': rng.integers(1, cfg.vocab_size, (batch, seq_len)).astype(np.int32),
      'token_type_ids': (np.arange(seq_len) >= seq_len // 2).astype(np.int32)[None].repeat(
          batch, 0),
      'attention_mask': np.ones((batch, seq_len), np.int32),
      'mlm_targets': rng.integers(0, cfg.vocab_size, (batch, seq_len)).astype(np.int32),
      'mlm_weights': weights,
  }
  return jax.tree.map(jnp.asarray, objectives.host_mlm_positions(host, num_predictions))


def build_step(cfg, num_predictions, deterministic):
  """jit(value_and_grad) of the trainer's MLM loss (bert_sym.objectives.mlm_loss_fn)."""
  model = bert.BertForMaskedLM(cfg)
  loss_fn = objectives.mlm_loss_fn(model, sparse=bool(cfg.sparse_mlm),
                                   num_predictions=num_predictions)

  def mean_loss(params, batch, rng):
    loss_sum, _ = loss_fn(params, batch, None if deterministic else rng)
    return loss_sum / objectives.mlm_weight(batch)

  return model, jax.jit(jax.value_and_grad(mean_loss))


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


def parse_args():
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
  parser.add_argument('--impl', default='auto', choices=['auto', 'xla', 'cudnn', 'pallas', 'splash'])
  parser.add_argument('--train_mode', action='store_true',
                      help='dropout on (auto then runs the xla attention path: the fused '
                           'kernels have no attention-probability dropout)')
  parser.add_argument('--variants', default=','.join(VARIANTS))
  parser.add_argument('--scope', default='model', choices=['model', 'attention'],
                      help='model: the MLM training step; attention: one attention block')
  parser.add_argument('--out_dir', default='runs/benchmarks',
                      help='where the JSON goes (not the committed record)')
  parser.add_argument('--record', action='store_true',
                      help='write the JSON to benchmarks/results/ (the committed record)')
  args = parser.parse_args()
  for name in ('batch', 'seq_len', 'steps', 'rounds'):
    if getattr(args, name) < 1:   # --rounds=0: the summary's median of nothing, after compiling
      parser.error(f'--{name}={getattr(args, name)}: must be at least 1')
  return args


def device_label():
  device = jax.devices()[0]
  if device.platform == 'cpu':
    return f'cpu-{os.cpu_count()}core'
  return f'{device.platform}-{device.device_kind}'.replace(' ', '_').lower()


def compile_variants(args, variants, num_predictions):
  """variant -> (compiled step, its params, the compiler's FLOPs), and the shared batch."""
  compiled, batch = {}, None
  for attention in variants:
    cfg = model_config(args.size, attention)
    cfg.dtype, cfg.attention_impl = args.dtype, args.impl
    if args.scope == 'attention':
      params, batch, step = build_attention_step(cfg, args.batch, args.seq_len)
    else:
      batch = batch or make_batch(cfg, args.batch, args.seq_len, num_predictions)
      model, step = build_step(cfg, num_predictions, deterministic=not args.train_mode)
      params = nn.meta.unbox(jax.jit(model.init)(
          jax.random.key(0), batch['input_ids'], batch['token_type_ids'],
          batch['attention_mask'])['params'])
    rng = jax.random.key(1)
    # Compiled once: the executable is timed below and its FLOPs, counted by the
    # compiler, are a noise-free check on the timings (a shared CPU is noisy) and on the
    # analytic FLOP formula.
    step = step.lower(params, batch, rng).compile()
    cost = step.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = float(cost.get('flops', float('nan'))) if cost else float('nan')
    for _ in range(args.warmup):   # first runs
      jax.block_until_ready(step(params, batch, rng))
    compiled[attention] = (step, params, flops)
  return compiled, batch


def time_interleaved(compiled, batch, rounds, steps_per_round):
  """variant -> every step time, and the per-round medians; a fresh order each round, so
  no variant always runs right after another one."""
  times = {a: [] for a in compiled}
  round_medians = {a: [] for a in compiled}
  rng = jax.random.key(2)
  order_rng = np.random.default_rng(0)
  for _ in range(rounds):
    for attention in order_rng.permutation(list(compiled)):
      step, params, _ = compiled[attention]
      round_times = []
      for _ in range(steps_per_round):
        start = time.perf_counter()
        jax.block_until_ready(step(params, batch, rng))
        round_times.append(time.perf_counter() - start)
      times[attention] += round_times
      round_medians[attention].append(statistics.median(round_times))
  return times, round_medians


def model_flops_per_step(args, attention, num_predictions):
  cfg = model_config(args.size, attention)
  tokens = args.batch * args.seq_len
  if args.scope == 'attention':   # one layer's projections and scores, no MLM head
    d, head_dim = cfg.hidden_size, cfg.hidden_size // cfg.num_heads
    projections = 4 if attention == 'standard' else 3
    return tokens * 3 * (2 * projections * d * d + 4 * args.seq_len * d
                         + (2 * d * head_dim if attention == 'pairwise' else 0))
  return tokens * bert.train_flops_per_token(cfg, args.seq_len, num_predictions / args.seq_len)


def summarize(args, compiled, times, round_medians, num_predictions) -> dict:
  tokens = args.batch * args.seq_len
  baseline = statistics.median(times['standard']) if 'standard' in times else None
  results = {}
  for attention, t in times.items():
    t = np.array(t)
    median = float(np.median(t))
    flops = model_flops_per_step(args, attention, num_predictions)
    xla_flops = compiled[attention][2]
    results[attention] = dict(
        step_s_median=median, step_s_p10=float(np.percentile(t, 10)),
        step_s_p90=float(np.percentile(t, 90)), samples=len(t), tokens_per_s=tokens / median,
        ratio_to_standard=median / baseline if baseline else None,
        # Median of per-round ratios: each pairs runs seconds apart, which cancels slow
        # drift of a shared machine better than the ratio of the overall medians.
        paired_ratio_to_standard=(float(np.median(np.array(round_medians[attention])
                                                  / np.array(round_medians['standard'])))
                                  if baseline else None),
        model_tflops_per_s=flops / median / 1e12, model_gflops_per_step=flops / 1e9,
        xla_gflops_per_step=xla_flops / 1e9,
        xla_flops_ratio_to_standard=(xla_flops / compiled['standard'][2]
                                     if baseline else None))
  return results


def print_table(args, results, num_predictions, device_name):
  print(f'{args.scope}: {args.size}  batch {args.batch} x seq {args.seq_len}  predictions {num_predictions}'
        f'  dtype {jnp.dtype(bert.compute_dtype(args.dtype)).name}  impl {args.impl}  device {device_name}')
  print(f'{"variant":<10} {"step ms":>9} {"p10-p90 ms":>14} {"tokens/s":>10} {"vs std (paired)":>16}'
        f' {"model TFLOP/s":>13} {"XLA GFLOP/step":>15} {"vs standard":>12}')
  for attention, r in results.items():
    ratio = (f'{r["ratio_to_standard"]:.3f}/{r["paired_ratio_to_standard"]:.3f}x'
             if r['ratio_to_standard'] is not None else '-')
    print(f'{attention:<10} {1e3 * r["step_s_median"]:9.1f} {1e3 * r["step_s_p10"]:6.1f}-{1e3 * r["step_s_p90"]:<7.1f}'
          f' {r["tokens_per_s"]:10.0f} {ratio:>16} {r["model_tflops_per_s"]:13.3f}'
          f' {r["xla_gflops_per_step"]:15.2f} {r["xla_flops_ratio_to_standard"] or 0:11.3f}x')


def write_json(args, results, num_predictions, device_name) -> str:
  out_dir = (os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results')
             if args.record else args.out_dir)
  scope = '' if args.scope == 'model' else f'_{args.scope}'
  out = os.path.join(out_dir, f'attention_variants{scope}_{device_name}.json')
  recorded = {k: v for k, v in vars(args).items() if k not in ('out_dir', 'record')}
  files.write_atomically(out, json.dumps(dict(   # whole, or not at all; no local path
      args=recorded, device=device_name, device_kind=jax.devices()[0].device_kind,
      jax=jax.__version__, python=platform.python_version(),
      date=datetime.date.today().isoformat(), num_predictions=num_predictions,
      compute_dtype=jnp.dtype(bert.compute_dtype(args.dtype)).name, results=results),
      indent=2))
  return out


def main():
  args = parse_args()
  variants = args.variants.split(',')
  num_predictions = args.predictions or -(-args.seq_len * 15 // 100)
  device_name = device_label()
  compiled, batch = compile_variants(args, variants, num_predictions)
  times, round_medians = time_interleaved(compiled, batch, args.rounds, args.steps)
  results = summarize(args, compiled, times, round_medians, num_predictions)
  print_table(args, results, num_predictions, device_name)
  print(f'wrote {write_json(args, results, num_predictions, device_name)}')


if __name__ == '__main__':
  main()

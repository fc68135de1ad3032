"""GLUE fine-tuning of several seeds: one vmapped step (config.parallel_seeds) vs one seed
after the other, on the current device (CPU by default).

  python benchmarks/glue_seeds.py --seeds=3 --steps=60
  python benchmarks/glue_seeds.py --size=base --seq_len=128     # bert-base, on a GPU

A random encoder (default: the tests' tiny config, 2 layers, hidden 32; --size=base:
12 layers, hidden 768, 12 heads, vocab 30522, compute dtype 'auto') fine-tuned on synthetic
sentence pairs (RTE's head), through bert_sym.glue.finetune.finetune_group, the code the
command line runs. Each mode runs once to compile and once timed (the timed run reuses the
compiled steps); the rounds alternate so that load on a shared machine hits both alike.
Writes benchmarks/results/glue_seeds_<device>.json.
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

from bert_sym import files  # noqa: E402
from bert_sym import model as model_lib  # noqa: E402
from bert_sym import sharding  # noqa: E402
from bert_sym.glue import data as glue_data  # noqa: E402
from bert_sym.glue import finetune  # noqa: E402
from configs import glue as glue_config  # noqa: E402
from configs import tiny  # noqa: E402


def parse_args():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--seeds', type=int, default=3)
  parser.add_argument('--steps', type=int, default=60, help='training steps per seed')
  parser.add_argument('--batch', type=int, default=16)
  parser.add_argument('--seq_len', type=int, default=64)
  parser.add_argument('--hidden', type=int, default=32)
  parser.add_argument('--size', default='tiny', choices=['tiny', 'base'],
                      help='base: bert-base shapes; overrides --hidden')
  parser.add_argument('--rounds', type=int, default=3)
  parser.add_argument('--out', default=None)
  args = parser.parse_args()
  for name in ('seeds', 'steps', 'batch', 'seq_len', 'hidden', 'rounds'):
    if getattr(args, name) < 1:   # --rounds=0: the median of nothing, after the first runs
      parser.error(f'--{name}={getattr(args, name)}: must be at least 1')
  return args


def random_pretrained(args) -> finetune.Pretrained:
  """A randomly initialised encoder of the requested shapes, as if pre-trained."""
  train_config = tiny.get_config()
  if args.size == 'base':
    args.hidden = 768
    shapes = dict(hidden_size=768, num_heads=12, mlp_dim=3072, num_layers=12,
                  vocab_size=30522, dtype='auto')
  else:
    shapes = dict(hidden_size=args.hidden, num_heads=2, mlp_dim=2 * args.hidden,
                  num_layers=2, vocab_size=1000)
  train_config.model.update(dict(shapes, max_position_embeddings=max(64, args.seq_len)))
  encoder = nn.meta.unbox(model_lib.BertForMaskedLM(train_config.model).init(
      jax.random.key(0), *model_lib.dummy_inputs())['params'])['encoder']
  return finetune.Pretrained(train_config, jax.tree.map(np.asarray, encoder), 'tiny', 0)


def synthetic_pairs(n, seq_len, vocab_size) -> glue_data.Encoded:
  rng = np.random.default_rng(0)
  lengths = rng.integers(seq_len // 2, seq_len + 1, n)
  return glue_data.Encoded(
      input_ids=[rng.integers(104, vocab_size, k).astype(np.int32) for k in lengths],
      token_type_ids=[np.zeros(k, np.int32) for k in lengths],
      labels=rng.integers(0, 2, n).astype(np.int64), idx=np.arange(n))


def main():
  args = parse_args()
  pretrained = random_pretrained(args)
  config = glue_config.get_config()
  config.update(dict(epochs=1.0, batch_size=args.batch, max_seq_len=args.seq_len,
                     length_buckets=False, progress_bar=False, log_every_steps=args.steps,
                     checkpoint_every_steps=0))
  n = args.steps * args.batch
  train = synthetic_pairs(n, args.seq_len, pretrained.config.model.vocab_size)
  mesh = sharding.make_mesh(config.mesh)
  task = finetune.setup_task(pretrained, glue_data.TASKS['rte'], n, config, mesh,
                             sharding.logical_rules(pretrained.config))
  seeds = list(range(1, args.seeds + 1))
  modes = {'parallel': [seeds], 'sequential': [[s] for s in seeds]}

  def run(groups):
    with tempfile.TemporaryDirectory() as out:
      start = time.perf_counter()
      for group in groups:
        params = finetune.finetune_group(pretrained, task, train, config, group, mesh, 0,
                                         out, {'benchmark': True})
        jax.block_until_ready(params)
      return time.perf_counter() - start

  first = {name: run(groups) for name, groups in modes.items()}   # includes compilation
  times = {name: [] for name in modes}
  for _ in range(args.rounds):
    for name, groups in modes.items():
      times[name].append(run(groups))
  report(args, pretrained, task, first, times)


def report(args, pretrained, task, first, times):
  median = {name: statistics.median(t) for name, t in times.items()}
  speedup = median['sequential'] / median['parallel']
  device = jax.devices()[0]
  result = {
      'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
      'device': f'{device.platform}:{device.device_kind}', 'cpu_count': os.cpu_count(),
      'machine': platform.machine(), 'seeds': args.seeds, 'steps_per_seed': task.total_steps,
      'batch': args.batch, 'seq_len': args.seq_len, 'hidden': args.hidden, 'size': args.size,
      'dtype': pretrained.config.model.dtype,
      'first_run_seconds_with_compile': first, 'seconds_per_round': times,
      'median_seconds': median, 'speedup_parallel_over_sequential': speedup,
      'note': 'wall clock of finetune_group (training only, no scoring); shared machine',
  }
  print(f'{args.seeds} seeds x {task.total_steps} steps, batch {args.batch}, length '
        f'{args.seq_len}, hidden {args.hidden} ({args.size}) on {result["device"]}:')
  for name in times:
    print(f'  {name:<10} {median[name]:7.2f} s (median of {args.rounds}; first run with '
          f'compilation {first[name]:.2f} s)')
  print(f'  speed-up of parallel seeds: {speedup:.2f}x')
  path = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results',
                                  f'glue_seeds_{device.platform}.json')
  files.write_atomically(path, json.dumps(result, indent=2))   # whole, or not at all
  print(f'wrote {path}')


if __name__ == '__main__':
  main()

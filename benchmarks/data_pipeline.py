"""Input pipeline throughput, in tokens/s per host CPU core.

  python benchmarks/data_pipeline.py [--max_seq_len=512] [--batch_size=32] [--no_append]

1. raw text: the seqio task end to end (TF Text tokenisation, packing, TF masking) on
   the embedded Wikipedia corpus; tf.data uses every core, so the total is divided by
   os.cpu_count().
2. shards: `make_mlm_iterator(source='shards')` (memory-mapped blocks + NumPy masking,
   one thread), after exporting the same corpus; divided by 1 core.
Tokens are sequence positions served (max_seq_len per example). Writes
benchmarks/results/data_pipeline_<host>.json and appends a section to benchmarks/RESULTS.md.
"""

import argparse
import datetime
import json
import os
import pathlib
import platform
import shutil
import tempfile
import time

import numpy as np

from bert_sym import data as data_lib
from configs import common

RESULTS = pathlib.Path(__file__).parent / 'RESULTS.md'


def raw_text_tokens_per_s(max_seq_len: int) -> tuple[float, int]:
  import seqio  # pylint: disable=import-outside-toplevel
  from bert_sym import corpus, tasks  # pylint: disable=import-outside-toplevel
  corpus.embedded_articles()  # parse the XML dump outside the timed region
  dataset = seqio.get_mixture_or_task(tasks.EMBEDDED_TASK).get_dataset(
      sequence_length={'input_ids': max_seq_len}, split='train', shuffle=False)
  start = time.perf_counter()
  examples = sum(1 for _ in dataset.as_numpy_iterator())
  seconds = time.perf_counter() - start
  return examples * max_seq_len / seconds, examples


def shard_tokens_per_s(max_seq_len: int, batch_size: int, steps: int) -> tuple[float, str]:
  out_dir = tempfile.mkdtemp(prefix='bert_sym_bench_')
  data_lib.export_shards('bert_sym_mlm_embedded', 'train', max_seq_len, out_dir)
  config = common.base_config('base').data
  config.update(dict(source='shards', shards_dir=out_dir, max_seq_len=max_seq_len,
                     max_predictions_per_seq=max(1, int(0.15 * max_seq_len) + 4)))
  iterator = data_lib.make_mlm_iterator(config, batch_size=batch_size, split='train', seed=0,
                                        process_index=0, process_count=1)
  next(iterator)  # first epoch permutation and page-in
  start = time.perf_counter()
  for _ in range(steps):
    batch = next(iterator)
  seconds = time.perf_counter() - start
  assert batch['input_ids'].shape == (batch_size, max_seq_len)
  return steps * batch_size * max_seq_len / seconds, out_dir


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--max_seq_len', type=int, default=512)
  parser.add_argument('--batch_size', type=int, default=32)
  parser.add_argument('--steps', type=int, default=200)
  parser.add_argument('--no_append', action='store_true')
  args = parser.parse_args()
  cores = os.cpu_count() or 1

  raw, examples = raw_text_tokens_per_s(args.max_seq_len)
  shards, shards_dir = shard_tokens_per_s(args.max_seq_len, args.batch_size, args.steps)
  shutil.rmtree(shards_dir, ignore_errors=True)
  today = datetime.date.today().isoformat()
  machine = f'{cores}-core {platform.machine()} CPU ({platform.processor() or "unknown"})'
  rows = [
      ('raw text -> seqio task (tokenise + pack + TF mask)', raw, cores),
      ('exported shards -> make_mlm_iterator (NumPy mask)', shards, 1),
  ]
  lines = [f'| {name} | {tps:,.0f} | {used} | {tps / used:,.0f} |' for name, tps, used in rows]
  table = '\n'.join(['| path | tokens/s | cores used | tokens/s per core |',
                     '|---|---|---|---|'] + lines)
  print(table)
  results_dir = RESULTS.parent / 'results'
  results_dir.mkdir(exist_ok=True)
  (results_dir / f'data_pipeline_{cores}core.json').write_text(json.dumps(dict(
      date=today, machine=machine, args=vars(args), blocks=examples,
      raw_text_tokens_per_s_total=raw, raw_text_cores=cores,
      shards_tokens_per_s_one_core=shards), indent=2) + '\n')
  if not args.no_append:
    section = (
        f'\n## Input pipeline\n\n'
        f'Date {today}, machine: {machine}. '
        f'`python benchmarks/data_pipeline.py`: embedded Wikipedia (train split, '
        f'{examples} blocks), max_seq_len {args.max_seq_len}, batch {args.batch_size}, '
        f'{args.steps} timed steps. Tokens = sequence positions served.\n\n{table}\n\n'
        f'Target: >= 200k tokens/s per core from shards: '
        f'{"met" if shards >= 200_000 else "NOT met"}.\n')
    with RESULTS.open('a') as f:
      f.write(section)


if __name__ == '__main__':
  main()

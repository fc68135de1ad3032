"""Input pipeline throughput, in tokens/s per host CPU core.

  python benchmarks/data_pipeline.py [--max_seq_len=512] [--batch_size=32] [--out_dir=DIR]
                                     [--record]

1. raw text: what the trainer reads with source='seqio': the registered task's documents
   (embedded Wikipedia), tokenised and packed once (TF Text), then one epoch masked in the
   iterator (NumPy); TF uses every core, so the total is divided by os.cpu_count().
2. shards: `make_mlm_iterator(source='shards')` (memory-mapped blocks + NumPy masking,
   one thread), after exporting the same corpus; divided by 1 core.
3. streaming: `make_mlm_iterator(source='streaming')` (bert_sym/input/shard_reader.py: range reads
   + Feistel shuffle + NumPy masking, `batch(k)` called in one thread, no read-ahead) on
   the same corpus exported with `python -m bert_sym.shards export`, read from a
   local path (os.pread) and through fsspec's file:// (the code path gs:// takes), and on
   a synthetic 51M-token corpus (100k blocks of 512) so that reads are spread over 100 MB.
Tokens are sequence positions served (max_seq_len per example). Writes
data_pipeline_<cores>core.json and data_pipeline.md into --out_dir (default runs/benchmarks);
--record writes the JSON to benchmarks/results/ and puts the section, newest first, under
the "Input pipeline" heading of benchmarks/RESULTS.md instead (the committed record).
"""

import argparse
import datetime
import json
import os
import pathlib
import platform
import shutil
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))

from bert_sym import files  # pylint: disable=g-import-not-at-top
from bert_sym.input import shard_writer as export_lib
from bert_sym.input import iterator as data_lib
from configs import common

RESULTS = pathlib.Path(__file__).parent / 'RESULTS.md'


def raw_text_tokens_per_s(max_seq_len: int, batch_size: int) -> tuple[float, int]:
  """The trainer's source='seqio' path, from text: the registered task's documents
  (seqio_tasks.task_documents) tokenised and packed (TF Text), then one epoch of batches
  masked by the iterator (NumPy), as `bert_sym.train` reads them."""
  from bert_sym.input import seqio_tasks, sources  # pylint: disable=import-outside-toplevel
  sources.embedded_articles()  # parse the XML dump outside the timed region
  config = common.base_config('base').data
  config.update(dict(source='seqio', task=seqio_tasks.EMBEDDED_TASK, max_seq_len=max_seq_len,
                     max_predictions_per_seq=max(1, int(0.15 * max_seq_len) + 4)))
  start = time.perf_counter()   # packing happens once per process: this one's first call
  iterator = data_lib.make_mlm_iterator(config, batch_size=batch_size, split='train', seed=0,
                                        process_index=0, process_count=1,
                                        documents=seqio_tasks.task_documents)
  steps = max(1, iterator.num_blocks // batch_size)
  for _ in range(steps):
    batch = next(iterator)
  seconds = time.perf_counter() - start
  assert batch['input_ids'].shape == (batch_size, max_seq_len)
  return steps * batch_size * max_seq_len / seconds, iterator.num_blocks


def shard_tokens_per_s(max_seq_len: int, batch_size: int, steps: int) -> tuple[float, str]:
  out_dir = tempfile.mkdtemp(prefix='bert_sym_bench_')
  export_lib.export('bert_sym_mlm_embedded', 'train', max_seq_len, out_dir, num_parts=1)
  config = common.base_config('base').data
  config.update(dict(source='shards', shards_dir=out_dir, task='bert_sym_mlm_embedded',
                     max_seq_len=max_seq_len,
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


def streaming_tokens_per_s(url: str, task: str, max_seq_len: int, batch_size: int,
                           steps: int) -> float:
  config = common.base_config('base').data
  config.update(dict(source='streaming', shards_dir=url, task=task, max_seq_len=max_seq_len,
                     max_predictions_per_seq=max(1, int(0.15 * max_seq_len) + 4)))
  iterator = data_lib.make_mlm_iterator(config, batch_size=batch_size, split='train', seed=0,
                                        process_index=0, process_count=1)
  iterator.batch(0)   # opens shards, reads headers
  start = time.perf_counter()
  for step in range(1, steps + 1):
    batch = iterator.batch(step)
  seconds = time.perf_counter() - start
  assert batch['input_ids'].shape == (batch_size, max_seq_len)
  return steps * batch_size * max_seq_len / seconds


def synthetic_streaming_corpus(out_dir: str, num_blocks: int, max_seq_len: int) -> str:
  from bert_sym.input import tokenizer as vocab_lib  # pylint: disable=import-outside-toplevel
  vocab_path = vocab_lib.default_vocab_file()
  tokens = vocab_lib.read_vocab(vocab_path)
  special = vocab_lib.special_ids(tokens, vocab_path).as_dict()
  split_url = os.path.join(out_dir, 'train')
  export_lib.write_vocab(split_url, vocab_lib.read_vocab_bytes(vocab_path))
  writer = export_lib.PartWriter(split_url, 0, 1, max_seq_len=max_seq_len, dtype=np.uint16,
                                 pad_id=0)
  rng = np.random.default_rng(0)
  for start in range(0, num_blocks, 4096):
    blocks = rng.integers(1000, len(tokens), (min(4096, num_blocks - start), max_seq_len),
                          dtype=np.uint16)
    blocks[:, 0], blocks[:, -1] = special['cls'], special['sep']
    writer.add(blocks)
  writer.close(task='synthetic', split='train', vocab_md5=vocab_lib.BERT_BASE_UNCASED_MD5,
               vocab_size=len(tokens), special_ids=special)
  export_lib.finalize(out_dir, 'train')
  return out_dir


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--max_seq_len', type=int, default=512)
  parser.add_argument('--batch_size', type=int, default=32)
  parser.add_argument('--steps', type=int, default=200)
  parser.add_argument('--out_dir', default='runs/benchmarks',
                      help='where the JSON and the Markdown section go (not the record)')
  parser.add_argument('--record', action='store_true',
                      help='update the committed record: benchmarks/results/ and RESULTS.md')
  args = parser.parse_args()
  cores = os.cpu_count() or 1

  rows, examples = measure(args, cores)
  write(args, rows, examples, cores)


def measure(args, cores):
  """(name, tokens/s, cores used) of every path, and the corpus's block count."""
  raw, examples = raw_text_tokens_per_s(args.max_seq_len, args.batch_size)
  shards, shards_dir = shard_tokens_per_s(args.max_seq_len, args.batch_size, args.steps)
  shutil.rmtree(shards_dir, ignore_errors=True)
  stream_dir = tempfile.mkdtemp(prefix='bert_sym_bench_stream_')
  export_lib.export('bert_sym_mlm_embedded', 'train', args.max_seq_len, stream_dir)
  stream_args = (args.max_seq_len, args.batch_size, args.steps)
  stream_local = streaming_tokens_per_s(stream_dir, 'bert_sym_mlm_embedded', *stream_args)
  stream_fsspec = streaming_tokens_per_s(f'file://{stream_dir}', 'bert_sym_mlm_embedded',
                                         *stream_args)
  shutil.rmtree(stream_dir, ignore_errors=True)
  synthetic_dir = synthetic_streaming_corpus(
      tempfile.mkdtemp(prefix='bert_sym_bench_51m_'), 100_000, args.max_seq_len)
  stream_51m = streaming_tokens_per_s(f'file://{synthetic_dir}', 'synthetic', *stream_args)
  shutil.rmtree(synthetic_dir, ignore_errors=True)
  return [
      ('raw text -> task documents (tokenise + pack) -> iterator (mask)', raw, cores),
      ('exported shards -> make_mlm_iterator (NumPy mask)', shards, 1),
      ('streaming, local path (pread + Feistel + NumPy mask)', stream_local, 1),
      ('streaming, file:// via fsspec (the gs:// code path)', stream_fsspec, 1),
      ('streaming, file://, synthetic 51M-token corpus', stream_51m, 1),
  ], examples


def write(args, rows, examples, cores):
  """Prints the table; writes the JSON and the Markdown section (see the docstring)."""
  today = datetime.date.today().isoformat()
  machine = f'{cores}-core {platform.machine()} CPU ({platform.processor() or "unknown"})'
  raw, shards, stream_local, stream_fsspec, stream_51m = (tps for _, tps, _ in rows)
  lines = [f'| {name} | {tps:,.0f} | {used} | {tps / used:,.0f} |' for name, tps, used in rows]
  table = '\n'.join(['| path | tokens/s | cores used | tokens/s per core |',
                     '|---|---|---|---|'] + lines)
  print(table)
  results_dir = RESULTS.parent / 'results' if args.record else pathlib.Path(args.out_dir)
  results_dir.mkdir(parents=True, exist_ok=True)
  json_path = results_dir / f'data_pipeline_{cores}core.json'
  recorded = {k: v for k, v in vars(args).items() if k not in ('out_dir', 'record')}
  files.write_atomically(json_path, json.dumps(dict(   # whole, or not at all; no local path
      date=today, machine=machine, args=recorded, blocks=examples,
      raw_text_tokens_per_s_total=raw, raw_text_cores=cores,
      shards_tokens_per_s_one_core=shards,
      streaming_local_tokens_per_s_one_core=stream_local,
      streaming_fsspec_tokens_per_s_one_core=stream_fsspec,
      streaming_fsspec_51m_tokens_per_s_one_core=stream_51m), indent=2) + '\n')
  measured = (
      f'Date {today}, machine: {machine}. '
      f'`python benchmarks/data_pipeline.py`: embedded Wikipedia (train split, '
      f'{examples} blocks), max_seq_len {args.max_seq_len}, batch {args.batch_size}, '
      f'{args.steps} timed steps. Tokens = sequence positions served.\n\n{table}\n\n'
      f'Target: >= 200k tokens/s per core from shards: '
      f'{"met" if shards >= 200_000 else "NOT met"}; from the streaming format: '
      f'{"met" if min(stream_local, stream_fsspec, stream_51m) >= 200_000 else "NOT met"}.'
      '\n')
  if not args.record:
    markdown = results_dir / 'data_pipeline.md'
    files.write_atomically(markdown, f'## Input pipeline\n\n{measured}')
  else:   # newest first under the one heading (appended, it made a second one), after
    # the section's preface (its notes on the records below), the rest kept
    markdown, heading = RESULTS, '## Input pipeline\n\n'
    text, entry = RESULTS.read_text(), f'### Recorded {today}\n\n{measured}\n'
    if heading not in text:
      text = text.rstrip('\n') + '\n\n' + heading + entry
    else:
      head, section = text.split(heading, 1)
      end = section.find('\n## ')
      at = section.find('### ', 0, None if end < 0 else end)
      at = at if at >= 0 else (len(section) if end < 0 else end + 1)
      preface = section[:at].rstrip('\n') + '\n\n' if section[:at].strip() else ''
      text = head + heading + preface + entry + section[at:]
    files.write_atomically(markdown, text)
  print(f'wrote {json_path} and {markdown}')


if __name__ == '__main__':
  main()

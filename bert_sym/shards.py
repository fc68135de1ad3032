"""`python -m bert_sym.shards export|finalize`: corpus -> shards, the command line of
`bert_sym.input.shard_writer` (see there). The shards serve config.data.source='streaming' (local
or gs://, any size) and 'shards' (local, memory-mapped).
"""

from __future__ import annotations

import argparse
import sys

from bert_sym import cli
from bert_sym import metrics_writer
from bert_sym.input import shard_writer as export_lib
from bert_sym.input import sources
from bert_sym.input.shard_reader import join_url

PROG = 'bert_sym.shards'
# finalize's exit while parts of other workers are missing: a launcher waits on this one
# and stops on 1 (an error: waiting would never end).
PARTS_MISSING_EXIT_CODE = 3


def main(argv: list[str] | None = None) -> int:
  """Runs the command; a user error is one `bert_sym.shards: error:` line, exit 1."""
  argv = cli.expand_home(sys.argv[1:] if argv is None else argv)   # --out_dir=~/x
  with cli.guard(PROG, help_argv=['', *argv]):
    return _main(argv)


def _main(argv: list[str]) -> int:
  parser = cli.ArgumentParser(prog='python -m bert_sym.shards')
  commands = parser.add_subparsers(dest='command', required=True)
  with_defaults = {'formatter_class': argparse.ArgumentDefaultsHelpFormatter}
  required = {'required': True, 'default': argparse.SUPPRESS}   # no '(default: None)'
  ex = commands.add_parser('export', help="convert this worker's parts of a task to shards",
                           **with_defaults)
  ex.add_argument('--task', **required, help='the seqio task, e.g. bert_sym_mlm_c4')
  ex.add_argument('--split', default='train,validation', help='comma-separated splits')
  ex.add_argument('--max_seq_len', type=int, default=512,
                  help='tokens per block: the config.data.max_seq_len the shards serve')
  ex.add_argument('--out_dir', **required, help='local directory or gs://bucket/path')
  ex.add_argument('--num_workers', type=int, default=1,
                  help='machines exporting together, each its share of the parts')
  ex.add_argument('--worker_index', type=int, default=0,
                  help='this machine, 0 .. num_workers-1')
  ex.add_argument('--num_parts', type=int, default=0,
                  help='0 = one per TFDS source file (1 for text files); must be the same '
                       'for every worker')
  ex.add_argument('--tfds_data_dir', default='', help='where `tfds build` wrote the data')
  ex.add_argument('--vocab_path', default='',
                  help="WordPiece vocab.txt ('' = bert-base-uncased, as the trainer)")
  ex.add_argument('--text_files', default='', help='globs for bert_sym_mlm_text_files')
  ex.add_argument('--validation_files', default='',
                  help="its validation split's globs, as config.data.validation_files "
                       "('' = every 100th document of --text_files held out)")
  ex.add_argument('--blocks_per_shard', type=int, default=1 << 16,
                  help='blocks of max_seq_len tokens per .npy file')
  fin = commands.add_parser('finalize', help='write metadata.json once all parts exist; '
                                             f'exit {PARTS_MISSING_EXIT_CODE} while some '
                                             'are missing (1: an error)', **with_defaults)
  fin.add_argument('--out_dir', **required, help='the export\'s --out_dir')
  fin.add_argument('--split', default='train,validation', help='comma-separated splits')
  fin.add_argument('--stalled_after_minutes', type=float, default=0,
                   help='parts missing and nothing written for this long is an error (1), '
                        'not a wait (3): a worker killed without a word (0 = wait forever)')
  args = parser.parse_args(argv)
  if not args.out_dir.strip():   # --out_dir=$OUT with OUT unset: join_url made it /train
    raise cli.UserError('--out_dir is empty. Fix: --out_dir=DIR (local or gs://bucket/path).')
  splits = export_lib.check_splits(args.split)
  if args.command == 'export':   # checked before TF imports (seconds) and anything is written
    export_lib.check_export_args(args.task, args.max_seq_len, args.num_workers,
                                 args.worker_index, args.num_parts, args.blocks_per_shard,
                                 args.text_files, args.validation_files)
  # TF's native start-up lines ('failed call to cuInit', oneDNN) would bury the two result
  # lines; quiet_logs imports TF with them muted.
  metrics_writer.quiet_logs(verbose=False, import_tf=args.command == 'export')
  missing = []
  for split in splits:
    if args.command == 'export':
      metadata = export_lib.export(
          args.task, split, args.max_seq_len, args.out_dir, num_parts=args.num_parts,
          num_workers=args.num_workers, worker_index=args.worker_index,
          vocab_path=args.vocab_path,
          # Recorded absolute, so that the trainer can tell them from other files.
          text_files=','.join(sources.absolute_patterns(args.text_files)),
          validation_files=','.join(sources.absolute_patterns(args.validation_files)),
          tfds_data_dir=args.tfds_data_dir, blocks_per_shard=args.blocks_per_shard)
    else:
      metadata = export_lib.finalize(args.out_dir, split, args.stalled_after_minutes)
    if metadata is None:
      missing.append(split)
      print(f'{join_url(args.out_dir, split)}: parts still missing (other workers); '
            'metadata.json is written when the last one finishes.')
    else:
      print(f'{join_url(args.out_dir, split)}: complete, {metadata["num_blocks"]} blocks, '
            f'{metadata["num_tokens"]} tokens')
  return PARTS_MISSING_EXIT_CODE if (missing and args.command == 'finalize') else 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))

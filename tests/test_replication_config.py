"""configs/replication.py: the seqio route and the shard route evaluate on the same text, and
an eval never reads a validation block twice."""

import numpy as np
import pytest

from bert_sym import shards as export_cli
from bert_sym import train
from bert_sym.input import iterator as data_lib
from bert_sym.input import seqio_tasks
from bert_sym.input import tokenizer as vocab_lib
from configs import replication

TRAIN_TEXT = ' = Apples = \n\n' + ''.join(
    f' The orchard grew apples and pears in row {i} , and the farmers sold them . \n'
    for i in range(300))
VALID_TEXT = ' = Zebras = \n\n' + ''.join(
    f' A zebra crossed the river near camp {i} while the guide watched . \n'
    for i in range(40))


def _all_blocks(data_config, split, documents=None):
  blocks = data_lib.load_blocks(data_config, split, documents)
  return np.asarray(blocks.take(np.arange(len(blocks))))


@pytest.fixture(scope='module')
def wikitext_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp('wikitext')
  (root / 'wiki.train.tokens').write_text(TRAIN_TEXT)
  (root / 'wiki.valid.tokens').write_text(VALID_TEXT)
  return root


def _export(wikitext_dir, out_dir, *extra):
  code = export_cli.main(['export', '--task=bert_sym_mlm_text_files', '--max_seq_len=64',
                          '--split=validation', f'--out_dir={out_dir}',
                          f'--text_files={wikitext_dir / "wiki.train.tokens"}', *extra])
  assert code == 0


def test_shard_and_seqio_routes_evaluate_on_the_same_text(wikitext_dir, tmp_path):
  config = replication.get_config(str(wikitext_dir))
  # The seqio route as the trainer reads it: the registered task's documents.
  seqio_blocks = _all_blocks(config.data, 'validation', seqio_tasks.task_documents)
  _export(wikitext_dir, tmp_path / 'shards',
          f'--validation_files={config.data.validation_files}')
  shards = config.data.copy_and_resolve_references()
  shards.update(source='shards', shards_dir=str(tmp_path / 'shards'))
  np.testing.assert_array_equal(_all_blocks(shards, 'validation'), seqio_blocks)
  # ... and that text is wiki.valid.tokens, not documents held out of wiki.train.tokens.
  tokens = vocab_lib.read_vocab(vocab_lib.default_vocab_file())
  assert tokens.index('zebra') in seqio_blocks and tokens.index('apples') not in seqio_blocks
  # Without --validation_files the export holds other text (what the flag fixes).
  _export(wikitext_dir, tmp_path / 'held_out')
  shards.shards_dir = str(tmp_path / 'held_out')
  held_out = _all_blocks(shards, 'validation')
  assert tokens.index('zebra') not in held_out


def test_eval_reads_each_validation_block_at_most_once():
  config = replication.get_config()
  lines = []
  assert train.eval_batch_count(4216, config, lines.append) == 256 and not lines
  assert train.eval_batch_count(100, config, lines.append) == 6     # 100 // 16
  assert 'eval reads 6 batches, not config.eval_steps=256' in lines[0]
  assert train.eval_batch_count(10, config, lines.append) == 1
  assert 'some blocks count twice' in lines[1]
  assert train.eval_batch_count(None, config, lines.append) == 256   # size unknown

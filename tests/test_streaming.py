"""bert_sym.input.shard_reader (+ export, iterator): the input path for corpora of any size.

Corpora are written straight into the shard format (random token blocks, as the export
writes them), so a 50M-token corpus costs seconds, not a TF tokenisation. gs:// is stood
in for by file:// and memory:// URLs, which take the same fsspec code path (range reads
through `fs.cat_ranges`) as gcsfs; plain local paths use os.pread.
"""

import errno
import json
import logging
import os
import pathlib
import re
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time

import ml_collections
import numpy as np
import pytest

from bert_sym import cli
from bert_sym import shards as streaming_cli
from bert_sym.input import DataError, is_storage_error
from bert_sym.input import shard_writer as export_lib
from bert_sym.input import iterator as data_lib
from bert_sym.input import masking
from bert_sym.input import shard_reader
from bert_sym.input import sources
from bert_sym.input import tokenizer as vocab_lib
from configs import common
from tests.train_fixtures import REPO_ROOT, built_once, coordinator_address, cpu_devices_flags
from tests.train_fixtures import run_trainer

TASK = 'synthetic_test'


def write_corpus(url, num_blocks, max_seq_len, *, splits=('train', 'validation'),
                 num_parts=2, blocks_per_shard=1000, seed=0, task=TASK, draw_ids=None):
  """A corpus of random WordPiece ids in the export's format; returns the train metadata.
  Uniform ids unless `draw_ids(rng, shape)` draws them (uniform ids leave a model nothing
  to learn: tests/ablate_fixtures.py draws a Zipf law)."""
  vocab_path = vocab_lib.default_vocab_file()
  tokens = vocab_lib.read_vocab(vocab_path)
  special = vocab_lib.special_ids(tokens, vocab_path).as_dict()
  rng = np.random.default_rng(seed)
  for split in splits:
    split_url = shard_reader.join_url(url, split)
    export_lib.write_vocab(split_url, vocab_lib.read_vocab_bytes(vocab_path))
    per_part = np.diff(np.linspace(0, num_blocks, num_parts + 1).astype(int))
    for part, count in enumerate(per_part):
      writer = export_lib.PartWriter(split_url, part, num_parts, max_seq_len=max_seq_len,
                                     dtype=np.uint16, pad_id=0,
                                     blocks_per_shard=blocks_per_shard)
      for start in range(0, count, 4096):    # bounded memory while writing, too
        n = min(4096, count - start)
        blocks = (rng.integers(1000, len(tokens), (n, max_seq_len), dtype=np.uint16)
                  if draw_ids is None else draw_ids(rng, (n, max_seq_len)).astype(np.uint16))
        blocks[:, 0], blocks[:, -1] = special['cls'], special['sep']
        blocks[:, -1 - rng.integers(0, 8)] = 0    # some padding
        writer.add(blocks)
      writer.close(task=task, split=split, vocab_md5=vocab_lib.BERT_BASE_UNCASED_MD5,
                   vocab_size=len(tokens), special_ids=special)
    export_lib.finalize(url, split)
  return shard_reader.read_metadata(url, 'train')


def _config(shards_dir, max_seq_len=64, **overrides):
  config = common.base_config('tiny').data
  config.update(dict(source='streaming', shards_dir=str(shards_dir), task=TASK,
                     max_seq_len=max_seq_len,
                     max_predictions_per_seq=max(1, max_seq_len * 15 // 100 + 1)))
  config.update(overrides)
  return config


def _iterator(config, split='train', batch_size=8, seed=3, **kwargs):
  kwargs.setdefault('process_index', 0)
  kwargs.setdefault('process_count', 1)
  return data_lib.make_mlm_iterator(config, batch_size=batch_size, split=split, seed=seed,
                                    **kwargs)


def _assert_same(a, b):
  for k in masking.FEATURES:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.fixture(scope='module')
def small_corpus(tmp_path_factory):
  root = tmp_path_factory.mktemp('small')
  write_corpus(str(root), 1000, 64, num_parts=3, blocks_per_shard=150)
  return root


# ----------------------------------------------------------------------------------------
# The shuffle.
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize('n', [1, 2, 3, 17, 1000, 4097, 100_003])
def test_feistel_is_a_bijection_of_every_size(n):
  p = data_lib.feistel_permutation(np.arange(n), n, seed=5, epoch=0)
  np.testing.assert_array_equal(np.sort(p), np.arange(n))
  if n >= 17:
    assert not np.array_equal(p, np.arange(n))
    assert not np.array_equal(p, data_lib.feistel_permutation(np.arange(n), n, 5, 1))
    assert not np.array_equal(p, data_lib.feistel_permutation(np.arange(n), n, 6, 0))
    # Per index: any slice of the indices gives the same slice of the permutation.
    np.testing.assert_array_equal(
        data_lib.feistel_permutation(np.arange(n // 3, n // 2), n, 5, 0), p[n // 3:n // 2])


def test_feistel_mixes_like_a_random_permutation():
  n = 100_003
  p = data_lib.feistel_permutation(np.arange(n), n, seed=0, epoch=0)
  # Neighbours land far apart, and position predicts nothing about the block.
  assert abs(np.corrcoef(np.arange(n), p)[0, 1]) < 0.02
  assert np.median(np.abs(np.diff(p))) > n / 5
  # Fixed points of a random permutation: Poisson(1).
  assert (p == np.arange(n)).sum() < 8
  # Huge corpora: no array of the corpus's size is built (a billion blocks, 4 indices).
  big = data_lib.feistel_permutation(np.array([0, 1, 2, 10**9 - 1]), 10**9, 0, 7)
  assert len(set(big.tolist())) == 4 and (big < 10**9).all()


# ----------------------------------------------------------------------------------------
# Reading: every filesystem gives the same blocks and batches; same as the shards path.
# ----------------------------------------------------------------------------------------

def test_the_feistel_v1_order_is_pinned():
  """Checkpoints record the order's name (SHUFFLE_KIND) and resume into it by index: any
  change of its salt or round keys must come with a new name, or a resumed run reads some
  blocks twice and others never. Values as feistel-v1 first wrote them."""
  assert data_lib.SHUFFLE_KIND == 'feistel-v1'
  order = lambda n, seed, epoch, count: data_lib.feistel_permutation(
      np.arange(count), n, seed, epoch).tolist()
  assert order(20, 0, 0, 20) == [19, 0, 18, 1, 10, 17, 4, 8, 16, 9, 3, 6, 2, 5, 13, 15, 11,
                                 7, 14, 12]
  assert order(20, 0, 1, 20) == [6, 18, 19, 17, 10, 4, 3, 8, 13, 1, 11, 5, 12, 15, 14, 2, 9,
                                 7, 0, 16]
  assert order(1000, 7, 3, 10) == [75, 86, 551, 695, 101, 240, 434, 731, 709, 648]


def test_blocks_are_the_exported_arrays_on_every_filesystem(small_corpus):
  metadata = shard_reader.read_metadata(str(small_corpus), 'train')
  assert len(metadata['shards']) > 3   # several shards per part
  truth = np.concatenate([np.load(small_corpus / 'train' / s['file'])
                          for s in metadata['shards']])
  assert metadata['num_parts'] == 3   # the parts' token counts add up (pad id 0)
  assert metadata['num_tokens'] == np.count_nonzero(truth != 0)
  memory_url = 'memory://streaming-test/corpus'
  for split in ('train', 'validation'):   # a copy in memory:// (the remote code path)
    for f in (small_corpus / split).iterdir():
      fs, path = shard_reader.filesystem(f'{memory_url}/{split}/{f.name}')
      fs.pipe_file(path, f.read_bytes())
  rows = np.array([999, 0, 5, 6, 7, 149, 150, 151, 500, 5, 998])
  for url in (str(small_corpus), f'file://{small_corpus}', memory_url):
    blocks = shard_reader.StreamingBlocks(url, 'train')
    assert len(blocks) == 1000 and blocks.num_tokens == metadata['num_tokens']
    np.testing.assert_array_equal(blocks.take(rows), truth[rows])
    np.testing.assert_array_equal(blocks.take(np.arange(1000)), truth)
    batches = [next(it) for it in [_iterator(_config(url), start_step=7)] for _ in range(3)]
    if url == str(small_corpus):   # and memory-mapped (source='shards'): every row, each
      mapped = shard_reader.load_shards(url, 'train')   # shard's first and last included
      np.testing.assert_array_equal(mapped.take(np.arange(1000)), truth)
      np.testing.assert_array_equal(mapped.take(rows), truth[rows])
    reference = _iterator(_config(str(small_corpus)), start_step=7)
    for batch in batches:
      _assert_same(batch, next(reference))


def test_validation_equals_the_shards_path(small_corpus):
  """Same files read by source='shards' (mmap) and 'streaming': identical masked batches."""
  shards = _config(str(small_corpus), source='shards')
  stream = _config(str(small_corpus))
  a = _iterator(shards, split='validation', batch_size=16, start_step=2)
  b = _iterator(stream, split='validation', batch_size=16, start_step=2)
  for _ in range(4):
    _assert_same(next(a), next(b))


def test_same_seed_same_batches_resume_and_epochs(small_corpus):
  config = _config(str(small_corpus))
  run = _iterator(config, batch_size=10)
  batches = [next(run) for _ in range(205)]   # 2 epochs of 100 steps, and 5 more
  again = _iterator(config, batch_size=10)
  _assert_same(batches[0], next(again))
  other = next(_iterator(config, batch_size=10, seed=4))
  assert not np.array_equal(other['input_ids'], batches[0]['input_ids'])
  # Resume from a saved state (O(1): nothing is replayed) and from start_step.
  resumed = _iterator(config, batch_size=10)
  resumed.set_state(json.loads(json.dumps(run.get_state())))
  assert resumed.get_state()['step'] == 205
  _assert_same(next(resumed), next(run))
  _assert_same(next(_iterator(config, batch_size=10, start_step=150)), batches[150])
  # Each epoch reads every block exactly once, in a new order.
  blocks = shard_reader.StreamingBlocks(str(small_corpus), 'train')
  spec_rows = lambda step: run._rows(np.arange(step * 10, step * 10 + 10))  # pylint: disable=protected-access
  epoch0 = np.concatenate([spec_rows(s) for s in range(100)])
  epoch1 = np.concatenate([spec_rows(s) for s in range(100, 200)])
  np.testing.assert_array_equal(np.sort(epoch0), np.arange(len(blocks)))
  np.testing.assert_array_equal(np.sort(epoch1), np.arange(len(blocks)))
  assert not np.array_equal(epoch0, epoch1)
  # Masking is a function of the example, not of the block (RoBERTa's dynamic masking):
  # a block read again in the next epoch gets other masked positions.
  block = int(epoch0[0])
  again = int(np.flatnonzero(epoch1 == block)[0]) + 1000   # its example index in epoch 1
  first_weights = batches[0]['mlm_weights'][0]
  second_weights = batches[again // 10]['mlm_weights'][again % 10]
  np.testing.assert_array_equal(batches[0]['mlm_targets'][0][first_weights > 0],
                                blocks.take(np.array([block]))[0][first_weights > 0])
  assert not np.array_equal(first_weights, second_weights)


def test_a_streaming_checkpoint_resumes_on_shards_as_if_uninterrupted(small_corpus):
  """One epoch order for every source: a run checkpointed while streaming continues on
  the same files memory-mapped (source='shards') with exactly the batches it would have
  read, across an epoch boundary (1000 blocks = 100 steps of 10)."""
  stream, shards = _config(str(small_corpus)), _config(str(small_corpus), source='shards')
  uninterrupted = _iterator(stream, batch_size=10)
  expected = [next(uninterrupted) for _ in range(110)]
  first = _iterator(stream, batch_size=10)
  for _ in range(95):
    next(first)
  resumed = _iterator(shards, batch_size=10)
  resumed.set_state(json.loads(json.dumps(first.get_state())))
  for step in range(95, 110):
    _assert_same(next(resumed), expected[step])


def test_resuming_on_another_corpus_or_order_is_a_readable_error(small_corpus, tmp_path):
  state = _iterator(_config(str(small_corpus))).get_state()
  assert state['shuffle'] == data_lib.SHUFFLE_KIND and state['max_seq_len'] == 64
  old_shards_state = {k: v for k, v in state.items() if k != 'shuffle'}   # argsort era
  with pytest.raises(DataError, match='older bert_sym that shuffled.*new --workdir'):
    _iterator(_config(str(small_corpus), source='shards')).set_state(old_shards_state)
  longer = tmp_path / 'longer'
  write_corpus(str(longer), 1000, 128, num_parts=1)
  with pytest.raises(DataError, match='max_seq_len=64.*another corpus'):
    _iterator(_config(str(longer), max_seq_len=128)).set_state(state)
  with pytest.raises(DataError, match="shuffle='none'.*another block order"):
    _iterator(_config(str(small_corpus))).set_state(dict(state, shuffle='none'))
  # Another config.seed is another permutation (the trainer only warns that the config
  # changed), another vocabulary another corpus: both refused, not resumed into.
  with pytest.raises(DataError, match=r"seed=3, this run has 4 \(another order\)"):
    _iterator(_config(str(small_corpus)), seed=4).set_state(state)
  with pytest.raises(DataError, match=r"vocab_md5='0+'.*another vocabulary"):
    _iterator(_config(str(small_corpus))).set_state(dict(state, vocab_md5='0' * 32))


@pytest.mark.parametrize('source', ['streaming', 'shards'])
def test_out_of_vocabulary_ids_stop_at_the_first_read_naming_shard_and_block(
    small_corpus, tmp_path, source):
  damaged = tmp_path / 'damaged'
  shutil.copytree(small_corpus, damaged)
  shard = shard_reader.read_metadata(str(damaged), 'train')['shards'][1]
  array = np.load(damaged / 'train' / shard['file'], mmap_mode='r+')
  array[7, 3] = 40000   # not block 0, which start-up checks
  array.flush()
  del array
  iterator = _iterator(_config(str(damaged), source=source), batch_size=1000)  # opens fine
  with pytest.raises(DataError, match=f'{shard["file"]}: block 7 holds token id 40000, '
                     'outside the vocabulary of 30522'):
    next(iterator)


def test_start_up_checks_every_shards_first_block_and_dtype_on_every_filesystem(tmp_path):
  """Before the first step, on local and remote (file://, memory://) paths alike: a shard
  whose block 0 is outside the vocabulary, or whose dtype is not the export's, is refused
  by name. Blocks of 4096 tokens put the bad id past the first 4 KiB, which hold the
  header (a remote check that read only those would find it hours into the run)."""
  for name, message in (('oov', 'block 0 holds token id 65535'),
                        ('dtype', r'array \(2, 4096\) int16.*belongs to another export')):
    damaged = tmp_path / name
    train = write_corpus(str(damaged), 6, 4096, splits=('train',), num_parts=1,
                         blocks_per_shard=2)['shards']
    array = np.load(damaged / 'train' / train[1]['file'])
    if name == 'oov':
      array[0, 4000] = 65535
    else:   # the same bytes a block, so only the header's dtype tells
      array = array.astype(np.int16)
    np.save(damaged / 'train' / train[1]['file'], array)
    memory_url = f'memory://streaming-test/start-up-{name}'
    for f in (damaged / 'train').iterdir():
      fs, path = shard_reader.filesystem(f'{memory_url}/train/{f.name}')
      fs.pipe_file(path, f.read_bytes())
    for url in (str(damaged), f'file://{damaged}', memory_url):
      with pytest.raises(DataError, match=f'{train[1]["file"]}.*{message}'):
        shard_reader.StreamingBlocks(url, 'train')


def test_a_split_of_empty_shards_is_refused_when_opened(tmp_path):
  """A metadata.json edited to list only empty shards (headers and sizes consistent) was an
  IndexError at the first batch, after the compile; now both sources refuse it at open."""
  write_corpus(str(tmp_path), 4, 64, splits=('train',), num_parts=1, blocks_per_shard=2)
  meta_path = tmp_path / 'train' / shard_reader.METADATA_FILE
  meta = json.loads(meta_path.read_text())
  for shard in meta['shards']:
    np.save(tmp_path / 'train' / shard['file'], np.zeros((0, 64), np.uint16))
    shard['num_blocks'] = 0
  meta['num_blocks'] = meta['num_tokens'] = 0
  meta_path.write_text(json.dumps(meta))
  for source in ('streaming', 'shards'):
    with pytest.raises(DataError, match=r'train holds no blocks \(its metadata.json lists '
                       'only empty shards\); re-export'):
      shard_reader.open_blocks(_config(tmp_path, source=source), 'train')


def test_a_negative_id_in_an_int32_shard_is_out_of_vocabulary_too():
  """Vocabularies over 65,536 ids are stored as int32, where damage can read as a negative
  id; only ids >= vocab_size were caught, and a negative one reached the embedding lookup."""
  from bert_sym.input import blocks  # pylint: disable=g-import-not-at-top
  rows = np.full((4, 8), 5, np.int32)
  rows[2, 6] = -17
  assert blocks.first_out_of_vocabulary(rows, 100_000) == 2
  assert 'holds token id -17, outside' in str(
      blocks.out_of_vocabulary_error('part-0.npy', 2, rows[2], 100_000))
  rows[1, 0] = 100_000
  assert blocks.first_out_of_vocabulary(rows, 100_000) == 1
  assert blocks.first_out_of_vocabulary(np.full((2, 8), 5, np.int32), 100_000) is None


def test_hosts_read_disjoint_rows_of_the_global_batch(small_corpus):
  config = _config(str(small_corpus))
  whole = _iterator(config, batch_size=12, start_step=3)
  parts = [_iterator(config, batch_size=4, start_step=3, process_index=p, process_count=3)
           for p in range(3)]
  for _ in range(2):
    expected = next(whole)
    got = [next(p) for p in parts]
    for k in masking.FEATURES:
      np.testing.assert_array_equal(np.concatenate([g[k] for g in got]), expected[k])


def test_resume_checks(small_corpus, tmp_path):
  config = _config(str(small_corpus))
  state = _iterator(config).get_state()
  with pytest.raises(DataError, match='global batch'):
    _iterator(config, batch_size=4).set_state(state)
  with pytest.raises(DataError, match='shuffle'):   # a checkpoint of another source
    _iterator(config).set_state({k: v for k, v in state.items() if k != 'shuffle'})
  other = tmp_path / 'other'
  write_corpus(str(other), 999, 64, num_parts=1)
  with pytest.raises(DataError, match='num_blocks'):
    _iterator(_config(str(other))).set_state(state)


def test_errors_name_the_problem_and_the_fix(small_corpus, tmp_path):
  with pytest.raises(DataError, match=r'(?s)shards_dir is not set.*shards export'
                     r'.*configs/tiny\.py'):
    _iterator(_config(''))
  with pytest.raises(DataError, match=r'(?s)train/metadata\.json cannot be read.*'
                     r'shards export'):
    _iterator(_config(str(tmp_path / 'absent')))
  for source in ('streaming', 'shards'):   # another corpus must not train under this name
    with pytest.raises(DataError, match='holds task .synthetic_test.'):
      _iterator(_config(str(small_corpus), task='bert_sym_mlm_c4', source=source))
  with pytest.raises(DataError, match='64-token blocks.*max_seq_len=32'):
    _iterator(_config(str(small_corpus), max_seq_len=32))
  broken = tmp_path / 'broken'
  shutil.copytree(small_corpus, broken)
  first = shard_reader.read_metadata(str(broken), 'train')['shards'][0]['file']
  np.save(broken / 'train' / first, np.zeros((3, 64), np.uint16))
  next(_iterator(_config(str(broken)), split='validation'))   # validation is intact
  with pytest.raises(DataError, match=f'{first}: array \\(3, 64\\)'):
    shard_reader.StreamingBlocks(str(broken), 'train').take(np.array([0]))
  assert shard_reader.BERT_BASE_UNCASED_MD5 == vocab_lib.BERT_BASE_UNCASED_MD5


@pytest.mark.parametrize('key, message', [('format_version', 'shard format None'),
                                          ('task', 'holds task None'),
                                          ('whole', 'holds a JSON list, not an object')])
def test_metadata_without_its_format_or_task_is_refused(small_corpus, tmp_path, key, message):
  """A hand-made or foreign metadata.json (no format version, no task) is not read as if
  it were this export's."""
  edited = tmp_path / 'edited'
  shutil.copytree(small_corpus, edited)
  path = edited / 'train' / shard_reader.METADATA_FILE
  metadata = json.loads(path.read_text())
  if key == 'whole':   # valid JSON that is not an object: was an AttributeError traceback
    metadata = [metadata]
  else:
    del metadata[key]
  path.write_text(json.dumps(metadata))
  for source in ('streaming', 'shards'):
    with pytest.raises(DataError, match=message):
      _iterator(_config(str(edited), source=source))


_EDITS = {
    'no vocab_size': lambda m: m.pop('vocab_size'),
    'no shards': lambda m: m.pop('shards'),
    'shards null': lambda m: m.update(shards=None),
    'dtype bogus': lambda m: m.update(dtype='bogus'),
    'shard without file': lambda m: m['shards'][1].pop('file'),
    'shard file a directory': lambda m: m['shards'][0].update(file='.'),
    'special_ids without mask': lambda m: m['special_ids'].pop('mask'),
    'special id outside the vocabulary': lambda m: m['special_ids'].update(mask=10**6),
    'max_seq_len a string': lambda m: m.update(max_seq_len='64'),
}


@pytest.mark.parametrize('edit', list(_EDITS))
def test_a_metadata_json_missing_or_retyping_a_field_is_refused_in_one_line(small_corpus,
                                                                            tmp_path, edit):
  """Any other field that the readers use, dropped or retyped by a hand edit (or a damaged
  copy), was a KeyError, TypeError or IsADirectoryError traceback naming no file."""
  edited = tmp_path / 'edited'
  shutil.copytree(small_corpus, edited)
  path = edited / 'train' / shard_reader.METADATA_FILE
  metadata = json.loads(path.read_text())
  _EDITS[edit](metadata)
  path.write_text(json.dumps(metadata))
  for source in ('streaming', 'shards'):
    with pytest.raises(DataError, match=re.escape(f'{path}: ') + '.* re-export the split'):
      _iterator(_config(str(edited), source=source))


def test_a_split_copied_without_its_vocabulary_says_so(small_corpus, tmp_path):
  """`gsutil cp '*.npy' metadata.json` leaves vocab.txt behind: that was a raw
  FileNotFoundError, which the command line words as 'check the path given on the command
  line' (the path given is fine)."""
  local = tmp_path / 'copied'
  shutil.copytree(small_corpus, local, ignore=shutil.ignore_patterns('vocab.txt'))
  memory_url = 'memory://streaming-test/copied-without-vocab'
  for f in (small_corpus / 'train').iterdir():
    if f.name != 'vocab.txt':
      fs, path = shard_reader.filesystem(f'{memory_url}/train/{f.name}')
      fs.pipe_file(path, f.read_bytes())
  for url, source in ((str(local), 'shards'), (str(local), 'streaming'),
                      (memory_url, 'streaming')):
    with pytest.raises(DataError) as error:
      _iterator(_config(url, source=source))
    message = cli.user_error_message(error.value)
    assert message.startswith(f'{url}/train/vocab.txt: the split has no vocab.txt'), message
    assert 'copy the whole split again' in message and 're-export' in message, message


def test_a_failed_range_read_raises_the_storage_error(tmp_path, monkeypatch):
  """fsspec's cat_ranges returns a failed read's exception in place of its bytes unless
  told to raise: the storage error (a 503 after gcsfs's retries, expired credentials) must
  reach the user, not a TypeError from joining an exception into the batch's bytes."""
  import fsspec  # pylint: disable=g-import-not-at-top
  url = f'memory://failing_reads_{tmp_path.name}'
  write_corpus(url, 100, 64, splits=('train',), num_parts=1)
  blocks = shard_reader.StreamingBlocks(url, 'train')

  memory_fs = type(fsspec.filesystem('memory'))
  read = memory_fs.cat_file

  def failing_read(self, path, start=None, end=None, **kwargs):   # the shards only
    if str(path).endswith('.npy'):
      raise OSError(5, 'simulated storage error (503 after retries)')
    return read(self, path, start=start, end=end, **kwargs)
  monkeypatch.setattr(memory_fs, 'cat_file', failing_read)
  with pytest.raises(OSError, match='simulated storage error'):
    blocks.take(np.array([0, 5]))
  with pytest.raises(OSError, match='simulated storage error'):
    shard_reader.StreamingBlocks(url, 'train')   # the shard headers, read when opening


def test_a_storage_error_mid_run_is_one_line_and_keeps_the_position(tmp_path, monkeypatch):
  """A read that fails mid-run once gcsfs's retries are spent (HttpError 503, no
  OSError) was a traceback: now one line naming the split and that a rerun resumes; the
  iterator has not moved past the batch it could not read."""
  import fsspec  # pylint: disable=g-import-not-at-top
  from gcsfs.retry import HttpError  # pylint: disable=g-import-not-at-top
  url = f'memory://failing_mid_run_{tmp_path.name}'
  write_corpus(url, 100, 64, splits=('train',), num_parts=1)
  iterator = _iterator(_config(url))
  expected = iterator.batch(1)
  next(iterator)
  memory_fs = type(fsspec.filesystem('memory'))
  read = memory_fs.cat_file
  monkeypatch.setattr(memory_fs, 'cat_file', lambda *a, **k: (_ for _ in ()).throw(
      HttpError({'code': 503, 'message': 'Service Unavailable'})))
  with pytest.raises(DataError) as error:
    next(iterator)
  message = cli.user_error_message(error.value)
  assert message.startswith(f'{url}/train cannot be read (HttpError: Service Unavailable, '
                            '503)'), message
  assert 'rerun the same command' in message and 'last checkpoint' in message, message
  assert iterator.get_state()['step'] == 1
  monkeypatch.setattr(memory_fs, 'cat_file', read)
  _assert_same(next(iterator), expected)


def test_a_local_read_error_mid_run_is_worded_only_when_it_is_the_storages(small_corpus,
                                                                           monkeypatch):
  """EIO from a disk is one line naming the split (no object store's "client retries");
  EBADF is a bug of the reader, and stays a traceback instead of blaming the storage."""
  iterator = _iterator(_config(str(small_corpus)))
  def fail_with(code):
    monkeypatch.setattr(os, 'pread', lambda *a: (_ for _ in ()).throw(OSError(code, 'x')))
  fail_with(errno.EBADF)
  with pytest.raises(OSError) as error:
    next(iterator)
  assert not isinstance(error.value, DataError)
  fail_with(errno.EIO)
  with pytest.raises(DataError) as error:
    next(iterator)
  message = cli.user_error_message(error.value)
  assert message.startswith(f'{small_corpus}/train cannot be read (OSError: [Errno 5] x); '
                            'the storage refused or failed the read. Fix:'), message


def test_a_shard_deleted_mid_run_is_said_to_be_gone_not_a_wrong_path(tmp_path):
  """A shard deleted (or moved) after start-up was worded by the command line as a path
  given wrong ("check the path given on the command line"): the path was right."""
  url = f'memory://deleted_mid_run_{tmp_path.name}'
  write_corpus(url, 100, 64, splits=('train',), num_parts=1)
  iterator = _iterator(_config(url))
  first = shard_reader.read_metadata(url, 'train')['shards'][0]['file']
  fs, path = shard_reader.filesystem(shard_reader.join_url(url, 'train', first))
  fs.rm(path)
  with pytest.raises(DataError) as error:
    next(iterator)
  message = cli.user_error_message(error.value)
  assert message.startswith(f'{url}/train cannot be read (FileNotFoundError: '), message
  assert ('a file the run read at start-up is gone or no longer readable' in message
          and 'copy the split again' in message and 'check the path' not in message), message
  assert iterator.get_state()['step'] == 0


@pytest.mark.parametrize('where', ['local', 'memory'])
def test_a_shard_truncated_mid_run_is_named_not_a_reshape_error(tmp_path, where):
  """A shard cut short after the start-up check (a copy or export into the same place)
  reads short: that was numpy's 'cannot reshape array of size ...', naming no file."""
  url = (str(tmp_path / 'corpus') if where == 'local'
         else f'memory://truncated_mid_run_{tmp_path.name}')
  write_corpus(url, 100, 64, splits=('train',), num_parts=1)
  iterator = _iterator(_config(url), batch_size=100)   # reads every block, so every shard
  first = shard_reader.read_metadata(url, 'train')['shards'][0]['file']
  fs, path = shard_reader.filesystem(shard_reader.join_url(url, 'train', first))
  fs.pipe_file(path, fs.cat_file(path)[:-64 * 2 * 10])   # its last ten blocks gone
  with pytest.raises(DataError, match=f'{first}: read .* bytes .* truncated or replaced '
                     'since the run started.*re-export.*resumes'):
    next(iterator)
  assert iterator.get_state()['step'] == 0


def test_a_failed_metadata_read_is_not_called_a_missing_corpus(tmp_path, monkeypatch):
  import fsspec  # pylint: disable=g-import-not-at-top
  url = f'memory://failing_metadata_{tmp_path.name}'
  write_corpus(url, 100, 64, splits=('train',), num_parts=1)
  monkeypatch.setattr(type(fsspec.filesystem('memory')), 'cat_file',
                      lambda *a, **k: (_ for _ in ()).throw(PermissionError(13, 'denied')))
  with pytest.raises(DataError) as error:
    shard_reader.StreamingBlocks(url, 'train')
  assert 'metadata.json cannot be read (PermissionError' in str(error.value)
  assert 'the storage did not answer or refused the read' in str(error.value)
  assert 'not prepared' not in str(error.value)


def test_a_metadata_read_past_the_timeout_names_a_retrying_client_too(tmp_path, monkeypatch):
  """gcsfs retries a 503 for about 30 s, past the start-up's few seconds: the timeout said
  only 'unreachable, or no credentials' for a bucket that was reachable and readable."""
  import fsspec  # pylint: disable=g-import-not-at-top
  url = f'memory://slow_metadata_{tmp_path.name}'
  write_corpus(url, 100, 64, splits=('train',), num_parts=1)
  released = threading.Event()
  monkeypatch.setattr(type(fsspec.filesystem('memory')), 'cat_file',
                      lambda *a, **k: released.wait(10))
  monkeypatch.setattr(shard_reader, 'METADATA_TIMEOUT_S', 1.0)
  try:
    with pytest.raises(DataError) as error:
      shard_reader.StreamingBlocks(url, 'train')
  finally:
    released.set()
  assert ('metadata.json cannot be read (TimeoutError: no answer within 1 s (unreachable, no '
          'credentials, or retrying))' in str(error.value)), error.value
  assert 'the storage did not answer or refused the read' in str(error.value)


def test_a_lost_connection_mid_run_is_the_storages_and_a_scheme_typo_is_not(tmp_path,
                                                                            monkeypatch):
  """aiohttp's connection errors are OSErrors with errnos of their own (a DNS failure: -2,
  -3), which gcsfs passes on once its retries are spent: the storage's, in one line. A
  ValueError counts only when an object store's client raised it: fsspec's 'Protocol not
  known' (a typo in the URL) is not the storage refusing a read."""
  import socket  # pylint: disable=g-import-not-at-top
  import fsspec  # pylint: disable=g-import-not-at-top
  url = f'memory://lost_connection_{tmp_path.name}'
  write_corpus(url, 100, 64, splits=('train',), num_parts=1)
  iterator = _iterator(_config(url))
  monkeypatch.setattr(type(fsspec.filesystem('memory')), 'cat_file', lambda *a, **k: (
      _ for _ in ()).throw(socket.gaierror(-2, 'Name or service not known')))
  with pytest.raises(DataError, match=r'/train cannot be read \(gaierror: \[Errno -2\] Name '):
    next(iterator)
  with pytest.raises(ValueError) as typo:
    fsspec.filesystem('gcs2')
  assert not is_storage_error(typo.value)


def test_a_bad_request_refused_by_gcsfs_is_not_called_a_missing_corpus(tmp_path, monkeypatch):
  """gcsfs raises ValueError for a 400 (a requester-pays bucket, an invalid request):
  read as 'not what an export writes', it sent the user to export a corpus that is there."""
  import fsspec  # pylint: disable=g-import-not-at-top
  from gcsfs import retry  # pylint: disable=g-import-not-at-top
  url = f'memory://bad_request_{tmp_path.name}'
  write_corpus(url, 100, 64, splits=('train',), num_parts=1)
  monkeypatch.setattr(type(fsspec.filesystem('memory')), 'cat_file',
                      lambda self, path, *a, **k: retry.validate_response(
                          400, b'{"error": {"message": "invalid argument"}}', path))
  with pytest.raises(DataError) as error:
    shard_reader.read_metadata(url, 'train')
  assert 'metadata.json cannot be read (ValueError: Bad Request' in str(error.value)
  assert 'the storage did not answer or refused the read' in str(error.value)


@pytest.mark.parametrize('failing', ['exists', 'vocab.txt', 'ls', '.npy'])
def test_gcsfs_errors_at_start_up_are_one_line_naming_the_data(tmp_path, monkeypatch, failing):
  """gcsfs raises HttpError (not an OSError) for a 401 without credentials or a 503 once
  its retries are spent: reading metadata.json, vocab.txt, the listing or the shard
  headers, that was a traceback the command line could not word."""
  import fsspec  # pylint: disable=g-import-not-at-top
  from gcsfs.retry import HttpError  # pylint: disable=g-import-not-at-top
  url = f'memory://gcsfs_errors_{tmp_path.name}'
  write_corpus(url, 100, 64, splits=('train',), num_parts=1)
  memory_fs = type(fsspec.filesystem('memory'))
  error = HttpError({'code': 401, 'message': 'Anonymous caller does not have '
                                             'storage.objects.get access'})
  original = getattr(memory_fs, 'cat_file' if '.' in failing else failing)

  def fail(self, path, *args, **kwargs):
    if '.' not in failing or str(path).endswith(failing):
      raise error
    return original(self, path, *args, **kwargs)
  monkeypatch.setattr(memory_fs, 'cat_file' if '.' in failing else failing, fail)
  with pytest.raises(DataError) as raised:
    _iterator(_config(url))
  message = cli.user_error_message(raised.value)
  assert f'{url}/train' in message and 'Anonymous caller' in message and 'Fix:' in message


def test_a_bug_while_reading_the_metadata_is_not_called_a_storage_failure(tmp_path,
                                                                          monkeypatch):
  """The metadata read words storage errors (gcsfs's too); an error of our own code stays
  a traceback instead of sending the user to check credentials or re-export."""
  url = f'memory://metadata_bug_{tmp_path.name}'
  write_corpus(url, 100, 64, splits=('train',), num_parts=1)
  monkeypatch.setattr(shard_reader, 'read_bytes', lambda url: None)   # json.loads(None)
  with pytest.raises(TypeError):
    shard_reader.read_metadata(url, 'train')


def test_a_machine_limit_while_opening_shards_keeps_its_own_fix(small_corpus, monkeypatch):
  """Only storage errors are worded as such: too many open files says to raise ulimit."""
  monkeypatch.setattr(np, 'load', lambda *a, **k: (_ for _ in ()).throw(
      OSError(errno.EMFILE, 'Too many open files')))
  with pytest.raises(OSError) as error:
    _iterator(_config(str(small_corpus), source='shards'))
  assert 'raise the limit (ulimit -n)' in cli.user_error_message(error.value)


def test_a_shard_copied_after_a_failed_start_is_seen_despite_a_cached_listing(tmp_path,
                                                                           monkeypatch):
  """gcsfs caches directory listings per process: a notebook whose start failed on a shard
  not yet copied, rerun once the copy is done, listed the directory from that cache and
  found it missing again. The start-up check lists afresh."""
  import fsspec  # pylint: disable=g-import-not-at-top
  url = f'memory://listing_cache_{tmp_path.name}'
  write_corpus(url, 100, 64, splits=('train',), num_parts=1)
  memory_fs = type(fsspec.filesystem('memory'))
  ls, listings = memory_fs.ls, {}

  def cached_ls(self, path, detail=True, **kwargs):   # as gcsfs's dircache
    key = (self._strip_protocol(path), detail)   # pylint: disable=protected-access
    if key not in listings:
      listings[key] = ls(self, path, detail=detail, **kwargs)
    return listings[key]
  monkeypatch.setattr(memory_fs, 'ls', cached_ls)
  monkeypatch.setattr(memory_fs, 'invalidate_cache', lambda self, path=None: listings.clear())
  fs, root = shard_reader.filesystem(f'{url}/train')
  shard = f'{root}/{shard_reader.read_metadata(url, "train")["shards"][0]["file"]}'
  copied = fs.cat_file(shard)
  fs.rm(shard)   # not copied yet
  with pytest.raises(DataError, match='is missing'):
    shard_reader.StreamingBlocks(url, 'train')
  fs.pipe_file(shard, copied)   # copied by another process: this one's cache knows nothing
  assert shard_reader.StreamingBlocks(url, 'train').take(np.array([0])).shape[0] == 1


def test_describe_corpus_counts_epochs_and_warns(small_corpus, caplog):
  iterator = _iterator(_config(str(small_corpus)))
  config = common.base_config('tiny')
  config.data = _config(str(small_corpus))
  config.batch_size, config.total_steps = 32, 16   # 512 of 1000 blocks
  lines = data_lib.describe_corpus(iterator, config)
  tokens = shard_reader.read_metadata(str(small_corpus), 'train')['num_tokens']
  assert len(lines) == 1 and f'{tokens:,} tokens in 1,000 blocks of 64' in lines[0]
  assert '0.51 epochs' in lines[0]
  config.total_steps = 400   # 12.8 epochs
  with caplog.at_level(logging.WARNING):
    lines = data_lib.describe_corpus(iterator, config)
  assert '12.80 epochs' in lines[0] and len(lines) == 2 and 'WARNING' in lines[1]
  assert 'memorise' not in caplog.text   # the console line only: it was printed twice
  # A table larger than the data's vocabulary (a small custom vocab.txt under bert-base's
  # 30,522 rows) trained silently: an initial loss of ln(30,522) and counts that include
  # rows no id reaches. Padding the table to a multiple of 128 is not warned about.
  config.total_steps = 16
  config.model.vocab_size = 30522 + 127
  assert len(data_lib.describe_corpus(iterator, config)) == 1
  config.model.vocab_size = 30522 + 128
  lines = data_lib.describe_corpus(iterator, config)
  assert len(lines) == 2 and lines[1].startswith(
      'WARNING: config.model.vocab_size=30650, but the data vocabulary has 30,522 tokens: 128 '
      'rows'), lines
  assert ('Fix (a new run; a checkpoint keeps its table): --config.model.vocab_size=30522 '
          '(or padded to a multiple of 128)') in lines[1]


def test_streaming_path_runs_without_tensorflow(small_corpus):
  script = textwrap.dedent(f"""
      import sys
      for name in ('tensorflow', 'tensorflow_text', 'seqio', 'tensorflow_datasets'):
        sys.modules[name] = None  # any import of them now raises ImportError
      from bert_sym.input import iterator as data
      from tests.test_streaming import _config, _iterator
      for url in ({str(small_corpus)!r}, {'file://' + str(small_corpus)!r}):
        batch = next(_iterator(_config(url)))
        assert batch['input_ids'].shape == (8, 64)
        assert data.vocab_size(_config(url)) == 30522
      assert not [m for m in sys.modules if m.startswith('tensorflow') and sys.modules[m]]
      print('ok')
  """)
  result = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True,
                          cwd=REPO_ROOT, timeout=120, env=dict(os.environ, PYTHONPATH=REPO_ROOT))
  assert result.returncode == 0 and 'ok' in result.stdout, result.stderr[-2000:]


_OPEN_FILES_SCRIPT = """
import gc, os, resource, sys
from bert_sym.input import DataError, is_storage_error
from tests.test_streaming import _config, _iterator
url, soft, hard = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
def shard_files():   # descriptors open on the corpus's files
  return [fd for fd in os.listdir('/proc/self/fd')
          if os.path.realpath(f'/proc/self/fd/{fd}').startswith(os.path.realpath(url))]
for source in ('streaming', 'shards'):
  try:
    iterator = _iterator(_config(url, max_seq_len=16, source=source), batch_size=64)
    for _ in range(40):   # 2,560 examples: the first 1,500 (an epoch) read every shard
      next(iterator)
    print(source, 'read', 'open', len(shard_files()))
    del iterator
    gc.collect()
    print(source + '_dropped', len(shard_files()))   # an iterator let go keeps none open
  except DataError as e:
    print(source, 'DataError', e)
"""


def test_a_corpus_of_more_shards_than_the_open_files_limit(tmp_path):
  """1,500 shards, a limit of 512 open files (the usual one is 1,024; C4 exports 1,024
  parts or more). Streaming read every shard with a descriptor kept open each and died
  with EMFILE (a traceback) past the limit; it now keeps MAX_OPEN_SHARDS open. 'shards'
  maps every shard (a descriptor each): it raises the soft limit up to the hard one, and
  where the hard limit is too low says so in one line, naming source 'streaming'."""
  write_corpus(str(tmp_path), 1500, 16, splits=('train',), num_parts=1, blocks_per_shard=1)

  def run(soft, hard):
    result = subprocess.run([sys.executable, '-c', _OPEN_FILES_SCRIPT, str(tmp_path),
                             str(soft), str(hard)], capture_output=True, text=True,
                            cwd=REPO_ROOT, timeout=300, env=dict(os.environ, PYTHONPATH=REPO_ROOT))
    assert result.returncode == 0, result.stderr[-3000:]
    return dict(line.split(' ', 1) for line in result.stdout.splitlines())

  import resource  # pylint: disable=g-import-not-at-top
  hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
  if hard != resource.RLIM_INFINITY and hard < 1500 + 1024:
    pytest.skip(f'this machine allows {hard} open files, too few to map 1,500 shards')
  lines = run(512, hard)
  assert lines['shards'].startswith('read'), lines
  # The README's "at most 64 shard files open at once", counted on the corpus's own files.
  assert 0 < int(lines['streaming'].split()[2]) <= shard_reader.MAX_OPEN_SHARDS == 64, lines
  assert lines['streaming_dropped'] == '0', lines   # a notebook reopening splits ran out
  lines = run(512, 512)
  assert lines['streaming'].startswith('read'), lines
  assert lines['shards'].startswith('DataError') and '1500 shards' in lines['shards'], lines
  assert 'at most 512 files' in lines['shards'], lines
  assert '--config.data.source=streaming' in lines['shards'], lines


# ----------------------------------------------------------------------------------------
# Memory: a 50M-token corpus streams in the memory of a 1M-token one.
# ----------------------------------------------------------------------------------------

_RSS_SCRIPT = """
import sys
for name in ('tensorflow', 'tensorflow_text', 'seqio', 'tensorflow_datasets'):
  sys.modules[name] = None   # a training host's footprint: no TF
import numpy as np, psutil
from tests.test_streaming import _config, _iterator
url, batches = sys.argv[1], int(sys.argv[2])
iterator = _iterator(_config(url, max_seq_len=512), batch_size=32)
steps_per_epoch = iterator.num_blocks // 32
checksum = 0
for i in range(batches):   # spread over the whole corpus (and into the second epoch)
  iterator.set_state(dict(iterator.get_state(), step=i * (2 * steps_per_epoch) // batches))
  checksum += int(next(iterator)['input_ids'].sum())
# Peak: VmHWM of this address space (ru_maxrss would carry the parent's peak over exec).
status = open('/proc/self/status').read()
peak = int(status.split('VmHWM:')[1].split()[0]) * 1024
print(psutil.Process().memory_info().rss, peak, iterator.num_blocks, checksum)
"""


def test_rss_of_a_50m_token_corpus_is_that_of_a_1m_token_one(tmp_path):
  sizes = {'1M': 2_000, '50M': 100_000}   # blocks of 512 tokens: 1.0M and 51.2M tokens
  rss = {}
  for name, blocks in sizes.items():
    url = f'file://{tmp_path / name}'   # the gs:// code path (fsspec range reads)
    write_corpus(url, blocks, 512, splits=('train',), num_parts=4,
                 blocks_per_shard=1 << 14)
    result = subprocess.run([sys.executable, '-c', _RSS_SCRIPT, url, '300'],
                            capture_output=True, text=True, cwd=REPO_ROOT, timeout=300,
                            env=dict(os.environ, PYTHONPATH=REPO_ROOT))
    assert result.returncode == 0, result.stderr[-3000:]
    current, peak, num_blocks, _ = map(int, result.stdout.split())
    assert num_blocks == blocks
    rss[name] = (current, peak)
  print(f'RSS after 300 batches x 32 x 512 spread over the corpus: '
        f'1M tokens {rss["1M"][0] / 2**20:.0f} MiB (peak {rss["1M"][1] / 2**20:.0f}), '
        f'50M tokens {rss["50M"][0] / 2**20:.0f} MiB (peak {rss["50M"][1] / 2**20:.0f})')
  corpus_bytes = sizes['50M'] * 512 * 2   # 100 MiB on disk: loading or mapping it would show
  assert rss['50M'][1] - rss['1M'][1] < corpus_bytes / 4
  assert rss['50M'][0] - rss['1M'][0] < corpus_bytes / 4


# ----------------------------------------------------------------------------------------
# Export: parallel, resumable, 2 workers == 1 worker.
# ----------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def text_files(tmp_path_factory):
  """Three text files, written once per session (xdist workers share them: the exports
  built from them record their pattern). Read-only."""
  def build(root):
    root.mkdir(parents=True)
    docs = [t.replace('\n', ' ') for t in sources.embedded_documents('train')[:12]]
    for i in range(3):
      (root / f'part-{i}.txt').write_text('\n'.join(docs[i::3]) + '\n', encoding='utf-8')
  return str(built_once(tmp_path_factory, 'streaming_text_files', build) / 'part-*.txt')


def _export(out, text_files, **kwargs):
  return export_lib.export(sources.TEXT_FILES_TASK, 'train', 64, str(out),
                           text_files=text_files, num_parts=3, blocks_per_shard=40, **kwargs)


@pytest.fixture(scope='module')
def one_worker_export(tmp_path_factory, text_files):
  """(out_dir, what export returned) of `_export(out_dir, text_files)`, one worker, every
  part: a seqio/TF tokenisation, run once per session for the tests that only read it.
  Read-only: copy it to change it."""
  def build(path):
    metadata = _export(path / 'export', text_files)
    (path / 'returned.json').write_text(json.dumps(metadata))
  path = built_once(tmp_path_factory, 'streaming_one_worker_export', build)
  return path / 'export', json.loads((path / 'returned.json').read_text())


def test_a_failed_worker_stops_the_others_waiting_for_its_parts(tmp_path, text_files,
                                                                monkeypatch):
  """On a pod every worker exports its parts, then waits in `finalize` (exit 3) for the
  others'. A worker whose export raised left the rest waiting forever on a paid slice; it
  now leaves a marker, and finalize on the others stops (exit 1) naming it and its error,
  until its rerun (which keeps the parts already exported) clears it."""
  from bert_sym.input import seqio_tasks  # pylint: disable=g-import-not-at-top
  packed_blocks = seqio_tasks.packed_blocks

  def part_1_fails(task, split, max_seq_len, vocabulary, part, num_parts):
    if part == 1:
      raise OSError(28, 'No space left on device')
    return packed_blocks(task, split, max_seq_len, vocabulary, part, num_parts)
  monkeypatch.setattr(seqio_tasks, 'packed_blocks', part_1_fails)
  with pytest.raises(OSError):
    _export(tmp_path, text_files, num_workers=2, worker_index=1)
  with pytest.raises(DataError, match=r'the export of worker 1 failed \(OSError: \[Errno 28\] '
                     r'No space left on device\), so its parts will not come'):
    _export(tmp_path, text_files, num_workers=2, worker_index=0)
  _quiet(monkeypatch)
  finalize = ['finalize', f'--out_dir={tmp_path}', '--split=train']
  with pytest.raises(SystemExit) as stopped:
    streaming_cli.main(finalize)
  assert stopped.value.code == 1
  monkeypatch.setattr(seqio_tasks, 'packed_blocks', packed_blocks)
  # What a SIGKILL in the middle of writing part 1 leaves: temporary copies, which the
  # rerun left beside the shards for good (a whole shard each).
  stale = ['.part-00001-00000.npy.tmp-0123abcd', '.part-00001.json.tmp-4567cdef']
  for name in stale:
    (tmp_path / 'train' / name).write_bytes(b'partial')
  assert _export(tmp_path, text_files, num_workers=2, worker_index=1) is not None
  assert not [name for name in stale if (tmp_path / 'train' / name).exists()]
  assert streaming_cli.main(finalize) == 0
  assert not list((tmp_path / 'train').glob('*.failed'))
  # A marker whose parts were written after all (the export rerun with another
  # --num_workers, which has no such worker to clear it) no longer stops anything.
  (tmp_path / 'train' / 'worker-00003.failed').write_text('OSError: [Errno 28]')
  (tmp_path / 'train' / 'metadata.json').unlink()
  assert streaming_cli.main(finalize) == 0


def test_finalize_gives_up_on_parts_nothing_has_written_for_too_long(tmp_path, text_files,
                                                                      monkeypatch, capsys):
  """Worker 1 of 2 was killed (SIGKILL, preemption) before its part 1: it left no failure
  marker, and the others would wait for part 1 forever. With --stalled_after_minutes,
  finalize waits (exit 3) while files keep coming, then stops (exit 1) naming the part."""
  _export(tmp_path, text_files, num_workers=2, worker_index=0)   # parts 0 and 2
  _quiet(monkeypatch)
  finalize = ['finalize', f'--out_dir={tmp_path}', '--split=train',
              '--stalled_after_minutes=30']
  assert streaming_cli.main(finalize) == streaming_cli.PARTS_MISSING_EXIT_CODE
  an_hour_ago = time.time() - 3600
  for path in (tmp_path / 'train').iterdir():
    os.utime(path, (an_hour_ago, an_hour_ago))
  with pytest.raises(SystemExit) as stopped:
    streaming_cli.main(finalize)
  assert stopped.value.code == 1
  error = capsys.readouterr().err
  assert 'parts 1 of 3 still missing, and nothing was written there for 60 minutes' in error
  assert 'rerun the export on those workers' in error
  assert streaming_cli.main(finalize[:-1]) == 3   # without it: waits, as before


def test_finalize_of_a_directory_with_no_export_is_an_error_not_a_wait(tmp_path, monkeypatch,
                                                                       capsys):
  """A mistyped --out_dir used to exit 3, "parts still missing (other workers)": a launcher
  waiting on that would wait forever."""
  _quiet(monkeypatch)
  with pytest.raises(SystemExit) as stopped:
    streaming_cli.main(['finalize', f'--out_dir={tmp_path / "typo"}'])
  assert stopped.value.code == 1
  assert f'{tmp_path / "typo"}/train: nothing exported there' in capsys.readouterr().err


def test_text_file_shards_are_accepted_by_a_config_naming_the_same_files(one_worker_export,
                                                                         text_files):
  """The export records its files, so the trainer accepts them (the refusal of other files
  is test_text_file_shards_of_other_files_are_refused_by_name)."""
  out_dir, _ = one_worker_export
  metadata = json.loads((out_dir / 'train' / 'metadata.json').read_text())
  assert metadata['text_files'] == text_files
  config = ml_collections.ConfigDict(dict(task=sources.TEXT_FILES_TASK,
                                          text_files=text_files, validation_files=''))
  sources.check_exported_files(metadata, config, str(out_dir / 'train'))


def test_a_part_manifest_counts_its_blocks_not_its_shards(one_worker_export):
  out_dir, _ = one_worker_export
  manifests = list((out_dir / 'train').glob('part-?????.json'))
  assert len(manifests) == 3
  for path in manifests:
    manifest = json.loads(path.read_text())
    assert len(manifest['shards']) > 1
    assert manifest['num_blocks'] == sum(s['num_blocks'] for s in manifest['shards'])


def test_a_rerun_with_other_validation_files_is_refused(tmp_path, text_files):
  """Not skipped as "already exported": the old parts hold another training split."""
  train = text_files.replace('part-*', 'part-[01]')
  validation = text_files.replace('part-*', 'part-2')
  assert _export(tmp_path, train, validation_files=validation) is not None
  with pytest.raises(DataError, match='holds an export with validation_files='):
    _export(tmp_path, train)


def test_a_rerun_after_the_files_changed_is_refused_not_reported_complete(tmp_path):
  """A file added under the same glob: the rerun skipped the finished part and said
  'complete' with the old blocks, the new file's text left out without a word."""
  corpus = tmp_path / 'corpus'
  corpus.mkdir()
  for name in ('a', 'b'):
    (corpus / f'{name}.txt').write_text(f'Some text of file {name}.\n' * 3, encoding='utf-8')
  pattern = str(corpus / '*.txt')
  first = _export(tmp_path / 'out', pattern)
  assert _export(tmp_path / 'out', pattern) == first   # unchanged: the rerun skips it all
  (corpus / 'c.txt').write_text('A file added later.\n' * 50, encoding='utf-8')
  with pytest.raises(DataError, match=r'was exported from 2 files, .* now matches 3 files'):
    _export(tmp_path / 'out', pattern)
  assert _export(tmp_path / 'new', pattern)['num_tokens'] > first['num_tokens']
  # A part written by the version before manifests recorded the files (an export begun
  # there, finished here) is not compared: finalize refused the mix.
  split = tmp_path / 'out' / 'train'
  (split / 'metadata.json').unlink()   # the parts as the last worker finds them
  older = json.loads((split / 'part-00000.json').read_text())
  del older['source_files']
  (split / 'part-00000.json').write_text(json.dumps(older))
  assert export_lib.finalize(str(tmp_path / 'out'), 'train') == first
  # ... while two parts that both recorded their files are still compared with each other.
  other = json.loads((split / 'part-00002.json').read_text())
  other['source_files'] = '3 files, 1,000 bytes, md5 000000000000'
  (split / 'part-00002.json').write_text(json.dumps(other))
  (split / 'metadata.json').unlink()
  with pytest.raises(DataError, match=r"part 2 has source_files='3 files.*, part 1 has "):
    export_lib.finalize(str(tmp_path / 'out'), 'train')


@pytest.mark.parametrize('task, flag', [('bert_sym_mlm_embedded', '--text_files'),
                                        ('bert_sym_mlm_c4', '--validation_files')])
def test_export_refuses_text_files_its_task_would_ignore(tmp_path, capsys, task, flag):
  """The embedded corpus was exported in their place, exit 0 (the trainer refuses the
  same combination)."""
  with pytest.raises(SystemExit) as exited:
    streaming_cli.main(['export', f'--task={task}', f'{flag}={tmp_path}/*.txt',
                        f'--out_dir={tmp_path / "out"}', '--max_seq_len=64'])
  assert exited.value.code == cli.EXIT_USER_ERROR
  assert capsys.readouterr().err == (
      f'bert_sym.shards: error: {flag} is set but --task={task}, which does not read it. '
      f'Fix: --task={sources.TEXT_FILES_TASK}, or drop {flag}.\n')
  assert not (tmp_path / 'out').exists()


@pytest.mark.parametrize('worker_index', [-1, 2])
def test_export_refuses_a_worker_index_outside_the_workers(tmp_path, text_files, worker_index):
  with pytest.raises(DataError, match='worker_index'):
    _export(tmp_path, text_files, num_workers=2, worker_index=worker_index)


def test_a_worker_exports_only_its_own_parts(tmp_path, text_files):
  """worker i of N exports parts i, i+N, ...: worker 1 of 2 over 3 parts writes part 1 only."""
  assert _export(tmp_path, text_files, num_workers=2, worker_index=1) is None
  manifests = sorted(p.name for p in (tmp_path / 'train').glob('part-?????.json'))
  assert manifests == ['part-00001.json']


def test_a_rerun_on_other_text_files_is_refused(tmp_path, text_files, one_worker_export):
  """The parts there were exported from other files: a rerun would mix two corpora."""
  out_dir, returned = one_worker_export
  assert returned is not None
  shutil.copytree(out_dir, tmp_path, dirs_exist_ok=True)   # the shared export stays as is
  with pytest.raises(DataError, match='holds an export with text_files='):
    _export(tmp_path, text_files.replace('part-*.txt', 'part-0.txt'))


def _files(directory):
  return {p.name: p.read_bytes() for p in sorted(pathlib.Path(directory).iterdir())}


def test_export_by_two_workers_equals_one_worker_and_resumes(tmp_path, text_files,
                                                              one_worker_export):
  one_dir, one = one_worker_export   # _export(one_dir, text_files): one worker
  assert one is not None and len(one['shards']) > 3
  # Two workers (run one after the other here; on a pod, at once): the first to finish
  # cannot finalize, the last one writes metadata.json.
  assert _export(tmp_path / 'two', text_files, num_workers=2, worker_index=1) is None
  assert not (tmp_path / 'two' / 'train' / 'metadata.json').exists()
  assert _export(tmp_path / 'two', text_files, num_workers=2, worker_index=0) == one
  assert _files(tmp_path / 'two' / 'train') == _files(one_dir / 'train')
  assert not [n for n in _files(one_dir / 'train') if '.tmp' in n]
  a = shard_reader.StreamingBlocks(str(one_dir), 'train')
  b = shard_reader.StreamingBlocks(str(tmp_path / 'two'), 'train')
  np.testing.assert_array_equal(a.take(np.arange(len(a))), b.take(np.arange(len(b))))
  # The blocks are the text's packed blocks: every document's tokens, in part order.
  assert a.num_tokens > 12 * 64 and (a.take(np.arange(len(a)))[:, 0] == 101).all()

  # A crash mid-part: part 1's manifest never written, one of its shards half there.
  split = tmp_path / 'two' / 'train'
  (split / 'part-00001.json').unlink()
  (split / 'metadata.json').unlink()
  (split / 'part-00001-00000.npy').write_bytes(b'partial')
  before = {n: (split / n).stat().st_mtime_ns for n in ('part-00000-00000.npy',
                                                         'part-00002-00000.npy')}
  assert streaming_cli.main(['finalize', f'--out_dir={tmp_path / "two"}',
                             '--split=train']) == streaming_cli.PARTS_MISSING_EXIT_CODE == 3
  assert _export(tmp_path / 'two', text_files) == one   # reruns part 1 only
  assert {n: (split / n).stat().st_mtime_ns for n in before} == before
  assert _files(split) == _files(one_dir / 'train')

  # A rerun with another length would skip the parts there and mix two exports: refused
  # before anything is written.
  files_before = {n: (split / n).read_bytes() for n in _files(split)}
  with pytest.raises(DataError, match='holds an export with max_seq_len=64, not 128'):
    export_lib.export('bert_sym_mlm_text_files', 'train', 128, str(tmp_path / 'two'),
                      text_files=text_files, num_parts=3, blocks_per_shard=40)
  assert {n: (split / n).read_bytes() for n in _files(split)} == files_before


# ----------------------------------------------------------------------------------------
# Multi-process: 2 processes with jax.distributed read disjoint halves of the batch.
# ----------------------------------------------------------------------------------------

_DISTRIBUTED_SCRIPT = """
import sys
for name in ('tensorflow', 'tensorflow_text', 'seqio', 'tensorflow_datasets'):
  sys.modules[name] = None   # as on a GPU/TPU training host without TF
import jax
jax.config.update('jax_cpu_collectives_implementation', 'gloo')
address, process_id, url, out = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
jax.distributed.initialize(address, num_processes=2, process_id=process_id)
import numpy as np
from jax.experimental import multihost_utils
from bert_sym import sharding
from bert_sym.input import iterator as data
from configs import common
from tests.test_streaming import _config
config = common.base_config('tiny')
mesh = sharding.make_mesh(config.mesh)
rules = sharding.logical_rules(config)
iterator = data.make_mlm_iterator(_config(url), batch_size=4, split='train', seed=3,
                                  start_step=5)   # process index and count from jax
local = next(iterator)
global_batch = sharding.host_batch_to_global(local, mesh, 8, rules)
gathered = {k: np.asarray(multihost_utils.process_allgather(v, tiled=True))
            for k, v in global_batch.items()}
np.savez(out, **{'local_' + k: v for k, v in local.items()},
         **{'global_' + k: v for k, v in gathered.items()})
print('process', jax.process_index(), 'of', jax.process_count(), 'ok')
"""


def test_two_processes_with_jax_distributed_read_disjoint_halves(small_corpus, tmp_path):
  address = coordinator_address()
  env = dict(os.environ, PYTHONPATH=REPO_ROOT, JAX_PLATFORMS='cpu',
             XLA_FLAGS=cpu_devices_flags(1))
  url = f'file://{small_corpus}'
  processes = [subprocess.Popen(
      [sys.executable, '-c', _DISTRIBUTED_SCRIPT, address, str(i), url,
       str(tmp_path / f'p{i}.npz')], cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True) for i in range(2)]
  outputs = [p.communicate(timeout=180)[0] for p in processes]
  for p, out in zip(processes, outputs):
    assert p.returncode == 0, out[-3000:]
  assert 'process 1 of 2 ok' in outputs[1]
  results = [np.load(tmp_path / f'p{i}.npz') for i in range(2)]
  expected = next(_iterator(_config(url), batch_size=8, start_step=5))   # 1 process
  for k in masking.FEATURES:
    np.testing.assert_array_equal(results[0][f'local_{k}'], expected[k][:4], err_msg=k)
    np.testing.assert_array_equal(results[1][f'local_{k}'], expected[k][4:], err_msg=k)
    for r in results:
      np.testing.assert_array_equal(r[f'global_{k}'], expected[k], err_msg=k)


# ----------------------------------------------------------------------------------------
# The trainer on the streaming path: kill -9, resume, bitwise; the headline command.
# ----------------------------------------------------------------------------------------

# 24 steps: a resume from step 8 crosses an eval (12) and two saves before the end, as
# with 48, at half the steps for the reference and the resumed run to train.
TRAIN_STEPS = 24
TRAIN_FLAGS = {
    'model.vocab_size': 30522, 'model.hidden_size': 32, 'model.num_heads': 2,
    'model.mlp_dim': 64, 'model.num_layers': 2, 'model.max_position_embeddings': 64,
    'data.source': 'streaming', 'data.task': TASK, 'data.max_seq_len': 64,
    'data.max_predictions_per_seq': 10, 'batch_size': 8, 'total_steps': TRAIN_STEPS,
    'optimizer.warmup_steps': 3, 'log_every_steps': 4, 'eval_every_steps': 12,
    'eval_steps': 1, 'checkpoint.every_steps': 4, 'checkpoint.keep_last': 20,
    'checkpoint.keep_every': 0,
}


def _train_flags(shards_dir):
  return [f'--config.{k}={v}' for k, v in TRAIN_FLAGS.items()] + [
      f'--config.data.shards_dir={shards_dir}']


def test_sigkill_then_resume_on_streaming_shards_is_bitwise_identical(small_corpus, tmp_path):
  from bert_sym import checkpoint  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  flags = _train_flags(f'file://{small_corpus}')   # the gs:// code path
  # The uninterrupted reference runs alongside (the test is compile-bound).
  reference = run_trainer(tmp_path / 'reference', *flags, synthetic=False, background=True)
  workdir = tmp_path / 'killed'
  # Held at step 12's batch until killed (waiting, it takes no CPU from the others):
  # slowed to 0.25 s a batch instead, the run went on to its end while a test process
  # starved for some seconds waited to kill it ('the run finished before it was killed').
  held = {'REAL_INPUT_WAIT_FOR_FILE': str(tmp_path / 'never'), 'REAL_INPUT_WAIT_AT_BATCH': '11'}
  process = run_trainer(workdir, *flags, apply_tiny=False, background=True, env=held)
  start = time.time()
  while not (workdir / 'checkpoints' / '8').is_dir():
    assert process.poll() is None, process.stdout.read()[-3000:]
    assert time.time() - start < 240, 'timed out waiting for the step-8 checkpoint'
    time.sleep(0.02)
  process.send_signal(signal.SIGKILL)
  process.wait()
  killed_at = int(checkpoint.resolve_step_dir(workdir).name)
  assert killed_at == 8, 'killed elsewhere than between steps 8 and 12'
  resumed = run_trainer(workdir, *flags, synthetic=False)
  assert f'Resumed from step {killed_at}' in resumed.stdout
  reference_output = reference.communicate(timeout=240)[0]
  assert reference.returncode == 0, reference_output[-3000:]
  assert 'Corpus synthetic_test (streaming' in reference_output
  a = checkpoint.load_params(checkpoint.resolve_step_dir(workdir))
  b = checkpoint.load_params(checkpoint.resolve_step_dir(tmp_path / 'reference'))
  assert checkpoint.resolve_step_dir(workdir).name == str(TRAIN_STEPS)
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
    assert np.array_equal(x, y), f'{jax.tree_util.keystr(path)} differs'


def test_eval_steps_zero_trains_on_an_export_without_a_validation_split(tmp_path):
  """eval_steps=0 turns evaluation off, so the validation split is not read: an export of
  'train' alone used to stop the run ("metadata.json cannot be read ... not prepared")."""
  write_corpus(str(tmp_path / 'corpus'), 200, 64, splits=('train',))
  flags = _train_flags(tmp_path / 'corpus') + [
      '--config.total_steps=4', '--config.checkpoint.every_steps=4']
  # With evals on, the missing split is said before the workdir exists (nothing to clean).
  refused = run_trainer(tmp_path / 'evaluating', *flags, synthetic=False, check=False)
  assert refused.returncode == 1 and 'validation' in refused.stderr, refused.stderr[-3000:]
  assert 'Traceback' not in refused.stderr and not (tmp_path / 'evaluating').exists()
  flags.append('--config.eval_steps=0')
  result = run_trainer(tmp_path / 'run', *flags, synthetic=False)
  assert 'eval/loss' not in (tmp_path / 'run' / 'metrics.jsonl').read_text()
  assert (tmp_path / 'run' / 'checkpoints' / '4').is_dir(), result.stdout[-2000:]


def test_resuming_with_other_data_keys_names_the_flags_that_resume(small_corpus, tmp_path):
  """A resume whose input position does not match said what differed inside the pipeline
  (for a vocabulary, only its md5) and 'resume with the data and config the checkpoint was
  written with': no key, no flag. It names the changed config keys and their flags now."""
  flags = _train_flags(small_corpus) + ['--config.checkpoint.every_steps=4']
  run_trainer(tmp_path / 'run', *flags, '--config.total_steps=4', synthetic=False)
  result = run_trainer(tmp_path / 'run', *flags, '--config.total_steps=8', '--config.seed=5',
                       synthetic=False, check=False)
  assert result.returncode == 1, result.stderr[-3000:]
  [line] = [x for x in result.stderr.splitlines() if x.startswith('bert_sym.train: error:')]
  assert 'seed=0, this run has 5 (another order)' in line, line
  assert "seed=0 in its config.json, 5 now. Fix: rerun with --config.seed=0 " in line, line
  assert 'Traceback' not in result.stderr.split('bert_sym.train: error')[-1]


@pytest.mark.parametrize('extra', [[], ['--config.data.shards_dir=gs://bert-sym-absent/c4']],
                         ids=['not_prepared', 'unreachable'])
def test_headline_command_fails_fast_with_the_prepare_steps(tmp_path, extra):
  result = run_trainer(tmp_path / 'run', *extra, synthetic=False, config='configs/sym_base.py',
                       check=False, timeout=120)
  assert result.returncode == 1, result.stderr[-3000:]
  # Fast = in the preflight, before any expensive step: no workdir, mesh, corpus or model
  # (judged by what ran, not by the wall clock of a shared machine).
  assert not (tmp_path / 'run').exists()
  assert 'Mesh ' not in result.stdout and 'compiled' not in result.stdout
  assert 'tfds build c4/en' in result.stderr
  assert 'python -m bert_sym.shards export --task=bert_sym_mlm_c4' in result.stderr
  assert '--config=configs/tiny.py' in result.stderr
  assert 'Traceback' not in result.stderr.split('bert_sym.train: error')[-1]
  assert 'Corpus' not in result.stdout and 'Initialised' not in result.stdout
  assert not (tmp_path / 'run' / 'checkpoints').exists()


def test_shards_of_the_embedded_corpus_not_exported_yet_suggest_reading_it_through_seqio():
  """configs/tiny.py asked to read shards: 'use configs/tiny.py' was the hint it got."""
  with pytest.raises(DataError, match=r'smoke-test on the small embedded corpus instead: '
                                      r'--config\.data\.source=seqio\.$'):
    _iterator(_config('', task='bert_sym_mlm_embedded'))


def test_the_suggested_export_command_exports_the_configured_corpus(tmp_path, monkeypatch):
  """The 'Fix: prepare it once' command, as a shell would split it, given to the shards
  command line: it is accepted and exports the config's files with the config's vocabulary
  (without them the text-files export fails, or writes shards the trainer rejects)."""
  config = _config(tmp_path / 'not yet', max_seq_len=64, task='bert_sym_mlm_text_files',
                   text_files='/data/wiki text/*.train.tokens,/data/more/*.txt',
                   validation_files='/data/wiki text/*.valid.tokens',
                   vocab_path='/vocabs/my vocab.txt')
  with pytest.raises(DataError) as error:
    data_lib.load_blocks(config, 'train')
  command = str(error.value).split('`python -m bert_sym.shards ')[1].split('`')[0]
  exported = {}

  def export(*args, **kwargs):   # what the command line asks of the exporter, no TF
    exported[args[1]] = args, kwargs

  monkeypatch.setattr(streaming_cli.metrics_writer, 'quiet_logs', lambda *a, **k: None)
  monkeypatch.setattr(export_lib, 'export', export)   # None: 'parts still missing'
  assert streaming_cli.main(shlex.split(command)) == 0
  assert set(exported) == {'train', 'validation'}
  (task, _, max_seq_len, out_dir), kwargs = exported['train']
  assert (task, max_seq_len, out_dir) == (config.task, 64, config.shards_dir)
  assert {k: kwargs[k] for k in ('text_files', 'validation_files', 'vocab_path')} == {
      k: config[k] for k in ('text_files', 'validation_files', 'vocab_path')}


def test_seqio_path_refuses_corpora_that_do_not_fit_in_memory():
  config = _config('', source='seqio', task='bert_sym_mlm_wikipedia')
  with pytest.raises(DataError, match=r'(?s)pack all of bert_sym_mlm_wikipedia.*'
                     r'tfds build wikipedia/20230601\.en'):
    data_lib.load_blocks(config, 'train')


def test_a_split_directory_given_as_the_corpus_says_to_pass_its_parent(small_corpus):
  """shards_dir=.../corpus/train: the message told to export the corpus again (hours at
  paper scale) when the fix is to drop '/train'."""
  split_dir = f'{small_corpus}/train'
  with pytest.raises(DataError) as raised:
    shard_reader.read_metadata(split_dir, 'train')
  assert f'--config.data.shards_dir={small_corpus}' in str(raised.value)
  assert 'export' not in str(raised.value).split('Fix:')[1]
  assert shard_reader.read_metadata(str(small_corpus), 'train')['shards']


def test_text_file_shards_of_other_files_are_refused_by_name(tmp_path, monkeypatch):
  """Every text-files corpus has the same task name, so the files are what tells two
  corpora apart: shards exported from other files than the config names must not train
  under its name. Another spelling of the same files is the same corpus."""
  task = 'bert_sym_mlm_text_files'
  write_corpus(str(tmp_path / 'shards'), 40, 64, num_parts=1, task=task)
  for split in ('train', 'validation'):   # what `shards export` records (absolute)
    path = tmp_path / 'shards' / split / 'metadata.json'
    metadata = json.loads(path.read_text())
    metadata.update(text_files=f'{tmp_path}/wiki/*.txt', validation_files='')
    path.write_text(json.dumps(metadata))
  monkeypatch.chdir(tmp_path)
  for source in ('shards', 'streaming'):
    same = _config(tmp_path / 'shards', task=task, source=source, text_files='./wiki/*.txt')
    assert len(data_lib.load_blocks(same, 'train')) == 40
    assert len(data_lib.load_blocks(same, 'validation')) == 40
    other = _config(tmp_path / 'shards', task=task, source=source,
                    text_files=f'{tmp_path}/books/*.txt')
    with pytest.raises(DataError, match=r"exported from --text_files='.*/wiki/\*\.txt', "
                       r"the config names config\.data\.text_files='.*/books/\*\.txt'.*"
                       r"Fix: --config\.data\.shards_dir="):
      data_lib.load_blocks(other, 'train')
    held_out = _config(tmp_path / 'shards', task=task, source=source,
                       text_files='wiki/*.txt', validation_files='valid/*.txt')
    with pytest.raises(DataError, match="exported from --validation_files=''"):
      data_lib.load_blocks(held_out, 'validation')
  # Older exports recorded the patterns as typed (relative): they cannot be resolved, and
  # are not refused.
  metadata.update(text_files='wiki/*.txt')
  path.write_text(json.dumps(metadata))
  old = _config(tmp_path / 'shards', task=task, source='shards', text_files='/else/*.txt')
  assert len(data_lib.load_blocks(old, 'validation')) == 40

  # The exporter records the patterns absolute, whatever directory it ran from.
  exported = {}
  monkeypatch.setattr(streaming_cli.metrics_writer, 'quiet_logs', lambda *a, **k: None)
  monkeypatch.setattr(export_lib, 'export', lambda *a, **k: exported.update(k))
  streaming_cli.main(['export', f'--task={task}', '--text_files=wiki/*.txt, ~/b.txt',
                      '--validation_files=v.txt', f'--out_dir={tmp_path / "out"}',
                      '--split=train'])
  assert exported['text_files'] == f'{tmp_path}/wiki/*.txt,{os.path.expanduser("~")}/b.txt'
  assert exported['validation_files'] == f'{tmp_path}/v.txt'


def _quiet(monkeypatch):
  monkeypatch.setattr(streaming_cli.metrics_writer, 'quiet_logs', lambda *a, **k: None)


def test_export_passes_every_flag_to_the_exporter(tmp_path, monkeypatch):
  """A worker of several exports only its parts, with the sizes and TFDS dir it was given
  (without num_workers/worker_index every worker would export every part, racing on the
  same files; without blocks_per_shard, shards of the default size)."""
  _quiet(monkeypatch)
  calls = []
  monkeypatch.setattr(export_lib, 'export', lambda *a, **k: calls.append((a, k)))
  code = streaming_cli.main([
      'export', '--task=bert_sym_mlm_c4', f'--out_dir={tmp_path}', '--num_workers=4',
      '--worker_index=2', '--num_parts=8', '--blocks_per_shard=7',
      f'--tfds_data_dir={tmp_path}/tfds', '--vocab_path=/v/vocab.txt', '--max_seq_len=128'])
  assert code == 0   # export: parts missing is not an error
  assert [a for a, _ in calls] == [('bert_sym_mlm_c4', s, 128, str(tmp_path))
                                   for s in ('train', 'validation')]
  for _, kwargs in calls:
    assert {k: kwargs.get(k) for k in ('num_workers', 'worker_index', 'num_parts',
                                       'blocks_per_shard', 'tfds_data_dir', 'vocab_path')} == {
        'num_workers': 4, 'worker_index': 2, 'num_parts': 8, 'blocks_per_shard': 7,
        'tfds_data_dir': f'{tmp_path}/tfds', 'vocab_path': '/v/vocab.txt'}


def test_finalize_finalizes_each_split_it_names(tmp_path, monkeypatch, capsys):
  """`shards finalize --out_dir=...` (as launch/ runs it: default --split) writes each split's
  metadata: a validation split never finalized would look complete to the launcher."""
  _quiet(monkeypatch)
  seen = []

  def finalize(out_dir, split, stalled_after_minutes):
    assert stalled_after_minutes == 0   # the default: wait as long as it takes
    seen.append((out_dir, split))
    return {'num_blocks': 1, 'num_tokens': 2} if split == 'train' else None
  monkeypatch.setattr(export_lib, 'finalize', finalize)
  code = streaming_cli.main(['finalize', f'--out_dir={tmp_path}'])
  assert seen == [(str(tmp_path), 'train'), (str(tmp_path), 'validation')]
  assert code == streaming_cli.PARTS_MISSING_EXIT_CODE   # validation still missing
  out = capsys.readouterr().out
  assert f'{tmp_path}/train: complete' in out and f'{tmp_path}/validation: parts still' in out


# The shard format checks, read order and the finalize line (a mutation audit found them
# untested: each test below fails with the check it names removed).

def _read_rows(batch, blocks, rows):
  """True where each batch row is blocks[rows[i]] (positions that were not picked for
  masking are the block's own tokens)."""
  truth = blocks.take(np.asarray(rows))
  keep = batch['mlm_weights'] == 0
  return bool((np.where(keep, batch['input_ids'], truth) == truth).all())


def test_validation_is_read_in_block_order(small_corpus):
  blocks = shard_reader.StreamingBlocks(str(small_corpus), 'validation')
  it = _iterator(_config(str(small_corpus)), split='validation', batch_size=16)
  for step in range(3):
    assert _read_rows(next(it), blocks, np.arange(step * 16, step * 16 + 16))


def test_train_with_shuffle_off_is_read_in_block_order(small_corpus):
  blocks = shard_reader.StreamingBlocks(str(small_corpus), 'train')
  it = _iterator(_config(str(small_corpus), shuffle=False), batch_size=16)
  for step in range(3):
    assert _read_rows(next(it), blocks, np.arange(step * 16, step * 16 + 16))
  assert it.get_state()['shuffle'] == 'none'


def test_train_with_shuffle_on_is_not_block_order(small_corpus):
  blocks = shard_reader.StreamingBlocks(str(small_corpus), 'train')
  it = _iterator(_config(str(small_corpus), shuffle=True), batch_size=16)
  assert not _read_rows(next(it), blocks, np.arange(16))
  assert it.get_state()['shuffle'] == data_lib.SHUFFLE_KIND


_SOURCES = ('streaming', 'shards')


def _copy(small_corpus, tmp_path):
  root = tmp_path / 'copy'
  shutil.copytree(small_corpus, root)
  metadata = json.loads((root / 'train' / 'metadata.json').read_text())
  return root, metadata


@pytest.mark.parametrize('source', _SOURCES)
def test_another_shard_format_version_is_refused(small_corpus, tmp_path, source):
  root, metadata = _copy(small_corpus, tmp_path)
  metadata['format_version'] = shard_reader.SHARD_FORMAT_VERSION + 1
  (root / 'train' / 'metadata.json').write_text(json.dumps(metadata))
  with pytest.raises(DataError, match='shard format 2, this code reads 1; re-export'):
    _iterator(_config(str(root), source=source))


@pytest.mark.parametrize('source', _SOURCES)
def test_a_vocab_txt_that_is_not_the_exported_one_is_refused(small_corpus, tmp_path, source):
  """metadata.json's md5 is the config's, but vocab.txt was swapped: its tokens would
  drive whole-word masking and the random replacements."""
  root, _ = _copy(small_corpus, tmp_path)
  vocab = root / 'train' / 'vocab.txt'
  vocab.write_bytes(vocab.read_bytes().replace(b'\nthe\n', b'\nteh\n', 1))
  with pytest.raises(DataError, match='vocab.txt: md5 differs from metadata.json'):
    _iterator(_config(str(root), source=source))


@pytest.mark.parametrize('scheme', ['', 'file://'])
def test_a_config_vocab_other_than_the_exports_is_refused_local_or_remote(small_corpus,
                                                                          tmp_path, scheme):
  """Shards exported with bert-base-uncased, a config naming another vocab.txt: training
  would use the shards' ids while config.json records the other vocabulary, which GLUE and
  the Hugging Face export tokenise with. A URL vocab_path (gs://, here file://) was not
  read at all, so not checked."""
  other = tmp_path / 'vocab.txt'
  other.write_bytes(vocab_lib.read_vocab_bytes(vocab_lib.default_vocab_file()).replace(
      b'\nthe\n', b'\nteh\n', 1))
  with pytest.raises(DataError, match='exported with vocabulary md5 .* the config uses '
                     f'{scheme}{other}'):
    shard_reader.open_blocks(_config(str(small_corpus), vocab_path=f'{scheme}{other}'),
                             'train')
  with pytest.raises(DataError, match='vocab_path=file:///absent/vocab.txt: cannot read it'):
    shard_reader.open_blocks(_config(str(small_corpus), vocab_path='file:///absent/vocab.txt'),
                             'train')


@pytest.mark.parametrize('source', _SOURCES)
def test_a_fortran_order_shard_is_refused(small_corpus, tmp_path, source):
  """Same shape and dtype, column-major bytes: read by byte range, every block would be
  other tokens."""
  root, metadata = _copy(small_corpus, tmp_path)
  path = root / 'train' / metadata['shards'][0]['file']
  np.save(path, np.asfortranarray(np.load(path)))
  with pytest.raises(DataError, match='belongs to another export'):
    _iterator(_config(str(root), source=source))


@pytest.mark.parametrize('source', _SOURCES)
def test_a_shard_with_extra_bytes_is_refused(small_corpus, tmp_path, source):
  root, metadata = _copy(small_corpus, tmp_path)
  path = root / 'train' / metadata['shards'][0]['file']
  with open(path, 'ab') as f:
    f.write(b'\0' * 128)
  with pytest.raises(DataError, match=r'extra bytes: an interrupted copy or export'):
    _iterator(_config(str(root), source=source))


def test_a_missing_corpus_names_the_configured_task(tmp_path):
  with pytest.raises(DataError, match=r"config\.data\.task='synthetic_test' reads exported "
                     r'shards, but .*absent/train/metadata\.json cannot be read'):
    _iterator(_config(str(tmp_path / 'absent')))


def test_finalize_reports_the_blocks_and_tokens_of_the_split(tmp_path, monkeypatch, capsys):
  monkeypatch.setattr(streaming_cli.metrics_writer, 'quiet_logs', lambda *a, **k: None)
  monkeypatch.setattr(export_lib, 'finalize',
                      lambda out_dir, split, stalled: {'num_blocks': 7, 'num_tokens': 448})
  assert streaming_cli.main(['finalize', f'--out_dir={tmp_path}', '--split=train']) == 0
  assert f'{tmp_path}/train: complete, 7 blocks, 448 tokens' in capsys.readouterr().out


@pytest.mark.parametrize('command, options', [('export', 12), ('finalize', 3)])
def test_every_option_of_the_shards_command_says_what_it_is_and_its_default(command, options,
                                                                           capsys):
  with pytest.raises(SystemExit) as done:
    streaming_cli.main([command, '--help'])
  assert done.value.code == 0
  lines = capsys.readouterr().out.split('options:')[1]
  described = re.findall(r'\n  (--\w+)(?: [A-Z_]+)?(?:\n {20,}| +)\S', lines)
  assert len(described) == options, lines   # --help is not among them: its line says 'show'
  assert lines.count('(default:') == options - sum(f in lines for f in ('--task', '--out_dir'))
  assert '(default: None)' not in lines   # the required ones have none


@pytest.mark.parametrize('command', ['export', 'finalize'])
@pytest.mark.parametrize('split', ['train,', 'train,valdation', 'test'])
def test_a_split_no_task_has_is_refused_before_any_split_is_done(tmp_path, capsys, monkeypatch,
                                                                 command, split):
  """A typo or trailing comma in --split: refused before any work, not after the splits
  named before it were exported (hours for C4's train)."""
  done = []
  monkeypatch.setattr(export_lib, 'export', lambda task, s, *a, **k: done.append(s))
  monkeypatch.setattr(export_lib, 'finalize', lambda out_dir, s, *a: done.append(s))
  task = ['--task=bert_sym_mlm_embedded'] if command == 'export' else []
  with pytest.raises(SystemExit) as exited:
    streaming_cli.main([command, *task, f'--out_dir={tmp_path / "out"}', f'--split={split}'])
  assert exited.value.code == cli.EXIT_USER_ERROR
  error = capsys.readouterr().err
  assert error.startswith(f'bert_sym.shards: error: --split={split} names ') and error.endswith(
      'Fix: --split=train,validation (or one of them).\n'), error
  assert not done and not (tmp_path / 'out').exists()


@pytest.mark.parametrize('command', ['export', 'finalize'])
def test_an_empty_out_dir_is_refused_not_the_root_directory(capsys, monkeypatch, command):
  """--out_dir=$OUT with OUT unset: join_url('', 'train') is '/train', a split of the root."""
  done = []
  monkeypatch.setattr(export_lib, 'export', lambda task, s, *a, **k: done.append(s))
  monkeypatch.setattr(export_lib, 'finalize', lambda out_dir, s, *a: done.append(s))
  task = ['--task=bert_sym_mlm_embedded'] if command == 'export' else []
  with pytest.raises(SystemExit) as exited:
    streaming_cli.main([command, *task, '--out_dir='])
  assert exited.value.code == cli.EXIT_USER_ERROR and not done
  assert capsys.readouterr().err == ('bert_sym.shards: error: --out_dir is empty. Fix: '
                                     '--out_dir=DIR (local or gs://bucket/path).\n')

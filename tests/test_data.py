"""bert_sym.input (masking, blocks, iterator, export): masking statistics,
determinism, O(1) resume, host sharding, exported shards == the in-memory (seqio) path,
TF-free import, and clear errors."""

import json
import hashlib
import logging
import os
import pathlib
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from bert_sym.input import DataError
from bert_sym.input import blocks
from bert_sym.input import shard_reader
from bert_sym.input import shard_writer as export_lib
from bert_sym.input import iterator as data_lib
from bert_sym.input import masking
from bert_sym.input import sources
from bert_sym.input import tokenizer as vocab_lib
from configs import common

L = 128
TEXT = 'bert_sym_mlm_text_files'


def _default_spec(**knobs):
  path = vocab_lib.default_vocab_file()
  tokens = vocab_lib.read_vocab(path)
  return tokens, masking.MaskSpec.from_vocab(
      tokens, vocab_lib.special_ids(tokens, path).as_dict(), **knobs)


@pytest.fixture(scope='module')
def real_blocks():
  """1,000 packed 128-token blocks over the real bert-base-uncased vocabulary, in NumPy
  (masking needs only token ids): words of one head piece and 0-2 '##' pieces, [CLS] ...
  [SEP] per block, the last block padded, as the packer lays them out."""
  tokens = vocab_lib.read_vocab(vocab_lib.default_vocab_file())
  ids = np.arange(len(tokens))
  is_piece = np.array([t.startswith('##') for t in tokens])
  is_word = ~is_piece & ~np.array([t.startswith('[') and t.endswith(']') for t in tokens])
  heads, pieces = ids[is_word], ids[is_piece]
  rng = np.random.default_rng(0)
  blocks = np.zeros((1000, L), np.int32)
  for row in blocks:
    words = []
    while len(words) < L - 2:
      words += [rng.choice(heads)] + list(rng.choice(pieces, rng.choice(3, p=[.7, .2, .1])))
    row[:] = [101] + words[:L - 2] + [102]
  blocks[-1, L // 2:] = 0
  blocks[-1, L // 2 - 1] = 102
  return blocks


def test_masking_statistics(real_blocks):
  tokens, spec = _default_spec(max_predictions=L)
  blocks = np.concatenate([real_blocks] * 2)  # second copy: other example indices
  out = masking.mask_blocks(blocks, np.arange(len(blocks)), seed=7, spec=spec)
  candidate = spec.maskable[blocks]
  selected = out['mlm_weights'] == 1.0
  assert candidate.sum() >= 100_000
  assert abs(selected.sum() / candidate.sum() - 0.15) < 0.01
  special = np.isin(blocks, [0, 100, 101, 102, 103])
  assert not (selected & special).any()                      # never masked
  assert ((out['input_ids'] != blocks) <= selected).all()     # only selected positions change
  np.testing.assert_array_equal(out['mlm_targets'], np.where(selected, blocks, 0))
  as_mask = (out['input_ids'] == 103)[selected].mean()
  unchanged = (out['input_ids'] == blocks)[selected].mean()
  randomised = 1 - as_mask - unchanged
  assert abs(as_mask - 0.8) < 0.01 and abs(randomised - 0.1) < 0.01
  assert abs(unchanged - 0.1) < 0.01   # (+1/30522 chance a random token equals the original)
  random_ids = out['input_ids'][selected & (out['input_ids'] != 103) & (out['input_ids'] != blocks)]
  assert len(np.unique(random_ids)) > 0.5 * len(random_ids)   # spread over the vocab
  # Uniform over the whole vocabulary, its top included (BERT: rng.randint(0, V - 1)).
  from scipy import stats  # pylint: disable=import-outside-toplevel
  assert len(random_ids) > 1000 and random_ids.max() > 0.99 * spec.vocab_size
  counts = np.bincount(random_ids * 10 // spec.vocab_size, minlength=10)
  assert stats.chisquare(counts).pvalue > 1e-3, counts
  np.testing.assert_array_equal(out['attention_mask'], (blocks != 0).astype(np.int32))
  assert out['attention_mask'].min() == 0                    # the last block is padded


def test_max_predictions_caps_masked_positions(real_blocks):
  _, spec = _default_spec(mask_rate=0.5, max_predictions=10)
  out = masking.mask_blocks(real_blocks, np.arange(len(real_blocks)), 0, spec)
  assert out['mlm_weights'].sum(axis=1).max() == 10


def test_whole_word_masking_masks_whole_words(real_blocks):
  tokens, spec = _default_spec(whole_word=True, max_predictions=L)
  out = masking.mask_blocks(real_blocks, np.arange(len(real_blocks)), 3, spec)
  selected = out['mlm_weights'] == 1.0
  maskable = spec.maskable[real_blocks]
  is_piece = spec.continuation[real_blocks] & maskable
  is_piece[:, 1:] &= maskable[:, :-1]  # '##x' after [UNK] or [CLS] starts its own word
  # A continuation piece is selected exactly when the piece before it is.
  assert (selected[:, 1:][is_piece[:, 1:]] == selected[:, :-1][is_piece[:, 1:]]).all()
  assert (selected & is_piece).sum() > 100
  assert abs(selected.sum() / spec.maskable[real_blocks].sum() - 0.15) < 0.01


def test_whole_word_masking_draws_each_pieces_replacement_on_its_own(real_blocks):
  """BERT chooses [MASK] / random / unchanged per token, also inside a whole word: the two
  pieces of a selected word differ in being [MASK] with probability 2 x 0.8 x 0.2 = 0.32
  (a draw shared by the word would make it 0)."""
  _, spec = _default_spec(whole_word=True, max_predictions=L)
  out = masking.mask_blocks(real_blocks, np.arange(len(real_blocks)), 3, spec)
  selected = out['mlm_weights'] == 1.0
  as_mask = out['input_ids'] == spec.mask_id
  pair = selected[:, 1:] & selected[:, :-1] & spec.continuation[real_blocks][:, 1:]
  assert pair.sum() > 100
  differ = (as_mask[:, 1:] != as_mask[:, :-1])[pair].mean()
  assert 0.2 < differ < 0.45, differ


def test_a_piece_after_a_special_token_starts_its_own_word():
  """'##x' right after [CLS] or [SEP] belongs to no word before it: with whole words it is
  a unit of its own (never masked, were it glued to [CLS]; and after [SEP] not tied to the
  previous document's last word)."""
  tokens, spec = _default_spec(whole_word=True, max_predictions=L)
  piece, word = tokens.index('##s'), tokens.index('house')
  cls, sep = tokens.index('[CLS]'), tokens.index('[SEP]')
  row = [cls, piece, word, word, sep, piece, word, sep]
  blocks = np.array([row + [spec.pad_id] * (L - len(row))] * 4000)
  selected = masking.mask_blocks(blocks, np.arange(len(blocks)), 5, spec)['mlm_weights'] > 0
  assert selected[:, 1].mean() > 0.05 and selected[:, 5].mean() > 0.05
  assert (selected[:, 5] & ~selected[:, 3]).sum() > 0.8 * selected[:, 5].sum()


def test_masking_is_a_function_of_seed_index_and_block(real_blocks):
  """Same (seed, index, block): same masks, whatever else is in the batch; another block at
  the same index is masked elsewhere (seqio shards number their blocks from 0 each)."""
  _, spec = _default_spec()
  a = masking.mask_blocks(real_blocks[:64], np.arange(64), 1, spec)
  b = masking.mask_blocks(real_blocks[:64], np.arange(64), 1, spec)
  c = masking.mask_blocks(real_blocks[:64], np.arange(64), 2, spec)
  d = masking.mask_blocks(real_blocks[:64], np.arange(64) + 1, 1, spec)
  e = masking.mask_blocks(real_blocks[64:128], np.arange(64), 1, spec)
  part = masking.mask_blocks(real_blocks[10:20], np.arange(10, 20), 1, spec)
  assert all(np.array_equal(a[k], b[k]) for k in masking.FEATURES)
  assert all(np.array_equal(a[k][10:20], part[k]) for k in masking.FEATURES)
  assert not np.array_equal(a['mlm_weights'], c['mlm_weights'])
  assert not np.array_equal(a['mlm_weights'], d['mlm_weights'])
  same = (a['mlm_weights'] * e['mlm_weights']).sum() / a['mlm_weights'].sum()
  assert same < 0.25   # chance: 0.15; keyed by (seed, index) alone it was 1


# ----------------------------------------------------------------------------------------
# Iterator: determinism, resume, hosts, shards vs seqio.
# ----------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def text_files(tmp_path_factory):
  """A small real corpus as text files (embedded Wikipedia articles, one per line)."""
  from bert_sym.input import sources as corpus  # pylint: disable=import-outside-toplevel
  root = tmp_path_factory.mktemp('corpus')
  docs = [t.replace('\n', ' ') for t in corpus.embedded_documents('train')[:30]]
  (root / 'part-0.txt').write_text('\n'.join(docs[:15]) + '\n', encoding='utf-8')
  (root / 'part-1.txt').write_text('\n'.join(docs[15:]) + '\n', encoding='utf-8')
  return str(root / 'part-*.txt')


def _config(**overrides):
  config = common.base_config('tiny').data
  config.update(dict(max_seq_len=L, max_predictions_per_seq=24, task=TEXT))
  config.update(overrides)
  return config


@pytest.fixture(scope='module')
def seqio_config(text_files):
  return _config(source='seqio', text_files=text_files)


@pytest.fixture(scope='module')
def shards_dir(tmp_path_factory, text_files):
  out = tmp_path_factory.mktemp('shards')
  for split in ('train', 'validation'):
    export_lib.export(TEXT, split, L, str(out), num_parts=1, text_files=text_files,
                      blocks_per_shard=700)
  return str(out)


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _assert_same(batches_a, batches_b):
  assert len(batches_a) == len(batches_b)
  for a, b in zip(batches_a, batches_b):
    for k in masking.FEATURES:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_batches_have_the_trainer_layout(seqio_config):
  batch = next(data_lib.make_mlm_iterator(seqio_config, batch_size=8, split='train', seed=0))
  assert set(batch) == set(masking.FEATURES)
  for k, v in batch.items():
    assert v.shape == (8, L)
    assert v.dtype == (np.float32 if k == 'mlm_weights' else np.int32)
  assert (batch['mlm_weights'].sum(1) <= 24).all() and (batch['input_ids'][:, 0] == 101).all()


def test_same_seed_same_batches_other_seed_other_batches(seqio_config):
  make = lambda seed: data_lib.make_mlm_iterator(seqio_config, batch_size=16, split='train',
                                                 seed=seed, process_index=0, process_count=1)
  a, b, c = _take(make(1), 5), _take(make(1), 5), _take(make(2), 5)
  _assert_same(a, b)
  assert not np.array_equal(a[0]['input_ids'], c[0]['input_ids'])


def test_resume_yields_the_next_batch_of_an_uninterrupted_run(seqio_config):
  num_blocks = len(data_lib.load_blocks(seqio_config, 'train'))
  steps = num_blocks // 16 + 3  # run past an epoch boundary
  make = lambda **kw: data_lib.make_mlm_iterator(seqio_config, batch_size=16, split='train',
                                                 seed=4, **kw)
  full = _take(make(), steps)
  for k in (1, 7, steps - 2):
    _assert_same([next(make(start_step=k))], [full[k]])
    it = make()
    next(it)
    state = json.loads(json.dumps(make(start_step=k).get_state()))  # as a checkpoint
    it.set_state(state)
    _assert_same([next(it)], [full[k]])


def test_resume_rejects_a_different_dataset(seqio_config):
  it = data_lib.make_mlm_iterator(seqio_config, batch_size=16, split='train', seed=4)
  state = dict(it.get_state(), num_blocks=it.num_blocks + 1)
  with pytest.raises(DataError, match='num_blocks'):
    it.set_state(state)


def test_resume_with_another_block_length_names_max_seq_len(seqio_config):
  # Another block length packs another number of blocks: the error named num_blocks
  # ("another corpus"), not the config key the user changed.
  state = data_lib.make_mlm_iterator(seqio_config, batch_size=16, split='train',
                                     seed=4).get_state()
  config = _config(source='seqio', text_files=seqio_config.text_files, max_seq_len=L // 2,
                   max_predictions_per_seq=12)
  shorter = data_lib.make_mlm_iterator(config, batch_size=16, split='train', seed=4)
  assert shorter.num_blocks != state['num_blocks']
  with pytest.raises(DataError, match=f'has max_seq_len={L}, this run has {L // 2}'):
    shorter.set_state(state)


def test_resume_on_another_host_count_keeps_the_global_batch(seqio_config):
  make = lambda batch, p, n, **kw: data_lib.make_mlm_iterator(
      seqio_config, batch_size=batch, split='train', seed=5, process_index=p,
      process_count=n, **kw)
  two_hosts_state = make(8, 1, 2, start_step=4).get_state()
  one_host = make(16, 0, 1)
  one_host.set_state(json.loads(json.dumps(two_hosts_state)))
  _assert_same([next(one_host)], [make(16, 0, 1, start_step=4).batch(4)])
  with pytest.raises(DataError, match=r'global batch of 16 sequences, this run reads 4\. Fix: '
                     r'resume with config\.batch_size=16 \(the global batch\), or start a '
                     r'new --workdir\.'):
    make(4, 0, 1).set_state(two_hosts_state)
  # The trainer passes the flags that resume (config keys changed since config.json).
  with pytest.raises(DataError, match=r'reads 4\. Fix: rerun with --config\.batch_size=16$'):
    make(4, 0, 1).set_state(two_hosts_state, fix='Fix: rerun with --config.batch_size=16')


def test_hosts_read_disjoint_rows_of_the_same_global_batch(seqio_config):
  one = _take(data_lib.make_mlm_iterator(seqio_config, batch_size=16, split='train', seed=3,
                                         process_index=0, process_count=1), 3)
  for p in (0, 1):
    host = _take(data_lib.make_mlm_iterator(seqio_config, batch_size=8, split='train', seed=3,
                                            process_index=p, process_count=2), 3)
    _assert_same(host, [{k: v[p * 8:(p + 1) * 8] for k, v in b.items()} for b in one])


def test_train_epoch_visits_every_block_once(seqio_config):
  blocks = data_lib.load_blocks(seqio_config, 'train')
  it = data_lib.make_mlm_iterator(seqio_config, batch_size=len(blocks), split='train', seed=9)
  rows = it._rows(np.arange(len(blocks)))  # pylint: disable=protected-access
  np.testing.assert_array_equal(np.sort(rows), np.arange(len(blocks)))
  assert not np.array_equal(rows, np.arange(len(blocks)))


def test_validation_is_in_order_and_repeats(seqio_config):
  blocks = data_lib.load_blocks(seqio_config, 'validation')
  a = _take(data_lib.make_mlm_iterator(seqio_config, batch_size=4, split='validation',
                                       seed=0), 3)
  b = _take(data_lib.make_mlm_iterator(seqio_config, batch_size=4, split='validation',
                                       seed=0), 3)
  _assert_same(a, b)
  np.testing.assert_array_equal(a[0]['attention_mask'][0],
                                (blocks.take(np.array([0]))[0] != 0).astype(np.int32))
  steps = len(blocks) // 4 + 2
  assert len(_take(data_lib.make_mlm_iterator(seqio_config, batch_size=4, split='validation',
                                              seed=0), steps)) == steps


def test_shards_equal_the_seqio_path(seqio_config, shards_dir):
  shards_config = _config(source='shards', shards_dir=shards_dir)
  for split in ('train', 'validation'):
    for whole_word in (False, True):
      make = lambda c: data_lib.make_mlm_iterator(
          dict_update(c, whole_word_masking=whole_word), batch_size=32, split=split, seed=11,
          start_step=2)
      _assert_same(_take(make(shards_config), 4), _take(make(seqio_config), 4))
  assert data_lib.vocab_size(shards_config) == data_lib.vocab_size(seqio_config) == 30522


def dict_update(config, **values):
  config = config.copy_and_resolve_references()
  config.update(values)
  return config


def test_export_layout_and_metadata(shards_dir):
  split_dir = os.path.join(shards_dir, 'train')
  metadata = shard_reader.read_metadata(shards_dir, 'train')
  assert metadata['vocab_md5'] == vocab_lib.BERT_BASE_UNCASED_MD5
  assert metadata['max_seq_len'] == L and metadata['dtype'] == 'uint16'
  assert len(metadata['shards']) >= 2  # blocks_per_shard=700 forces several shards
  names = sorted(os.listdir(split_dir))
  assert not [n for n in names if '.tmp' in n]
  # The shards, their part's manifest (what a rerun skips), the vocabulary, metadata.json.
  assert names == sorted([s['file'] for s in metadata['shards']] + [
      export_lib.part_manifest_name(0), 'metadata.json', 'vocab.txt'])
  arrays = [np.load(os.path.join(split_dir, s['file'])) for s in metadata['shards']]
  assert sum(len(a) for a in arrays) == metadata['num_blocks']
  assert metadata['num_tokens'] == sum(int((a != 0).sum()) for a in arrays)


def test_shards_path_imports_and_runs_without_tensorflow(shards_dir):
  script = textwrap.dedent(f"""
      import sys
      for name in ('tensorflow', 'tensorflow_text', 'seqio', 'tensorflow_datasets'):
        sys.modules[name] = None  # any import of them now raises ImportError
      from bert_sym.input import iterator as data
      from configs import common
      config = common.base_config('tiny').data
      config.update(dict(source='shards', shards_dir={shards_dir!r}, max_seq_len={L},
                         task={TEXT!r}))
      batch = next(data.make_mlm_iterator(config, batch_size=4, split='train', seed=0,
                                          process_index=0, process_count=1))
      assert batch['input_ids'].shape == (4, {L})
      assert data.vocab_size(config) == 30522
      assert not [m for m in sys.modules if m.startswith('tensorflow') and sys.modules[m]]
      print('ok')
  """)
  result = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.dirname(__file__)), timeout=120)
  assert result.returncode == 0 and 'ok' in result.stdout, result.stderr[-2000:]


# ----------------------------------------------------------------------------------------
# Errors.
# ----------------------------------------------------------------------------------------

def test_sequence_length_over_512_is_an_error(tmp_path):
  with pytest.raises(DataError, match='max_seq_len=513'):
    data_lib.make_mlm_iterator(_config(source='shards', shards_dir=str(tmp_path),
                                       max_seq_len=513),
                               batch_size=2, split='train', seed=0, process_index=0,
                               process_count=1)


def test_missing_shards_and_mismatched_length_are_errors(tmp_path, shards_dir):
  with pytest.raises(DataError, match=r'train/metadata\.json: no such file'):
    data_lib.load_blocks(_config(source='shards', shards_dir=str(tmp_path)), 'train')
  with pytest.raises(DataError, match='128-token blocks.*max_seq_len=64'):
    data_lib.load_blocks(_config(source='shards', shards_dir=shards_dir, max_seq_len=64),
                         'train')


def test_empty_and_missing_text_corpus_are_errors(tmp_path):
  (tmp_path / 'blank.txt').write_text('\n  \n\n')
  config = _config(source='seqio', text_files=str(tmp_path / 'blank.txt'))
  with pytest.raises(DataError, match='blank.txt.*empty corpus'):
    data_lib.make_mlm_iterator(config, batch_size=2, split='train', seed=0)
  config.text_files = str(tmp_path / 'absent.txt')
  with pytest.raises(DataError, match='absent.txt: no such file'):
    data_lib.make_mlm_iterator(config, batch_size=2, split='train', seed=0)


def test_a_corpus_held_out_whole_says_so_and_how_to_export_again(tmp_path):
  """One document: the hold-out (every 100th, the first included) takes it, and training
  got 'empty corpus (no tokens after tokenising)' for a file full of tokens; the export
  then kept its empty part, so the rerun after adding text failed the same way."""
  (tmp_path / 'one.txt').write_text('A single document of a few words.\n')
  config = _config(source='seqio', text_files=str(tmp_path / 'one.txt'))
  with pytest.raises(DataError, match='one.txt.*empty corpus.*held out for validation.*'
                                      'validation_files'):
    data_lib.make_mlm_iterator(config, batch_size=2, split='train', seed=0)
  out = tmp_path / 'shards'
  with pytest.raises(DataError, match=rf'no part holds a token; .*held out for validation.*'
                                      rf'remove {out}/train .*export again'):
    export_lib.export(TEXT, 'train', L, str(out), num_parts=1,
                      text_files=str(tmp_path / 'one.txt'))


def test_a_vocabulary_that_does_not_fit_the_text_is_said(tmp_path, caplog, capsys):
  """A 10-token vocab.txt turned 83% of a corpus into [UNK] without a word (so would a
  cased one, which the lower-casing tokenizer never matches)."""
  (tmp_path / 'text.txt').write_text('\n'.join(f'The river number {i} flows to the sea.'
                                              for i in range(300)))
  (tmp_path / 'vocab.txt').write_text('\n'.join(
      ['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]', 'the', 'to', '.']) + '\n')
  config = _config(source='seqio', text_files=str(tmp_path / 'text.txt'))
  with caplog.at_level(logging.WARNING):
    data_lib.make_mlm_iterator(config, batch_size=2, split='train', seed=0)
  assert '[UNK]' not in caplog.text   # bert-base-uncased fits English
  config.vocab_path = str(tmp_path / 'vocab.txt')
  with caplog.at_level(logging.WARNING):
    data_lib.make_mlm_iterator(config, batch_size=2, split='train', seed=0)
  assert re.search(r'\d+\.\d% of the tokens are \[UNK\].*Fix: --config.data.vocab_path',
                   caplog.text), caplog.text
  export_lib.export(TEXT, 'train', L, str(tmp_path / 'shards'), num_parts=1,
                    text_files=str(tmp_path / 'text.txt'), vocab_path=config.vocab_path)
  assert 'of the tokens are [UNK]' in capsys.readouterr().out
  # A share, not a count: the odd emoji in a large corpus is no reason to warn.
  assert blocks.unk_warning('corpus', 50, 1000) is None
  assert '5.1% of the tokens' in blocks.unk_warning('corpus', 51, 1000)


def test_a_directory_given_as_text_files_is_named_with_the_glob_to_use(tmp_path):
  """A directory (WikiText's instead of its file) was reported as ': empty corpus (all
  files are empty)': no name, and the wrong diagnosis."""
  corpus = tmp_path / 'wikitext-2'
  corpus.mkdir()
  (corpus / 'wiki.train.tokens').write_text('some text\n')
  for pattern in (str(corpus), f'{corpus}/'):
    with pytest.raises(DataError, match=re.escape(
        f"{pattern} is a directory, not text files. Fix: a glob of the files, such as "
        f"'{corpus}/*.txt'.")):
      sources.expand_patterns(pattern)
    with pytest.raises(DataError, match=f'{pattern} is a directory'):   # not just skipped
      sources.expand_patterns(f'{corpus}/*.tokens,{pattern}')
  (tmp_path / 'other').mkdir()
  with pytest.raises(DataError, match=re.escape(
      f'{tmp_path}/* matches only directories ({tmp_path}/other, {corpus})')):
    sources.expand_patterns(f'{tmp_path}/*')
  assert sources.expand_patterns(f'{tmp_path}/*/*.tokens') == [
      str(corpus / 'wiki.train.tokens')]


def test_a_compressed_text_file_is_named_as_such_not_sent_through_iconv(tmp_path):
  """A .gz corpus was 'not valid UTF-8 text. Fix: ... iconv -f latin1', which turns the
  compressed bytes into valid UTF-8 garbage that the next run trains on."""
  import bz2  # pylint: disable=import-outside-toplevel
  import gzip  # pylint: disable=import-outside-toplevel
  import lzma  # pylint: disable=import-outside-toplevel
  text = 'A line of text.\nAnother line.\n'.encode('utf-8')
  (tmp_path / 'wiki.txt.gz').write_bytes(gzip.compress(text))
  (tmp_path / 'wiki.txt.bz2').write_bytes(bz2.compress(text))
  (tmp_path / 'wiki.txt.xz').write_bytes(lzma.compress(text))
  (tmp_path / 'latin1.txt').write_bytes('caf\xe9 au lait\n'.encode('latin-1'))
  for name, said in (('wiki.txt.gz', 'is gzip-compressed, not text. Fix: decompress it '
                                     '(gunzip -k FILE)'),
                     ('wiki.txt.bz2', 'is bzip2-compressed'), ('wiki.txt.xz', 'is xz-compressed'),
                     ('latin1.txt', 'is not valid UTF-8 text. Fix: convert it, e.g. iconv')):
    with pytest.raises(DataError) as raised:
      data_lib.load_blocks(_config(source='seqio', text_files=str(tmp_path / name)), 'train')
    assert str(raised.value).startswith(f'{tmp_path / name} {said}'), str(raised.value)
    assert ('iconv' in str(raised.value)) == (name == 'latin1.txt')


def test_a_utf16_text_file_is_named_as_such_not_sent_through_latin1(tmp_path):
  """A file saved as Windows 'Unicode' (UTF-16 with its byte-order mark) was 'not valid
  UTF-8 text. Fix: ... iconv -f latin1', which turns it into valid UTF-8 text with a NUL
  after every letter, and Cyrillic or CJK letters into unrelated ASCII: trained on without
  a word by the next run."""
  text = 'Привет, мир.\nЕщё одна строка.\n'
  for name, encoding, said in (('le.txt', 'utf-16', 'UTF-16'), ('be.txt', 'utf-16-be', 'UTF-16'),
                               ('utf32.txt', 'utf-32', 'UTF-32')):
    data = text.encode(encoding)
    (tmp_path / name).write_bytes(data if data[:2] in (b'\xff\xfe', b'\xfe\xff')
                                  else '\ufeff'.encode(encoding) + data)
    with pytest.raises(DataError) as raised:
      data_lib.load_blocks(_config(source='seqio', text_files=str(tmp_path / name)), 'train')
    message = str(raised.value)
    assert message.startswith(f'{tmp_path / name} is {said} text'), message
    assert f'iconv -f {said.lower()} -t utf-8 FILE' in message and 'latin1' not in message, message


def _documents_read_whole(path):
  """The documents of a text file as the reader before streaming found them (the whole
  file in one string through TF's string ops, ~7x its size in memory): the reference."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  content = tf.io.read_file(path)
  valid = tf.strings.length(
      tf.strings.unicode_transcode(content, 'UTF-8', 'UTF-8', errors='ignore')
  ) == tf.strings.length(content)
  assert valid, path
  content = tf.strings.regex_replace(content, '\r\n?', '\n')
  content = tf.strings.strip(content)
  has_blank_line = tf.strings.regex_full_match(content, r'(?s).*\n[ \t]*\n.*')
  separated = tf.strings.regex_replace(content, r'\n[ \t]*\n\s*', '\x1e')
  documents = tf.cond(has_blank_line,
                      lambda: tf.strings.split(separated, '\x1e'),
                      lambda: tf.strings.split(content, '\n'))
  documents = tf.boolean_mask(documents, ~tf.strings.regex_full_match(documents, r'\s*'))
  return list(documents.numpy())


def _streamed_documents(path):
  return [d for batch, reason in sources._checked_documents(path.encode()) if not reason
          for d in batch]


def test_text_files_are_streamed_into_the_documents_a_whole_read_found(tmp_path, monkeypatch):
  """Random mixes of the whitespace the document rules turn on (blank lines of spaces and
  tabs, \\r\\n, a lone \\r, \\v, \\f, \\xa0, '\\x1e'), multi-byte text, files without a
  final newline, of one line, of whitespace only: the documents of the streaming reader
  are those of the whole-file one, also with chunks that cut '\\r\\n' and characters."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  atoms = ['word', 'b.', 'é', '日本', ' ', '  ', '\t', '\x0b', '\x0c', '\xa0', '\x1e', '\x85',
           '\n', '\n', '\n', '\r\n', '\r', '\n\n', '\n \t\n', '\n\t\n\n', '\r\n\r\n ']
  paths = []
  for i in range(200):
    text = ''.join(rng.choice(atoms, rng.choice([0, 1, 3, 10, 40, 120])))
    paths.append(str(tmp_path / f'{i}.txt'))
    pathlib.Path(paths[-1]).write_bytes(text.encode('utf-8'))
  expected = [_documents_read_whole(p) for p in paths]
  assert sum(map(len, expected)) > 1000 and sum(not d for d in expected) > 10
  assert [_streamed_documents(p) for p in paths] == expected
  for chunk in (1, 2, 5):   # cuts inside '\r\n' and inside characters
    monkeypatch.setattr(sources, '_READ_CHUNK', chunk)
    assert [_streamed_documents(p) for p in paths[:100]] == expected[:100]
  monkeypatch.setattr(sources, '_READ_CHUNK', 3)
  read = tf.data.Dataset.from_tensor_slices(paths).flat_map(sources._documents_of_file)
  assert list(read.as_numpy_iterator()) == [d for ds in expected for d in ds]


@pytest.mark.real_data
def test_wikitext_is_streamed_into_the_documents_a_whole_read_found():
  from tests import real_data  # pylint: disable=import-outside-toplevel
  for path in sorted((real_data.data_dir() / 'wikitext-2').glob('wiki.*.tokens')):
    expected = _documents_read_whole(str(path))
    assert len(expected) > 100
    assert _streamed_documents(str(path)) == expected, path


def test_a_text_file_is_not_read_whole(tmp_path, monkeypatch):
  """A text file was read whole (tf.io.read_file) and through whole-file string ops: ~7x
  its size in memory before its first document, so a corpus of one multi-GB file did not
  fit. A 50 MB file now takes what a 1 MB one takes."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  def read_whole(*args, **kwargs):
    raise AssertionError('tf.io.read_file: the file read whole')
  monkeypatch.setattr(tf.io, 'read_file', read_whole)
  (tmp_path / 'a.txt').write_text('First document.\n\nSecond one\non two lines.\n')
  dataset_fn = sources.text_files_dataset_fn(str(tmp_path / 'a.txt'), holdout_every=2)
  assert [d['text'] for d in dataset_fn('train', False).as_numpy_iterator()] == [
      b'Second one\non two lines.']
  line = 'A line of text, one document per line, as in a corpus of sentences.\n'
  rss = {}
  for name, size in (('1M', 1 << 20), ('50M', 50 << 20)):
    (tmp_path / f'{name}.txt').write_text(line * (size // len(line)))
    documents = iter(sources._documents_of_file(str(tmp_path / f'{name}.txt')))
    assert next(documents) == line.encode().strip()
    statm = pathlib.Path('/proc/self/statm').read_text().split()
    rss[name] = int(statm[1]) * os.sysconf('SC_PAGE_SIZE')   # while the file is read
    del documents
  # Measured: 131 MiB more for the 50 MB file read whole, ~9 MiB (at any size) streamed.
  assert rss['50M'] - rss['1M'] < (50 << 20) / 2, rss


def test_a_recursive_glob_is_refused_not_read_one_level_deep(tmp_path):
  """'/data/**/*.txt' (Python's, gsutil's recursive glob) matched one directory level in
  tf.io.gfile.glob: of three files only the one a level down was read, without a word."""
  import glob  # pylint: disable=import-outside-toplevel
  for name in ('a.txt', 'sub/b.txt', 'sub/deep/c.txt'):
    (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / name).write_text(f'text of {name}\n')
  pattern = f'{tmp_path}/**/*.txt'
  assert len(glob.glob(pattern, recursive=True)) == 3   # what the pattern means elsewhere
  with pytest.raises(DataError, match=re.escape(f"{pattern}: '**' does not recurse here")):
    sources.expand_patterns(f'{tmp_path}/*.txt,{pattern}')
  assert len(sources.expand_patterns(f'{tmp_path}/*.txt,{tmp_path}/*/*.txt,'
                                     f'{tmp_path}/*/*/*.txt')) == 3   # the fix it names


def test_a_corpus_of_many_files_is_listed_with_one_stat_each_in_parallel(tmp_path, monkeypatch):
  """Listing ran an isdir and a stat per file, one file after another, and the export's
  fingerprint stat-ed each again: on gs:// (a request each) thousands of files took minutes
  on every host and export worker. The fingerprint of the files must not change."""
  import threading  # pylint: disable=import-outside-toplevel
  import time  # pylint: disable=import-outside-toplevel
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  names = [f'part-{i:03d}.txt' for i in range(40)]
  for i, name in enumerate(names):
    (tmp_path / name).write_text('x' * i + '\n')
  pattern = f'{tmp_path}/*.txt'
  expected = hashlib.md5(''.join(f'{tmp_path / n}\0{i + 1}\n' for i, n in enumerate(names))
                         .encode()).hexdigest()[:12]
  calls, in_flight, most_in_flight, lock = [], [0], [0], threading.Lock()
  real_stat = tf.io.gfile.stat

  def slow_stat(path):   # a remote store: each answer takes a while
    with lock:
      calls.append(path)
      in_flight[0] += 1
      most_in_flight[0] = max(most_in_flight[0], in_flight[0])
    time.sleep(0.02)
    with lock:
      in_flight[0] -= 1
    return real_stat(path)
  monkeypatch.setattr(tf.io.gfile, 'stat', slow_stat)
  monkeypatch.setattr(tf.io.gfile, 'isdir', lambda path: pytest.fail(f'isdir({path})'))
  assert sources.files_fingerprint(pattern) == (
      f'40 files, {sum(range(1, 41)):,} bytes, md5 {expected}')
  assert sorted(calls) == [str(tmp_path / n) for n in names]   # once each
  assert most_in_flight[0] > 1


def test_overlapping_text_file_globs_read_each_file_once(tmp_path):
  """--config.data.text_files='/data/*.txt,/data/wiki1.txt' read wiki1.txt twice: its
  documents were trained on twice, and with the held-out split (document 0 is wiki1's
  first) its copy trained on the validation text."""
  for i in (1, 2, 3):
    (tmp_path / f'wiki{i}.txt').write_text(f'document {i} of the corpus\n')
  patterns = f'{tmp_path}/*.txt,{tmp_path}/wiki1.txt'
  assert sources.expand_patterns(patterns) == [str(tmp_path / f'wiki{i}.txt')
                                               for i in (1, 2, 3)]
  dataset_fn = sources.text_files_dataset_fn(patterns)
  text = {split: [d['text'].decode() for d in dataset_fn(split, False).as_numpy_iterator()]
          for split in ('train', 'validation')}
  assert text == {'train': ['document 2 of the corpus', 'document 3 of the corpus'],
                  'validation': ['document 1 of the corpus']}


def test_validation_files_that_the_training_glob_also_matches_are_refused(tmp_path):
  """--config.data.text_files='wiki.*.tokens' with validation_files=wiki.valid.tokens
  trained on the validation text, and the validation loss looked fine."""
  for split in ('train', 'valid', 'test'):
    (tmp_path / f'wiki.{split}.tokens').write_text(f'{split} text\n')
  valid = str(tmp_path / 'wiki.valid.tokens')
  with pytest.raises(DataError, match=re.escape(f'{valid}: in both the training files')):
    sources.text_files_dataset_fn(f'{tmp_path}/wiki.*.tokens', validation_patterns=valid)
  sources.text_files_dataset_fn(str(tmp_path / 'wiki.train.tokens'), validation_patterns=valid)
  sources.text_files_dataset_fn(f'{tmp_path}/wiki.*.tokens')   # held out from the files


def test_text_files_that_cannot_be_read_are_named_not_a_tensorflow_traceback(tmp_path,
                                                                            monkeypatch):
  """--config.data.text_files='gs://bucket/*.txt' offline, without credentials or without
  permission: TF's FailedPreconditionError/PermissionDeniedError ended the trainer and
  `bert_sym.shards export` in a traceback (the streaming path names the storage error)."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  (tmp_path / 'a.txt').write_text('some text\n')

  def refuse(path):
    raise tf.errors.PermissionDeniedError(None, None, f'403 Forbidden when reading {path}')
  for call in ('glob', 'stat'):
    with monkeypatch.context() as patch:
      patch.setattr(tf.io.gfile, call, refuse)
      pattern = f'{tmp_path}/*.txt'
      named = pattern if call == 'glob' else str(tmp_path / 'a.txt')
      with pytest.raises(DataError, match=re.escape(
          f'{named}: cannot be read (PermissionDeniedError: 403 Forbidden when reading '
          f'{named}): the storage did not answer or refused the read')):
        sources.expand_patterns(pattern)
  # A scheme TF has no file system for (here, whatever plugins are installed) is no read
  # refused: credentials would not help.
  def no_such_scheme(path):
    raise tf.errors.UnimplementedError(None, None, f"File system scheme 's3' not implemented "
                                       f"(file: '{path}')")
  monkeypatch.setattr(tf.io.gfile, 'glob', no_such_scheme)
  with pytest.raises(DataError, match=re.escape(
      's3://bucket/*.txt: tf.io.gfile, which reads text files, has no file system for '
      's3://. Fix: copy the files to a local path or gs://.')):
    sources.expand_patterns('s3://bucket/*.txt')


# From a mutation audit: each test fails with the rule it names broken.

def test_token_dtype_holds_every_id_of_the_vocabulary():
  """uint16 only when every id 0..V-1 fits (V <= 65536); a 65,537-token vocabulary needs
  int32, else id 65536 wraps to 0 ([PAD]) in the shards."""
  for vocab_size in (30522, 2**16, 2**16 + 1, 100_000, 2**17):
    dtype = blocks.token_dtype(vocab_size)
    top = np.array([vocab_size - 1], np.int64)
    assert int(top.astype(dtype)[0]) == vocab_size - 1, (vocab_size, dtype)
  assert blocks.token_dtype(2**16) == np.uint16


def test_an_id_equal_to_the_vocabulary_size_is_out_of_vocabulary():
  out = np.array([[1, 2, 3], [4, 10, 0], [9, 9, 9]])
  assert blocks.first_out_of_vocabulary(out, 10) == 1
  assert blocks.first_out_of_vocabulary(out, 11) is None
  assert blocks.first_out_of_vocabulary(out[[0, 2]], 10) is None


def _data_config(max_seq_len):
  config = common.base_config('tiny').data
  config.update(dict(max_seq_len=max_seq_len))
  return config


def test_load_packed_counts_the_non_padding_tokens_and_keys_on_the_length():
  """num_tokens (logged as the corpus size) is the count of non-[PAD] ids; packing the same
  corpus at two lengths in one process gives blocks of each length."""
  short = blocks.load_packed(_data_config(64), 'validation')
  long = blocks.load_packed(_data_config(128), 'validation')
  assert short.max_seq_len == 64 and long.max_seq_len == 128
  for packed in (short, long):
    every = packed.take(np.arange(len(packed)))
    pad = packed.special['pad']
    assert packed.num_tokens == int((every != pad).sum())
    assert (every == pad).any()          # the last block is padded: the count differs
  # the same token stream: each block adds [CLS] and [SEP] around its body
  body = lambda p: p.num_tokens - 2 * len(p)
  assert body(short) == body(long)


def _docs(pattern, split='train', holdout_every=1000):
  fn = sources.text_files_dataset_fn(pattern, holdout_every=holdout_every)
  return [ex['text'].decode() for ex in fn(split, shuffle_files=False).as_numpy_iterator()]


def test_a_stray_blank_line_in_a_file_of_one_document_per_line_is_warned_of(tmp_path, caplog):
  """One blank line in 2,000 one-line documents makes the file two documents of 1,000 lines
  (what the README's rule says), and the first, half the corpus, is held out for validation.
  Nothing said so; now one warning per file, however often it is read. A file in BERT's
  format (sentences per line, a blank line between documents) gets none."""
  stray = [f'Document {i} is one line of text.' for i in range(2000)]
  stray[1000] = ''
  (tmp_path / 'stray.txt').write_text('\n'.join(stray) + '\n')
  bert_format = '\n\n'.join('\n'.join(f'Sentence {j} of document {i}.' for j in range(30))
                             for i in range(50))
  (tmp_path / 'bert_format.txt').write_text(bert_format + '\n')
  # The README's threshold: documents averaging over 200 lines are warned of.
  for lines in (150, 250):
    (tmp_path / f'long_{lines}.txt').write_text('\n\n'.join(
        '\n'.join(f'Sentence {j} of document {i}.' for j in range(lines)) for i in range(3)))
  with caplog.at_level(logging.WARNING):
    assert len(_docs(str(tmp_path / 'stray.txt'), 'validation', holdout_every=100)) == 1
    assert len(_docs(str(tmp_path / 'stray.txt'), 'train', holdout_every=100)) == 1
    assert len(_docs(str(tmp_path / 'bert_format.txt'), 'train', holdout_every=100)) == 49
    for lines in (150, 250):
      assert len(_docs(str(tmp_path / f'long_{lines}.txt'), 'train', holdout_every=100)) == 2
  assert [r.getMessage().split(' is read')[0] for r in caplog.records
          if 'long_' in r.getMessage()] == [str(tmp_path / 'long_250.txt')]
  warned = [r.getMessage() for r in caplog.records if 'stray.txt' in r.getMessage()]
  assert warned == [f'{tmp_path / "stray.txt"} is read as documents separated by blank lines, '
                    'but its 1 blank-line gap(s) in 2000 lines make documents of 1000 lines on '
                    'average. If it holds one document per line, remove the blank lines: a '
                    'stray one makes a few huge documents, and one held out for validation '
                    '(every 100th across the files, unless validation_files are named) can '
                    'take a large share of the text.'], warned


def test_old_mac_cr_line_endings_split_like_lf(tmp_path):
  lines = [f'Document number {i} has some words.' for i in range(5)]
  (tmp_path / 'lf.txt').write_bytes(('\n'.join(lines) + '\n').encode())
  (tmp_path / 'cr.txt').write_bytes(('\r'.join(lines) + '\r').encode())
  (tmp_path / 'crlf.txt').write_bytes(('\r\n'.join(lines) + '\r\n').encode())
  for name in ('lf', 'cr', 'crlf'):
    # (document 0 is held out for validation: i % holdout_every == 0)
    assert _docs(str(tmp_path / f'{name}.txt')) == lines[1:], name
    assert _docs(str(tmp_path / f'{name}.txt'), 'validation') == lines[:1], name


def test_whitespace_only_lines_are_not_documents_and_do_not_shift_the_holdout(tmp_path):
  """A form-feed line (old text files) is not a document: it neither becomes one nor
  takes a place in the every-N-th hold-out count."""
  lines = [f'Line {i} of real text here.' for i in range(6)]
  with_ff = lines[:3] + ['\f'] + lines[3:]
  (tmp_path / 'a.txt').write_text('\n'.join(with_ff) + '\n')
  assert _docs(str(tmp_path / 'a.txt')) == lines[1:]
  # holdout_every=2: documents 0, 2, 4 validation (counted over real documents only)
  assert _docs(str(tmp_path / 'a.txt'), 'validation', 2) == lines[0::2]
  assert _docs(str(tmp_path / 'a.txt'), 'train', 2) == lines[1::2]


def test_wiki_markup_becomes_paragraphs_of_prose():
  """The embedded corpus's text: markup, headings and list markers gone, entities decoded,
  paragraphs under 4 words dropped (captions, template leftovers), and nothing from the
  back matter (See also, References) on."""
  markup = ("'''Foo''' is a small town in the  north &amp; east.\n\nIt has four words.\n\n"
            "Two words here.\n\n== History ==\n* Founded in 1850 by settlers\n\n"
            "== See also ==\n* [[Bar]] is another town nearby here\n")
  assert sources.wiki_to_text(markup) == ('Foo is a small town in the north & east.\n'
                                         'It has four words.\nFounded in 1850 by settlers')


def test_embedded_validation_is_the_md5_little_endian_tenth_of_titles():
  """The documented split rule, recomputed: md5(title)[:4] as a little-endian uint32 % 10
  == 0 is validation (pins the split so recorded validation losses stay comparable)."""
  articles = sources.embedded_articles()
  want = [t for title, t in articles
          if int.from_bytes(hashlib.md5(title.encode()).digest()[:4], 'little') % 10 == 0]
  assert sources.embedded_documents('validation') == want
  assert 0 < len(want) < len(articles)


@pytest.mark.parametrize('key,other', [('max_seq_len', 128), ('vocab_md5', 'f' * 32)])
def test_finalize_refuses_parts_of_different_exports(tmp_path, key, other):
  """Two workers started with different settings at once (no manifest yet to check against):
  finalize must not merge a 64-long part with a 128-long one, or two vocabularies."""
  split = tmp_path / 'train'
  for part in range(2):
    length = other if (key == 'max_seq_len' and part == 1) else 64
    writer = export_lib.PartWriter(str(split), part, 2, max_seq_len=length, dtype=np.uint16,
                                   pad_id=0, blocks_per_shard=4)
    writer.add(np.full((3, length), 5, np.uint16))
    info = dict(task='bert_sym_mlm_embedded', split='train', vocab_md5='a' * 32,
                vocab_size=30522, special_ids={'pad': 0})
    if key == 'vocab_md5' and part == 1:
      info['vocab_md5'] = other
    writer.close(**info)
  with pytest.raises(DataError, match=f'part 1 has {key}='):
    export_lib.finalize(str(tmp_path), 'train')
  assert not (split / 'metadata.json').exists()


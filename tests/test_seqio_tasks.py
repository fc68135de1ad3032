"""bert_sym.input.seqio_tasks (and blocks packing, sources): seqio registration,
packing against an independent Hugging Face reference, the tasks' masked examples,
text-file sources and their errors."""

import os

import numpy as np
import pytest

import seqio
import tensorflow as tf

from bert_sym.input import DataError  # pylint: disable=g-import-not-at-top
from bert_sym.input import blocks
from bert_sym.input import masking
from bert_sym.input import seqio_tasks as tasks
from bert_sym.input import sources

L = 128


@pytest.fixture(scope='module')
def vocabulary():
  return tasks.get_vocabulary()


@pytest.fixture(scope='module')
def validation_blocks():
  return np.stack(list(tasks.packed_blocks(tasks.EMBEDDED_TASK, 'validation', L)
                       .as_numpy_iterator()))


def test_tasks_are_registered_with_train_and_validation():
  for name in ('bert_sym_mlm_embedded', 'bert_sym_mlm_wikipedia', 'bert_sym_mlm_c4'):
    task = seqio.get_mixture_or_task(name)
    assert set(task.splits) == {'train', 'validation'}
    assert set(task.output_features) == set(masking.FEATURES)
  wiki = seqio.get_mixture_or_task('bert_sym_mlm_wikipedia').source
  assert isinstance(wiki, seqio.TfdsDataSource)
  assert wiki.tfds_dataset.name.startswith('wikipedia/20230601.en')
  assert seqio.get_mixture_or_task('bert_sym_mlm_c4').source.tfds_dataset.name.startswith('c4/en')


def test_seqio_client_reads_embedded_validation():
  dataset = seqio.get_mixture_or_task('bert_sym_mlm_embedded').get_dataset(
      sequence_length={'input_ids': L}, split='validation', shuffle=False)
  examples = list(dataset.take(50).as_numpy_iterator())
  assert len(examples) == 50
  for ex in examples:
    assert set(ex) == set(masking.FEATURES)
    assert all(v.shape == (L,) for v in ex.values())
    assert ex['mlm_weights'].dtype == np.float32 and ex['input_ids'].dtype == np.int32
    assert ex['input_ids'][0] == 101 and (ex['token_type_ids'] == 0).all()
    assert ex['mlm_weights'].sum() > 0


def test_packing_equals_hugging_face_reference(vocabulary, validation_blocks):
  """Independent reference: HF tokenisation, doc + [SEP], cut into [CLS] body [SEP]."""
  import transformers  # pylint: disable=import-outside-toplevel
  hf = transformers.BertTokenizerFast(vocab=vocabulary.path, do_lower_case=True)
  stream = []
  for doc in sources.embedded_documents('validation'):
    stream += hf(doc, add_special_tokens=False)['input_ids'] + [102]
  body = L - 2
  expected = []
  for start in range(0, len(stream), body):
    block = [101] + stream[start:start + body] + [102]
    expected.append(block + [0] * (L - len(block)))
  np.testing.assert_array_equal(validation_blocks, np.array(expected))


def _spec(vocabulary, **knobs):
  return masking.MaskSpec.from_vocab(vocabulary.tokens, vocabulary.special.as_dict(), **knobs)


@pytest.mark.parametrize('seed,knobs', [
    (0, {}),
    (12345, dict(whole_word=True, max_predictions=12)),
    (2**31 + 7, dict(mask_rate=0.4, max_predictions=80)),
])
def test_tf_data_masking_equals_numpy_masking(vocabulary, validation_blocks, seed, knobs):
  """The tf.data path gives each block its example index (above 2^32 too) and the seed.

  Two implementations of ours that must agree: the numpy one is checked against BERT's own
  create_masked_lm_predictions, independently written, in tests/test_masking_bert.py."""
  spec = _spec(vocabulary, **knobs)
  first = 3_000_000_000  # example indices above 2^32 use the high word of the counter
  tf_examples = list(tasks.mask_blocks_tf(
      tf.data.Dataset.from_tensor_slices(validation_blocks[:200]), seed, spec,
      first_index=first).as_numpy_iterator())
  np_examples = masking.mask_blocks(validation_blocks[:200],
                                    first + np.arange(200), seed, spec)
  for name in masking.FEATURES:
    np.testing.assert_array_equal(np.stack([e[name] for e in tf_examples]), np_examples[name])
  assert np_examples['mlm_weights'].sum() > 0


def test_task_dataset_equals_numpy_masking_of_packed_blocks(vocabulary, validation_blocks):
  dataset = seqio.get_mixture_or_task('bert_sym_mlm_embedded').get_dataset(
      sequence_length={'input_ids': L}, split='validation', shuffle=False)
  examples = list(dataset.as_numpy_iterator())
  expected = masking.mask_blocks(validation_blocks, np.arange(len(validation_blocks)), 0,
                                 _spec(vocabulary, max_predictions=masking.MAX_SEQ_LEN))
  assert len(examples) == len(validation_blocks)
  for name in masking.FEATURES:
    np.testing.assert_array_equal(np.stack([e[name] for e in examples]), expected[name])


def test_the_default_tasks_mask_15_percent_at_every_length(vocabulary):
  """No cap but the rate unless the config sets one: at seq 512 a block gets about 77
  predictions (a cap of 20, fine at 128, would silently cut the MLM signal by 4)."""
  length = 512
  dataset = seqio.get_mixture_or_task('bert_sym_mlm_embedded').get_dataset(
      sequence_length={'input_ids': length}, split='validation', shuffle=False)
  examples = list(dataset.take(4).as_numpy_iterator())
  packed = np.stack(list(tasks.packed_blocks(tasks.EMBEDDED_TASK, 'validation', length)
                         .take(4).as_numpy_iterator()))
  expected = masking.mask_blocks(packed, np.arange(4), 0,
                                 _spec(vocabulary, max_predictions=length))
  for name in masking.FEATURES:
    np.testing.assert_array_equal(np.stack([e[name] for e in examples]), expected[name])
  real_tokens = (packed != vocabulary.pad_id).sum(axis=1)
  np.testing.assert_array_equal(expected['mlm_weights'].sum(axis=1),
                                np.rint(0.15 * real_tokens))   # as BERT: [CLS], [SEP] count
  assert expected['mlm_weights'].sum(axis=1).min() > 70


def test_decoding_a_packed_block_keeps_every_document(vocabulary):
  """seqio's decode stops at eos_id: BERT has none ([SEP] ends documents inside blocks)."""
  ids = [vocabulary.special.cls, *vocabulary.encode('first'), vocabulary.special.sep,
         *vocabulary.encode('second'), vocabulary.special.sep]
  assert 'second' in vocabulary.decode(ids)


def test_a_registered_tasks_masking_knobs_reach_its_dataset(tmp_path, vocabulary):
  """register_text_files_task(mask_seed=, whole_word=, mask_rate=, max_predictions=): the
  task's examples are the numpy masking of its packed blocks with those knobs."""
  (tmp_path / 'a.txt').write_text('\n'.join(
      f'Sentence {i} about unbelievably long hyphenated words.' for i in range(60)))
  knobs = dict(mask_rate=0.3, whole_word=True, max_predictions=7)
  tasks.register_text_files_task('test_knobs', str(tmp_path / 'a.txt'), mask_seed=5, **knobs)
  examples = list(seqio.get_mixture_or_task('test_knobs').get_dataset(
      sequence_length={'input_ids': 32}, split='train', shuffle=False).as_numpy_iterator())
  packed = np.stack(list(tasks.packed_blocks('test_knobs', 'train', 32).as_numpy_iterator()))
  expected = masking.mask_blocks(packed, np.arange(len(packed)), 5, _spec(vocabulary, **knobs))
  assert len(examples) == len(packed) > 3
  for name in masking.FEATURES:
    np.testing.assert_array_equal(np.stack([e[name] for e in examples]), expected[name])
  assert expected['mlm_weights'].sum(axis=1).max() == 7


def test_shards_of_a_task_read_through_seqio_are_masked_independently(tmp_path, vocabulary):
  """A seqio client that reads a task in shards (t5x's multi-host input: get_dataset with
  a ShardInfo per host) numbers each shard's blocks from 0. Were the mask a function of
  (seed, that index) alone, the k-th block of every shard would be masked at the same
  positions with the same 80/10/10 draws; keyed by the block's ids too, the two shards'
  same-index blocks share masked positions no more than chance allows."""
  rng = np.random.default_rng(0)
  words = [t for t in vocabulary.tokens if t.isalpha() and t.isascii() and len(t) > 2]
  (tmp_path / 'words.txt').write_text('\n'.join(
      ' '.join(rng.choice(words, rng.integers(20, 60))) for _ in range(400)))
  task = tasks.register_text_files_task('test_seqio_shards', str(tmp_path / 'words.txt'))

  def shard(index):
    return list(task.get_dataset(sequence_length={'input_ids': 64}, split='train',
                                 shuffle=False, shard_info=seqio.ShardInfo(index, 2))
                .as_numpy_iterator())

  pairs = [(a, b) for a, b in zip(shard(0), shard(1))
           if (a['attention_mask'] == 1).all() and (b['attention_mask'] == 1).all()]
  assert len(pairs) > 100
  assert not any(np.array_equal(a['mlm_targets'], b['mlm_targets']) for a, b in pairs)
  same_position = [a['mlm_weights'] @ b['mlm_weights'] / a['mlm_weights'].sum()
                   for a, b in pairs]
  assert np.mean(same_position) < 0.25   # chance: about 0.15 of a block's masked positions
  identical = sum(np.array_equal(a['mlm_weights'], b['mlm_weights']) for a, b in pairs)
  assert identical == 0, f'{identical} of {len(pairs)} same-index pairs masked alike'


def test_sequence_length_over_the_pipelines_maximum_is_an_error():
  with pytest.raises(DataError, match=r'max_seq_len=513 is outside \[3, 512\], the block '
                                     'lengths the input pipeline'):
    seqio.get_mixture_or_task('bert_sym_mlm_embedded').get_dataset(
        sequence_length={'input_ids': 513}, split='validation', shuffle=False)


# ----------------------------------------------------------------------------------------
# Text files.
# ----------------------------------------------------------------------------------------

def _documents(name, split):
  return [ex['text'].decode() for ex in
          seqio.get_mixture_or_task(name).source.get_dataset(split=split, shuffle=False)
          .as_numpy_iterator()]


def test_text_files_one_per_line_and_blank_line_separated(tmp_path):
  (tmp_path / 'a.txt').write_text('First doc.\nSecond doc.\n\n')
  (tmp_path / 'b.txt').write_text('Third doc,\nstill third.\n\n  \nFourth doc.\r\n\r\nFifth.')
  (tmp_path / 'c.txt').write_text('Sixth.\nSeventh.')
  tasks.register_text_files_task('test_text_files', f'{tmp_path}/a.txt,{tmp_path}/[bc].txt',
                                 holdout_every=3)
  # a.txt's only blank line is at its end (as `echo >> a.txt` leaves it): one document per
  # line still. It made the whole file one document, and with a single such file that
  # document was held out: all of it in validation, none in training.
  # b.txt has blank lines between its lines of text: blank-line separated.
  everything = ['First doc.', 'Second doc.', 'Third doc,\nstill third.', 'Fourth doc.',
                'Fifth.', 'Sixth.', 'Seventh.']
  assert _documents('test_text_files', 'validation') == everything[0::3]
  assert _documents('test_text_files', 'train') == [d for i, d in enumerate(everything)
                                                   if i % 3]


def test_text_files_with_separate_validation_files(tmp_path):
  """WikiText style: train.tokens and valid.tokens, each read whole (no hold-out)."""
  (tmp_path / 'train.txt').write_text('T1.\nT2.\nT3.\n')
  (tmp_path / 'valid.txt').write_text('V1.\nV2.\n')
  from configs import common  # pylint: disable=import-outside-toplevel
  config = common.base_config('tiny').data
  config.task, config.text_files = tasks.TEXT_FILES_TASK, str(tmp_path / 'train.txt')
  config.validation_files = str(tmp_path / 'valid.txt')
  name = tasks.task_for_config(config)
  assert _documents(name, 'train') == ['T1.', 'T2.', 'T3.']
  assert _documents(name, 'validation') == ['V1.', 'V2.']
  config.validation_files = str(tmp_path / 'nope*.txt')
  with pytest.raises(DataError, match=r'nope\*\.txt: no such file'):
    tasks.task_for_config(config)


def test_text_files_task_from_config_value(tmp_path):
  from configs import common  # pylint: disable=import-outside-toplevel
  (tmp_path / 'x.txt').write_text('\n'.join(f'Sentence number {i}.' for i in range(300)))
  config = common.base_config('tiny').data
  config.task, config.text_files = tasks.TEXT_FILES_TASK, str(tmp_path / '*.txt')
  name = tasks.task_for_config(config)
  blocks = list(tasks.packed_blocks(name, 'validation', 16).as_numpy_iterator())
  assert blocks and all(b.shape == (16,) for b in blocks)


def test_documents_of_no_token_add_no_separator(tmp_path, vocabulary):
  """A line of no-break spaces or control characters is not blank to RE2's \\s, so it
  reaches the tokenizer as a document, which gives it no token: it must add no [SEP] (a
  stray [SEP][SEP] pair), as Hugging Face's tokens of the same lines show."""
  import transformers  # pylint: disable=import-outside-toplevel
  lines = ['First document here.', '\u00a0\u00a0', '\x07\x07', 'Second one.',
           '\u200b', 'Third.']
  (tmp_path / 'train.txt').write_text('\n'.join(lines), encoding='utf-8')
  (tmp_path / 'valid.txt').write_text('Held out.\n', encoding='utf-8')
  from configs import common  # pylint: disable=import-outside-toplevel
  config = common.base_config('tiny').data
  config.task, config.text_files = tasks.TEXT_FILES_TASK, str(tmp_path / 'train.txt')
  config.validation_files = str(tmp_path / 'valid.txt')
  name = tasks.task_for_config(config)
  got = np.stack(list(tasks.packed_blocks(name, 'train', 32).as_numpy_iterator()))
  hf = transformers.BertTokenizerFast(vocab=vocabulary.path, do_lower_case=True)
  stream = []
  for line in lines:
    ids = hf(line, add_special_tokens=False)['input_ids']
    stream += ids + [102] if ids else []
  assert len(stream) < 30   # one block
  np.testing.assert_array_equal(got, [[101] + stream + [102] + [0] * (30 - len(stream))])


def _long_documents():
  """Ordinary documents and ones of many pieces at _MAX_PIECE_BYTES=1000: prose with
  multi-byte letters, runs without whitespace cut at punctuation or between CJK
  ideographs, words of thousands of letters (1-3 bytes each, cut inside), and long
  documents whose last pieces, or all of them, give no token."""
  prose = ' '.join(sources.embedded_documents('validation')[0].split()[:800])
  return ['A short first document.', prose + ' Café naïve 東京 привет.\nNext paragraph.',
          'Second short one.', 'ab+cd=' * 400 + 'abcdefgh…' * 300,
          '東京タワー北京大学' * 200 + ' end',
          'start ' + 'x' * 3500 + ' middle ' + 'б' * 2001 + ', ' + 'ー' * 1500 + ' end',
          'word ' * 300 + '\x07' * 2500, '\x07 \u200b' * 1000, 'Last document.']


def test_long_documents_are_tokenised_in_pieces_as_hugging_face_does_whole(monkeypatch,
                                                                            vocabulary):
  """Documents over _MAX_PIECE_BYTES are cut into pieces, spread over tokenizer batches
  here (4 pieces a call): the blocks are those of Hugging Face's ids of each whole
  document, [SEP] after each document that has any."""
  import transformers  # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(blocks, '_MAX_PIECE_BYTES', 1000, raising=False)
  monkeypatch.setattr(blocks, '_DOCS_PER_TOKENIZE_CALL', 4)
  # Stretches of a piece without a word end that hold characters the normalisation
  # deletes (NULs, zero-width spaces, stacked marks) are not cut; the four characters whose
  # NFD is punctuation plus a deleted mark end words.
  documents = _long_documents() + [
      '\x00' * 1200 + 'a' * 500, 'header' + '\x00' * 2500 + 'payload',
      'abc' + '\u200b' * 600 + 'def', 'x ' + ''.join('a' + '\u0301' * 20 for _ in range(60)),
      'abcd\u2260' * 300, 'abc\u1fef' * 400 + 'ab\u226e' * 300 + 'ab\u226f' * 300]
  got = np.stack(list(blocks.packed_blocks(
      tf.data.Dataset.from_tensor_slices({'text': documents}), L, vocabulary)
                      .as_numpy_iterator()))
  hf = transformers.BertTokenizerFast(vocab=vocabulary.path, do_lower_case=True)
  stream = []
  for doc in documents:
    ids = hf(doc, add_special_tokens=False)['input_ids']
    stream += ids + [102] if ids else []
  assert stream.count(100) == 4   # the words of x, б, ー and NULs + a: one [UNK] each
  body = L - 2
  expected = [[101] + stream[i:i + body] + [102] for i in range(0, len(stream), body)]
  expected[-1] += [0] * (L - len(expected[-1]))
  np.testing.assert_array_equal(got, np.array(expected))


def test_the_tokenizer_never_sees_more_than_a_piece_of_a_long_document(monkeypatch,
                                                                       vocabulary):
  """Tokenising takes ~40x its text in memory: a corpus of one 20 MB line peaked at 1.6 GB
  (one of GBs ran out of memory). Each string the tokenizer gets is at most a piece, and
  whole characters (a word cut in the middle is cut between two)."""
  monkeypatch.setattr(blocks, '_MAX_PIECE_BYTES', 1000, raising=False)

  class Bounded:
    special = vocabulary.special

    def encode_tf(self, texts):
      longest = tf.reduce_max(tf.strings.length(texts))
      with tf.control_dependencies([tf.debugging.assert_less_equal(longest, 1000)]):
        return vocabulary.encode_tf(   # (fails on a string that is not UTF-8)
            tf.strings.unicode_transcode(texts, 'UTF-8', 'UTF-8', errors='strict'))

  # (Not the document ending in 2,500 BELs, which the normalisation deletes: a stretch
  # without a word end that holds such characters is not cut.)
  documents = tf.data.Dataset.from_tensor_slices(
      {'text': [d for d in _long_documents() if '\x07' * 2500 not in d]})
  assert len(list(blocks.packed_blocks(documents, L, Bounded()).as_numpy_iterator())) > 10


_CUT_BESIDE_AN_UNCUTTABLE_DOCUMENT = """
import resource
import tensorflow as tf
from bert_sym.input import blocks
blocks._MAX_PIECE_BYTES = 1000
uncuttable = 'x' * 500 + '\\x00' + 'x' * 600 + 'z' * 500_000   # no word end, a NUL
other = 'ab ' * 100_000   # ~300 pieces, one a loop step
for texts in ([other], [uncuttable, other]):   # the peak rises only past the first's
  pieces, last, _ = blocks._cut_into_pieces(tf.constant(texts))
  assert b''.join(pieces.numpy()) == ''.join(texts).encode()
  print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
"""


def test_a_document_left_whole_is_not_copied_while_others_are_cut():
  """A document that cannot be cut (no word end in a stretch that holds a NUL) is one
  piece; its rest was written again at every later step of the batch's loop, while the
  others were cut: a 16 MB one beside a 16 MB one of ordinary text took ~16 GB. Beside a
  0.5 MB one, the peak is that of cutting the other alone (the old code: +288 MiB)."""
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  done = subprocess.run([sys.executable, '-c', _CUT_BESIDE_AN_UNCUTTABLE_DOCUMENT],
                        capture_output=True, text=True, timeout=300,
                        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3'))
  assert done.returncode == 0, done.stderr[-3000:]
  alone, beside = map(int, done.stdout.split()[-2:])   # peak RSS, MiB
  assert beside < alone + 100, (alone, beside)


def test_a_broken_symbolic_link_in_a_glob_is_named_as_such(tmp_path):
  """A dangling link matched by the glob was blamed on the storage ("did not answer or
  refused the read (network, credentials, permissions)"), which sent users to their
  credentials; it is a file that does not exist."""
  (tmp_path / 'a.txt').write_text('Hello world.\nSecond line.\n')
  (tmp_path / 'b.txt').symlink_to(tmp_path / 'nowhere.txt')
  with pytest.raises(DataError, match=r'b\.txt: does not exist \(a missing bucket or folder, '
                     r'a broken symbolic link, or a file deleted since it was listed\)\. Fix: '
                     r'correct the path, or remove the link') as error:
    sources.expand_patterns(str(tmp_path / '*.txt'))
  assert 'credentials' not in str(error.value)


def test_text_file_errors_name_the_file(tmp_path):
  with pytest.raises(DataError, match=r'missing\*\.txt: no such file'):
    sources.expand_patterns(str(tmp_path / 'missing*.txt'))
  (tmp_path / 'empty.txt').write_text('')
  with pytest.raises(DataError, match='empty.txt: empty corpus'):
    sources.expand_patterns(str(tmp_path / 'empty.txt'))
  (tmp_path / 'latin1.txt').write_bytes('Un café noir.\n'.encode('latin-1'))
  tasks.register_text_files_task('test_bad_utf8', str(tmp_path / 'latin1.txt'))
  with pytest.raises(DataError, match='latin1.txt.*not valid UTF-8') as error:
    list(blocks.numpy_blocks(tasks.packed_blocks('test_bad_utf8', 'train', 32),
                             'test_bad_utf8'))
  # One sentence with the fix, not TF's iterator dump.
  assert 'Iterator' not in str(error.value) and 'iconv' in str(error.value)
  assert '\n' not in str(error.value)


def test_trainer_reads_the_registered_seqio_task(tmp_path):
  """source='seqio' packs the registered task's DataSource (what bert_sym.train passes):
  a task registered under any name is read, and the built-in tasks give the same batches
  as reading their documents directly."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from bert_sym.input import iterator  # pylint: disable=g-import-not-at-top
  corpus = tmp_path / 'mine.txt'
  corpus.write_text('\n'.join(f'sentence number {i} about apples and pears.' for i in range(300)))
  tasks.register_text_files_task('my_registered_task', str(corpus))
  config = ml_collections.ConfigDict(dict(
      source='seqio', task='my_registered_task', text_files='', validation_files='',
      vocab_path='', max_seq_len=32, max_predictions_per_seq=5, mask_rate=0.15,
      whole_word_masking=False, shuffle=True))
  take = lambda **kw: next(iterator.make_mlm_iterator(config, batch_size=4, split='train',
                                                      seed=0, process_index=0,
                                                      process_count=1, **kw))
  batch = take(documents=tasks.task_documents)
  assert batch['input_ids'].shape == (4, 32)
  with pytest.raises(DataError, match='my_registered_task'):   # not readable without seqio
    take()
  config.task = tasks.EMBEDDED_TASK
  through_seqio, direct = take(documents=tasks.task_documents), take()
  for key in direct:
    np.testing.assert_array_equal(through_seqio[key], direct[key])


def test_a_task_registered_with_another_vocabulary_is_refused_not_retokenised(tmp_path):
  """A task registered with its own vocab.txt was tokenised by the trainer with
  config.data.vocab_path (bert-base-uncased ids up to 28k for a 2,000-token model) without
  a word; now it names both vocabularies and the flag that agrees with the task."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from bert_sym.input import tokenizer  # pylint: disable=g-import-not-at-top
  corpus = tmp_path / 'mine.txt'
  corpus.write_text('\n'.join(f'sentence number {i} about apples.' for i in range(300)))
  small_vocab = tmp_path / 'vocab.txt'
  small_vocab.write_text('\n'.join(list(tokenizer.WordPiece('').tokens)[:2000]) + '\n')
  tasks.register_text_files_task('task_with_its_own_vocab', str(corpus),
                                 vocab_path=str(small_vocab))
  config = ml_collections.ConfigDict(dict(task='task_with_its_own_vocab', vocab_path=''))
  with pytest.raises(DataError, match=rf'--config.data.vocab_path={small_vocab}\.'):
    tasks.task_documents(config, 'train')
  config.vocab_path = str(small_vocab)   # agreeing: read
  assert next(iter(tasks.task_documents(config, 'train')))['text']
  # The built-in tasks are registered with the default vocabulary, which says nothing: their
  # text is the trainer's with any vocab.txt (these were refused, naming bert-base-uncased).
  config.task = tasks.EMBEDDED_TASK
  source = seqio.get_mixture_or_task(tasks.EMBEDDED_TASK).source
  theirs = source.get_dataset(split='train', shuffle=False).take(3)
  ours = tasks.task_documents(config, 'train').take(3)
  assert [d['text'] for d in ours.as_numpy_iterator()] == [
      d['text'] for d in theirs.as_numpy_iterator()]


# From a mutation audit: each test fails with the rule it names broken.

def test_documents_parts_partition_a_function_source(tmp_path):
  """Parts of a text-files task are disjoint and together the whole split, in order
  (export with num_parts > 1 would otherwise repeat the corpus once per part)."""
  lines = [f'Document {i} with a few words.' for i in range(1, 40)]
  (tmp_path / 'a.txt').write_text('Held out one.\n' + '\n'.join(lines) + '\n')
  tasks.register_text_files_task('bert_sym_test_parts', str(tmp_path / 'a.txt'))
  read = lambda part, n: [e['text'].decode() for e in
                          tasks.documents('bert_sym_test_parts', 'train', part, n).as_numpy_iterator()]
  whole = read(0, 1)
  assert whole == lines
  parts = [read(p, 3) for p in range(3)]
  assert sum(map(len, parts)) == len(whole)
  assert sorted(sum(parts, [])) == sorted(whole)
  assert parts[0] == whole[0::3]


def test_documents_parts_of_a_tfds_task_are_its_files_shards(monkeypatch):
  """A TFDS corpus (C4, Wikipedia) is split into parts by seqio's ShardInfo, part `part` of
  `num_parts` (not part 0 every time: the export would hold that slice num_parts times)."""
  asked = []

  def get_dataset(self, split, shuffle, shard_info=None, **kwargs):
    del self, kwargs
    asked.append((split, shuffle, shard_info))
    return tf.data.Dataset.from_tensor_slices({'text': ['a document']})

  monkeypatch.setattr(seqio.TfdsDataSource, 'get_dataset', get_dataset)
  tasks.documents('bert_sym_mlm_c4', 'train', 3, 8)
  assert asked == [('train', False, seqio.ShardInfo(index=3, num_shards=8))]


def test_mlm_features_of_two_lengths_are_refused():
  with pytest.raises(ValueError, match='share one length'):
    tasks._max_seq_len({'input_ids': 128, 'mlm_targets': 64})  # pylint: disable=protected-access
  assert tasks._max_seq_len({'input_ids': 128, 'mlm_targets': 128}) == 128  # pylint: disable=protected-access


def test_vocabularies_of_different_files_are_not_equal(tmp_path):
  tokens = ['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]', 'hello']
  a, b = tmp_path / 'a.txt', tmp_path / 'b.txt'
  a.write_text('\n'.join(tokens) + '\n')
  b.write_text('\n'.join(tokens + ['world']) + '\n')
  va, vb = tasks.get_vocabulary(str(a)), tasks.get_vocabulary(str(b))
  assert va != vb and va == tasks.BertWordPieceVocabulary(str(a))

"""bert_sym.input.tokenizer: the rebuilt bert-base-uncased vocab, user vocabs, and the TF
tokeniser (WordPiece, and the seqio Vocabulary over it) checked against Hugging Face's
BertTokenizerFast (an independent implementation)."""

import hashlib
import logging
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from bert_sym import cli
from bert_sym.input import sources as corpus
from bert_sym.input import tokenizer as vocab_lib
from tests import real_data

# More real text when the real-size data is there (tests/real_data.py).
WIKITEXT = real_data.data_dir() / 'wikitext-2' / 'wiki.valid.tokens'
REPO_ROOT = str(pathlib.Path(__file__).resolve().parents[1])


def test_default_vocab_is_bert_base_uncased():
  path = vocab_lib.default_vocab_file()
  data = pathlib.Path(path).read_bytes()
  assert hashlib.md5(data).hexdigest() == '64800d5d8528ce344256daf115d4965e'
  tokens = vocab_lib.read_vocab(path)
  assert len(tokens) == 30522
  assert vocab_lib.special_ids(tokens, path) == vocab_lib.SpecialIds(
      pad=0, unk=100, cls=101, sep=102, mask=103)
  assert tokens[1996] == 'the' and tokens[29612] == '##!'


def test_default_vocab_rebuilds_atomically(tmp_path, monkeypatch):
  monkeypatch.setenv('BERT_SYM_CACHE', str(tmp_path))
  vocab_lib.default_vocab_file.cache_clear()
  try:
    path = pathlib.Path(vocab_lib.default_vocab_file())
    assert path.parent == tmp_path
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp file left
    path.write_text('corrupted\n')  # a damaged cache is rebuilt, not trusted
    vocab_lib.default_vocab_file.cache_clear()
    assert vocab_lib.vocab_md5(vocab_lib.default_vocab_file()) == vocab_lib.BERT_BASE_UNCASED_MD5
  finally:
    vocab_lib.default_vocab_file.cache_clear()


def _write_vocab(path, tokens):
  path.write_text('\n'.join(tokens) + '\n', encoding='utf-8')
  return str(path)


def test_user_vocab_special_ids_are_looked_up(tmp_path):
  tokens = ['[UNK]', 'a', '[SEP]', '[CLS]', '[PAD]', '##b', '[MASK]']
  path = _write_vocab(tmp_path / 'vocab.txt', tokens)
  assert vocab_lib.special_ids(vocab_lib.read_vocab(path), path) == vocab_lib.SpecialIds(
      pad=4, unk=0, cls=3, sep=2, mask=6)


@pytest.mark.parametrize('missing', ['[MASK]', '[CLS]', '[SEP]', '[PAD]'])
def test_vocab_without_special_token_is_a_clear_error(tmp_path, missing):
  tokens = [t for t in ['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]', 'a'] if t != missing]
  path = _write_vocab(tmp_path / 'my_vocab.txt', tokens)
  with pytest.raises(vocab_lib.VocabError, match=rf'my_vocab\.txt.*lacks \{missing}'):
    vocab_lib.special_ids(vocab_lib.read_vocab(path), path)


def test_a_repeated_token_is_named_with_its_lines_and_is_a_user_error(tmp_path):
  """TF's lookup table failed on it with a FailedPreconditionError traceback (an
  upper-cased copy of bert-base-uncased repeats 'I', 'SS', ...)."""
  path = _write_vocab(tmp_path / 'dup.txt', ['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]',
                                             'the', 'of', 'the'])
  with pytest.raises(vocab_lib.VocabError, match=r"dup.txt: token 'the' appears on lines 6 "
                                                 r"and 8.*Fix: remove the repeat"):
    vocab_lib.read_vocab(path)
  assert issubclass(vocab_lib.VocabError, cli.UserError)   # one line on every command line


def test_missing_and_non_utf8_vocab_files(tmp_path):
  with pytest.raises(vocab_lib.VocabError, match='nope.txt: cannot read'):
    vocab_lib.read_vocab(str(tmp_path / 'nope.txt'))
  bad = tmp_path / 'latin1.txt'
  bad.write_bytes(b'[PAD]\ncaf\xe9\n')
  with pytest.raises(vocab_lib.VocabError, match='latin1.txt: vocab file is not valid UTF-8'):
    vocab_lib.read_vocab(str(bad))


def test_a_byte_order_mark_is_named_not_taken_for_a_missing_pad(tmp_path):
  """A vocab.txt saved with a BOM: the first token read as '\ufeff[PAD]', and the error
  asked to add a [PAD] line that is there."""
  bom = tmp_path / 'bom.txt'
  bom.write_bytes(b'\xef\xbb\xbf[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\nthe\n')
  with pytest.raises(vocab_lib.VocabError, match='bom.txt: vocab file starts with a UTF-8 '
                                                 'byte-order mark'):
    vocab_lib.read_vocab(str(bom))


# ----------------------------------------------------------------------------------------
# TF tokeniser (imports TF: kept to the tests below).
# ----------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def tf_vocab():
  """The seqio Vocabulary (over `WordPiece`)."""
  from bert_sym.input import seqio_tasks  # pylint: disable=import-outside-toplevel
  return seqio_tasks.get_vocabulary()


def _real_sentences() -> list[str]:
  """A few thousand real sentences: embedded Wikipedia (+ wikitext-2 when available)."""
  lines = []
  for text in corpus.embedded_documents('validation') + corpus.embedded_documents('train')[:20]:
    for paragraph in text.split('\n'):
      lines.extend(s + '.' for s in paragraph.split('. ') if s.strip())
  if WIKITEXT.exists():
    lines += [l.strip() for l in WIKITEXT.read_text(encoding='utf-8').splitlines()
              if l.strip()]
  return lines


TRICKY = [
    'Café naïve façade ﬁnance Straße ÅNGSTRÖM İstanbul ΣΑΣ ὈΔΥΣΣΕΎΣ',
    '東京タワー 北京大学 한국어 emoji 😀 x\u200bzero\u00adsoft-hyphen',
    'tab\tnew\nline\r\x00nul \ufffd replacement \x07 bell \u2028 sep\u2029 \x85 \ue000 \x0b',
    # (HF would also match literal '[UNK]' etc. as added tokens; raw text never holds them.)
    'a' * 150 + ' overlong words become unknown',
    # Hugging Face's limit counts characters, not UTF-8 bytes: 51-100 letters of 2 or 3
    # bytes each are pieces, 101 are [UNK].
    'б' * 51 + ' ' + 'α' * 70 + ' ' + 'ก' * 40 + ' ' + 'привет' * 14 + ' ' + 'б' * 101,
    'a' * 100 + ' ' + 'a' * 101 + ' 東' + 'ー' * 100,
    "don't U.S.A. $3.50 -- em—dash «quotes» ‘single’ … ellipsis",
]


def test_tokenizer_matches_hugging_face(tf_vocab):
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  lines = _real_sentences() + TRICKY
  assert len(lines) > 3000
  # transformers>=5 takes the vocab file as `vocab`; older versions as `vocab_file`.
  hf = transformers.BertTokenizerFast(vocab=tf_vocab.path, do_lower_case=True)
  if len(hf) != 30522:
    hf = transformers.BertTokenizerFast(vocab_file=tf_vocab.path, do_lower_case=True)
  assert len(hf) == 30522
  expected = hf(lines, add_special_tokens=False)['input_ids']
  got = tf_vocab.encode_tf(tf.constant(lines)).to_list()
  # GLUE's entry point: the same WordPiece, eagerly.
  assert [ids.tolist() for ids in vocab_lib.WordPiece().encode(lines)] == got
  mismatches = [(l, hf.convert_ids_to_tokens(e), hf.convert_ids_to_tokens(g))
                for l, e, g in zip(lines, expected, got) if e != g]
  assert not mismatches, mismatches[:3]
  assert sum(map(len, got)) > 100_000


def test_encode_decode_scalar(tf_vocab):
  ids = tf_vocab.encode('Hello, World! Unaffable.')
  assert ids == [7592, 1010, 2088, 999, 14477, 20961, 3468, 1012]
  assert tf_vocab.decode(ids) == 'hello , world ! unaffable .'
  assert tf_vocab.vocab_size == 30522 and tf_vocab.pad_id == 0 and tf_vocab.eos_id is None


def test_remote_vocab_path_goes_through_gfile(tmp_path):
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  tokens = ['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]', 'hello', '##s']
  path = 'ram://bert_sym_test/vocab.txt'  # an in-memory tf.io.gfile file system
  with tf.io.gfile.GFile(path, 'w') as f:
    f.write('\n'.join(tokens) + '\n')
  from bert_sym.input import seqio_tasks  # pylint: disable=import-outside-toplevel
  vocabulary = seqio_tasks.get_vocabulary(path)
  assert vocabulary.tokens == tokens and vocabulary.special.mask == 4
  assert vocabulary.encode('Hellos bye') == [5, 6, 1]


def test_a_cased_vocabulary_is_refused_before_anything_is_tokenised(tmp_path):
  """A vocab.txt trained on cased text (as bert-base-cased, 'The' beside 'the') was taken
  without a word: the tokenizer lower-cases, so its capitalised rows were never produced
  (0% [UNK], no warning) and 'London' was lower-case pieces where Hugging Face's cased
  tokenizer of the same file gives the token 'London'."""
  import ml_collections  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  from bert_sym.input import blocks, seqio_tasks  # pylint: disable=import-outside-toplevel
  uncased = vocab_lib.read_vocab(vocab_lib.default_vocab_file())
  words = [t for t in uncased[1996:4000] if t.isalpha() and t != 'london']
  cased = _write_vocab(tmp_path / 'cased.txt', uncased + [w.title() for w in words] +
                       ['London', 'café'])
  hf = transformers.BertTokenizerFast(vocab=cased, do_lower_case=False)
  assert hf.tokenize('The London café') == ['The', 'London', 'café']
  (tmp_path / 'text.txt').write_text('The London café.\n' * 3, encoding='utf-8')
  config = ml_collections.ConfigDict(dict(
      task=corpus.TEXT_FILES_TASK, text_files=str(tmp_path / 'text.txt'),
      validation_files='', max_seq_len=32, vocab_path=cased))
  refused = r"cased.txt: \d+ of its \d+ tokens .* hold upper-case letters or accents"
  with pytest.raises(vocab_lib.VocabError, match=refused):
    blocks.load_packed(config, 'train')             # the trainer
  with pytest.raises(vocab_lib.VocabError, match=refused):
    seqio_tasks.get_vocabulary(cased)               # the export and seqio tasks
  vocab_lib.check_uncased(uncased, 'bert-base-uncased')   # not a false alarm
  accented = _write_vocab(tmp_path / 'accented.txt', uncased + [w + 'é' for w in words])
  with pytest.raises(vocab_lib.VocabError, match='accented.txt'):
    vocab_lib.check_uncased(vocab_lib.read_vocab(accented), accented)


# From a mutation audit: each test fails with the rule it names broken.

def test_a_vocab_txt_with_windows_line_endings_reads_like_hugging_face(tmp_path):
  """A vocab.txt saved with CRLF: the tokens are those of the LF file (Hugging Face reads
  it in text mode, universal newlines), so [PAD] etc. are found and ids agree."""
  import transformers  # pylint: disable=import-outside-toplevel
  tokens = ['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]', 'hello', '##s', 'world']
  crlf = tmp_path / 'vocab.txt'
  crlf.write_bytes(('\r\n'.join(tokens) + '\r\n').encode('utf-8'))
  got = vocab_lib.read_vocab(str(crlf))
  assert got == tokens
  hf = transformers.BertTokenizer(vocab=str(crlf), do_lower_case=True)   # transformers>=5: vocab=
  assert [hf.get_vocab()[t] for t in tokens] == list(range(len(tokens)))
  special = vocab_lib.special_ids(got, str(crlf))
  assert (special.pad, special.unk, special.cls, special.sep, special.mask) == (
      hf.pad_token_id, hf.unk_token_id, hf.cls_token_id, hf.sep_token_id, hf.mask_token_id)


def test_trailing_whitespace_in_a_vocab_txt_is_trimmed_as_hugging_face_does(tmp_path):
  """'hello ' and 'world\t' (spaces an editor or a script left) were tokens of their own
  here, so 'hello world' trained as [UNK] [UNK]; BertTokenizerFast of the same file, which
  the Hugging Face export ships, trims them and gives the words' ids."""
  import transformers  # pylint: disable=import-outside-toplevel
  from bert_sym.input import seqio_tasks  # pylint: disable=import-outside-toplevel
  path = tmp_path / 'vocab.txt'
  path.write_bytes(b'[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\nhello \nworld\t\n##s  \r\n')
  hf = transformers.BertTokenizerFast(vocab=str(path), do_lower_case=True)
  expected = hf('hello worlds', add_special_tokens=False)['input_ids']
  assert expected == [5, 6, 7]
  assert seqio_tasks.get_vocabulary(str(path)).encode('hello worlds') == expected


# ---- The tokens cache (GLUE's config.tokens_cache_dir) ----

def test_the_tokens_cache_gives_the_tokenisers_ids_keyed_by_texts_and_vocabulary(
    tmp_path, monkeypatch, caplog):
  """Written on the first encode; read back (the tokeniser not run) by the next WordPiece
  with the same texts and vocabulary; other texts, their order or another vocabulary are
  other entries; a damaged entry is tokenised again, said in a warning, and rewritten."""
  cache = tmp_path / 'tokens'
  uncached = [ids.tolist() for ids in vocab_lib.WordPiece().encode(TRICKY)]
  first = vocab_lib.WordPiece(cache_dir=str(cache)).encode(TRICKY)
  [entry] = cache.iterdir()
  warm = vocab_lib.WordPiece(cache_dir=str(cache))
  monkeypatch.setattr(warm, '_encode_eagerly', lambda *_: pytest.fail('tokenised again'))
  served = warm.encode(TRICKY)
  for ids in (first, served):
    assert [x.tolist() for x in ids] == uncached and {x.dtype for x in ids} == {np.dtype(np.int32)}
  assert warm.cached_ids_path(TRICKY) == str(entry)
  assert warm.cached_ids_path(TRICKY[::-1]) != str(entry)
  assert warm.cached_ids_path(['ab', 'c']) != warm.cached_ids_path(['a', 'bc'])
  other_vocab = _write_vocab(tmp_path / 'vocab.txt',
                             ['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]', 'a', '##b'])
  assert (vocab_lib.WordPiece(other_vocab, cache_dir=str(cache)).cached_ids_path(TRICKY)
          != str(entry))
  entry.write_bytes(entry.read_bytes()[:100])
  with caplog.at_level(logging.WARNING):
    again = vocab_lib.WordPiece(cache_dir=str(cache)).encode(TRICKY)
  assert f'{entry}: damaged tokens cache entry' in caplog.text
  assert [x.tolist() for x in again] == uncached
  with np.load(entry) as rewritten:
    assert rewritten['flat'].size == sum(map(len, uncached))
  with pytest.raises(vocab_lib.DataError, match='tokens cache is a local directory'):
    vocab_lib.WordPiece(cache_dir='gs://bucket/tokens')


def test_a_warm_tokens_cache_does_not_import_tensorflow(tmp_path):
  """What the cache is for: a GLUE process whose texts were tokenised before starts
  without TensorFlow's seconds-long import (a cold one imports it to tokenise)."""
  cache = str(tmp_path / 'tokens')
  vocab_lib.WordPiece(cache_dir=cache).encode(TRICKY)
  code = ('import sys; from bert_sym.input import tokenizer; '
          f'ids = tokenizer.WordPiece(cache_dir={cache!r}).encode({TRICKY!r}); '
          "print(len(ids), 'tensorflow' in sys.modules)")
  result = subprocess.run([sys.executable, '-c', code], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, PYTHONPATH=REPO_ROOT))
  assert result.stdout.split() == [str(len(TRICKY)), 'False'], result.stderr[-3000:]

"""bert-base-uncased WordPiece: the vocab file, its special ids, and the tokeniser.

The default vocabulary is rebuilt offline from the list that the `blingfire` wheel ships
(`bert_base_tok.i2w`) and checked against the md5 of Google's original `vocab.txt`, so
no download is needed and a silently different vocabulary cannot slip in.

`WordPiece` tokenises both the pre-training corpus (in tf.data) and GLUE text, so
fine-tuning text is split exactly as in pre-training. Tokenising runs TF Text; the vocab
file helpers and `WordPiece`'s ids and tokens are TF-free (gs:// vocab paths are read
through tf.io.gfile).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.metadata
import io
import logging
import os
import pathlib
import struct
import unicodedata

import numpy as np

from bert_sym import files
from bert_sym.input import DataError, import_tensorflow, tensorflow_import_scope

BERT_BASE_UNCASED_MD5 = '64800d5d8528ce344256daf115d4965e'
BERT_BASE_UNCASED_SIZE = 30522
# Hugging Face's limit (BertTokenizerFast's max_input_chars_per_word): a word of more
# characters (code points, not bytes) becomes [UNK].
MAX_CHARS_PER_WORD = 100


class VocabError(DataError):
  """A vocabulary file that cannot be used (missing, unreadable, lacks special tokens):
  a user error, one line on every command line (a DataError, so also a ValueError)."""


@dataclasses.dataclass(frozen=True)
class SpecialIds:
  pad: int
  unk: int
  cls: int
  sep: int
  mask: int

  def as_dict(self) -> dict[str, int]:
    return dataclasses.asdict(self)


_SPECIAL_TOKENS = dict(pad='[PAD]', unk='[UNK]', cls='[CLS]', sep='[SEP]', mask='[MASK]')


def _decode_blingfire_i2w(raw: bytes) -> list[str]:
  """Entries of a blingfire id-to-word file, in id order, in `vocab.txt` spelling.

  Layout (read from the file; all little-endian uint32): a header whose third word is the
  byte offset of the entry table; at that offset the entry count n, then n + 1 offsets
  relative to the end of the offset table, then the UTF-8 bytes of all entries. A
  word-initial piece is stored with a leading space and a continuation piece bare, i.e.
  ' the' is `the` and 'ing' is `##ing`. The four special tokens are stored lower-cased.
  """
  table = struct.unpack_from('<I', raw, 8)[0]
  count = struct.unpack_from('<I', raw, table)[0]
  offsets = struct.unpack_from(f'<{count + 1}I', raw, table + 4)
  base = table + 4 * (count + 2)
  tokens = []
  for start, end in zip(offsets[:-1], offsets[1:]):
    entry = raw[base + start:base + end].decode('utf-8')
    tokens.append(entry[1:] if entry.startswith(' ') else '##' + entry)
  upper = {t.lower(): t for t in _SPECIAL_TOKENS.values()}
  return [upper.get(t, t) for t in tokens]


@functools.cache
def default_vocab_file() -> str:
  """Path of bert-base-uncased's `vocab.txt` (30,522 lines), rebuilt once and cached."""
  path = pathlib.Path(files.user_cache_dir(
      f'bert-base-uncased-{BERT_BASE_UNCASED_MD5[:8]}-vocab.txt'))
  if path.exists() and hashlib.md5(path.read_bytes()).hexdigest() == BERT_BASE_UNCASED_MD5:
    return str(path)
  import blingfire  # pylint: disable=import-outside-toplevel
  i2w = pathlib.Path(blingfire.__file__).parent / 'bert_base_tok.i2w'
  tokens = _decode_blingfire_i2w(i2w.read_bytes())
  data = ('\n'.join(tokens) + '\n').encode('utf-8')
  md5 = hashlib.md5(data).hexdigest()
  if len(tokens) != BERT_BASE_UNCASED_SIZE or md5 != BERT_BASE_UNCASED_MD5:
    raise VocabError(
        f'{i2w}: rebuilt vocab has {len(tokens)} entries and md5 {md5}, expected '
        f'{BERT_BASE_UNCASED_SIZE} and {BERT_BASE_UNCASED_MD5}; install blingfire==0.1.8 '
        'or pass an explicit vocab_path.')
  files.write_atomically(path, lambda f: f.write(data))
  return str(path)


def read_vocab_bytes(path: str) -> bytes:
  """Raw bytes of a vocab file; gs:// and other remote paths go through tf.io.gfile."""
  try:
    if '://' in path:
      tf = import_tensorflow()
      with tf.io.gfile.GFile(path, 'rb') as f:
        return f.read()
    return pathlib.Path(path).read_bytes()
  except Exception as e:  # OSError locally; tf.errors.NotFoundError etc. via gfile.
    raise VocabError(f'{path}: cannot read vocab file ({e}). Fix: point vocab_path '
                     '(config.data.vocab_path; for GLUE --config.vocab_path) at the '
                     'vocab.txt, one token per line.') from e


def read_vocab(path: str) -> list[str]:
  """Tokens of a `vocab.txt` (one per line, id = line number)."""
  return parse_vocab(read_vocab_bytes(path), path)


def parse_vocab(raw: bytes, path: str) -> list[str]:
  """Tokens of a `vocab.txt`'s bytes, already read from `path` (named in errors)."""
  try:
    text = raw.decode('utf-8')
  except UnicodeDecodeError as e:
    raise VocabError(f'{path}: vocab file is not valid UTF-8 ({e})') from e
  if not text:
    raise VocabError(f'{path}: vocab file is empty')
  if text.startswith('\ufeff'):   # the tokenizer would read it as part of token 0
    raise VocabError(f'{path}: vocab file starts with a UTF-8 byte-order mark (saved by a '
                     "Windows editor?). Fix: remove it, e.g. sed -i '1s/^\\xEF\\xBB\\xBF//' FILE.")
  # Trailing whitespace is not part of a token: Hugging Face's WordPiece reader trims it
  # (a '\r' of Windows line endings, a space left by an editor), so 'hello ' is 'hello'.
  tokens = [t.rstrip() for t in text.removesuffix('\n').split('\n')]
  if len(set(tokens)) < len(tokens):   # TF's lookup table would fail deep in a traceback
    first = {}
    for line, token in enumerate(tokens, 1):
      if token in first:
        raise VocabError(f'{path}: token {token!r} appears on lines {first[token]} and '
                         f'{line}; each line must hold a different token (an upper-cased '
                         'copy of an uncased vocabulary repeats some). Fix: remove the '
                         'repeat.')
      first[token] = line
  return tokens


def special_ids(tokens: list[str], path: str) -> SpecialIds:
  """Ids of [PAD] [UNK] [CLS] [SEP] [MASK], looked up by token."""
  missing = [t for t in _SPECIAL_TOKENS.values() if t not in tokens]
  if missing:
    raise VocabError(f'{path}: vocab lacks {", ".join(missing)}, which BERT MLM '
                     'pre-training needs; add them as lines of the file.')
  return SpecialIds(**{k: tokens.index(t) for k, t in _SPECIAL_TOKENS.items()})


# Above this share of tokens that the uncased tokenizer never produces, the vocabulary was
# built for cased (or accented) text; bert-base-uncased has none.
UNREACHABLE_SHARE = 0.01


def check_uncased(tokens: list[str], path: str) -> None:
  """Refuses a vocabulary for cased text: the tokenizer lower-cases and strips accents, so
  its 'The' or 'café' would never be produced ('London' split into lower-case pieces, a
  fifth of a cased vocabulary's rows never trained), with too few [UNK] to notice."""
  unreachable = [t for t in tokens if not (t.startswith('[') and t.endswith(']')) and (
      t != t.lower() or any(unicodedata.category(c) == 'Mn'
                            for c in unicodedata.normalize('NFD', t)))]
  if len(unreachable) > UNREACHABLE_SHARE * len(tokens):
    raise VocabError(
        f'{path}: {len(unreachable)} of its {len(tokens)} tokens (e.g. '
        f'{", ".join(map(repr, unreachable[:3]))}) hold upper-case letters or accents, '
        'which the tokenizer never produces: it lower-cases text and strips accents, as '
        'BERT uncased does (a cased vocab.txt?). Fix: a vocab.txt built from lower-cased '
        "text, e.g. by tokenizers' BertWordPieceTokenizer(lowercase=True).")


def vocab_md5(path: str) -> str:
  return hashlib.md5(read_vocab_bytes(path)).hexdigest()


def import_tf_text():
  """(tensorflow, tensorflow_text), TF imported with the GPUs hidden from it."""
  tf = import_tensorflow()
  with tensorflow_import_scope():
    import tensorflow_text as tf_text  # pylint: disable=import-outside-toplevel
  return tf, tf_text


class WordPiece:
  """Uncased BERT WordPiece: basic tokenisation + greedy longest-match-first WordPiece.

  Ids are raw WordPiece ids, no [CLS]/[SEP] (packing adds them). The basic tokeniser
  matches Hugging Face's `BertTokenizerFast(do_lower_case=True)`: drop NUL/U+FFFD/control
  characters, map whitespace to ' ', NFD + drop accents (Mn), lower-case, split on
  whitespace, punctuation and CJK characters. `vocab_path` '' is bert-base-uncased.
  """

  def __init__(self, vocab_path: str = '', cache_dir: str = ''):
    # `cache_dir` ('' = none): `encode`'s ids of each list of texts are kept there, so the
    # next process given the same texts and vocabulary needs neither TensorFlow (seconds
    # to import) nor the tokenising (minutes for MNLI).
    if '://' in cache_dir:
      raise DataError(f'tokens_cache_dir={cache_dir}: the tokens cache is a local directory. '
                      "Fix: --config.tokens_cache_dir=<a local directory>, or '' for none.")
    self.cache_dir = files.cache_dir(cache_dir) if cache_dir else ''
    self.vocab_file = vocab_path or default_vocab_file()
    self.tokens = read_vocab(self.vocab_file)
    self.special = special = special_ids(self.tokens, self.vocab_file)
    self.md5 = vocab_md5(self.vocab_file)
    self.vocab_size = len(self.tokens)
    self.pad_id, self.cls_id, self.sep_id = special.pad, special.cls, special.sep

  @functools.cached_property
  def _tokenizer(self):
    tf, tf_text = import_tf_text()
    with tf.init_scope():  # build eagerly even if first used inside a tf.data trace
      table = tf.lookup.StaticHashTable(
          tf.lookup.KeyValueTensorInitializer(
              tf.constant(self.tokens), tf.range(len(self.tokens), dtype=tf.int64)),
          default_value=self.special.unk)
      # Normalisation is done in `_normalize` (HF's order and lower-casing); TF Text's own
      # lower_case=True uses NFKC case folding, which differs from HF on e.g. ligatures.
      # BertTokenizer's two stages, kept apart: its word limit counts UTF-8 bytes, so a
      # word of 51 Cyrillic letters was [UNK] here and pieces for Hugging Face. The limit
      # is applied in characters between the two (`encode_tf`); 4 bytes a character.
      # BasicTokenizer is BertTokenizer's own first stage (not exported by tensorflow_text).
      from tensorflow_text.python.ops.bert_tokenizer import BasicTokenizer  # pylint: disable=import-outside-toplevel
      return (BasicTokenizer(lower_case=False),
              tf_text.WordpieceTokenizer(
                  table, suffix_indicator='##', max_bytes_per_word=4 * MAX_CHARS_PER_WORD,
                  unknown_token='[UNK]', token_out_type=tf.int32))

  @staticmethod
  def _normalize(s):
    tf, tf_text = import_tf_text()
    # HF BertNormalizer: clean text, then strip accents (NFD, drop Mn), then lower-case.
    s = tf.strings.regex_replace(s, r'[\t\n\r\p{Zs}\p{Zl}\p{Zp}]', ' ')
    s = tf.strings.regex_replace(s, r'[\x{0}\x{FFFD}\p{Cc}\p{Cf}\p{Co}]', '')
    s = tf_text.normalize_utf8(s, 'NFD')
    s = tf.strings.regex_replace(s, r'\p{Mn}', '')
    # HF lower-cases char by char; ICU would turn a word-final capital sigma into 'ς'.
    s = tf.strings.regex_replace(s, 'Σ', 'σ')
    return tf.strings.lower(s, encoding='utf-8')

  def encode_tf(self, s):
    """Scalar string -> int32 [n]; a batch of strings -> ragged int32 [b, None]."""
    tf = import_tensorflow()
    s = tf.convert_to_tensor(s, tf.string)
    split_words, wordpiece = self._tokenizer
    words = split_words.tokenize(self._normalize(tf.reshape(s, [-1])))
    words = tf.ragged.map_flat_values(   # a word over the limit is [UNK], whole
        lambda w: tf.where(tf.strings.length(w, unit='UTF8_CHAR') > MAX_CHARS_PER_WORD,
                           '[UNK]', w), words)
    pieces = wordpiece.tokenize(words)
    ids = pieces.merge_dims(-2, -1)  # [b, words, pieces] -> [b, pieces]
    return ids[0] if s.shape.rank == 0 else ids

  def decode_tf(self, ids):
    tf = import_tensorflow()
    words = self._tokenizer[1].detokenize(tf.reshape(ids, [1, -1]))
    return tf.strings.reduce_join(words, separator=' ', axis=-1)[0]

  def encode(self, texts: list[str], chunk: int = 4096) -> list[np.ndarray]:
    """Token ids per text (no special tokens), eagerly (GLUE); from the cache if there."""
    path = self.cached_ids_path(texts) if self.cache_dir else None
    ids = _read_cached_ids(path, len(texts), self.vocab_size) if path else None
    if ids is None:
      ids = self._encode_eagerly(texts, chunk)
      if path:
        _write_cached_ids(path, ids)
    return ids

  def cached_ids_path(self, texts: list[str]) -> str:
    """The cache file of these texts' ids: named by everything the ids depend on (this
    module's code, TF and TF Text's versions, the vocabulary, the texts in order)."""
    key = hashlib.sha256(_TOKENIZER_CODE_VERSION.encode())
    key.update(self.md5.encode())
    for text in texts:
      raw = text if isinstance(text, bytes) else str(text).encode('utf-8', 'surrogatepass')
      key.update(len(raw).to_bytes(8, 'little') + raw)
    return os.path.join(self.cache_dir, f'wordpiece-{key.hexdigest()[:40]}.npz')

  def _encode_eagerly(self, texts: list[str], chunk: int) -> list[np.ndarray]:
    tf = import_tensorflow()
    out = []
    for start in range(0, len(texts), chunk):
      ragged = self.encode_tf(tf.constant(texts[start:start + chunk]))   # int32
      out.extend(np.split(ragged.flat_values.numpy(), ragged.row_splits.numpy()[1:-1]))
    return out


def _code_version() -> str:
  """This file's bytes and the tokenising libraries' versions: any change to how ids are
  made changes the cache's file names (a stale entry is never read, only left behind)."""
  versions = []
  for package in ('tensorflow', 'tensorflow-cpu', 'tensorflow-text'):   # TF as either wheel
    try:
      versions.append(importlib.metadata.version(package))
    except importlib.metadata.PackageNotFoundError:
      versions.append('-')
  return hashlib.md5(pathlib.Path(__file__).read_bytes()).hexdigest() + ' '.join(versions)


_TOKENIZER_CODE_VERSION = _code_version()


def _read_cached_ids(path: str, num_texts: int, vocab_size: int) -> list[np.ndarray] | None:
  """The cached ids, or None when absent or damaged (then tokenised again and rewritten)."""
  if not os.path.exists(path):
    return None
  try:
    with np.load(path, allow_pickle=False) as entry:
      flat, splits = entry['flat'], entry['splits']
    if (flat.dtype != np.int32 or splits.shape != (num_texts + 1,) or splits[0] != 0
        or splits[-1] != len(flat) or np.any(np.diff(splits) < 0)
        or (len(flat) and not 0 <= flat.min() <= flat.max() < vocab_size)):
      raise ValueError('not the ids of these texts')
  except Exception as e:  # pylint: disable=broad-except  (zip, npy, key errors alike)
    logging.warning('%s: damaged tokens cache entry (%s: %s); tokenising again.', path,
                    type(e).__name__, e)
    return None
  return np.split(flat, splits[1:-1])


def _write_cached_ids(path: str, ids: list[np.ndarray]) -> None:
  """Best effort, as JAX's compilation cache: an unwritable cache costs time, not the run."""
  lengths = np.fromiter((len(x) for x in ids), np.int64, len(ids))
  buffer = io.BytesIO()
  np.savez(buffer, flat=np.concatenate(ids).astype(np.int32) if ids else np.zeros(0, np.int32),
           splits=np.concatenate([[0], np.cumsum(lengths)]))
  try:
    files.write_atomically(path, buffer.getvalue())
  except OSError as e:
    logging.warning('Cannot write the tokens cache %s (%s); the next run tokenises again. '
                    "Fix: --config.tokens_cache_dir=<a writable directory>, or '' for none.",
                    path, e)

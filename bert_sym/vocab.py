"""bert-base-uncased WordPiece: the vocab file, its special ids, and a seqio Vocabulary.

The default vocabulary is rebuilt offline from the list that the `blingfire` wheel ships
(`bert_base_tok.i2w`) and checked against the md5 of Google's original `vocab.txt`, so
no download is needed and a silently different vocabulary cannot slip in.

The file helpers are TF-free (GPU images without TensorFlow still need `vocab.txt`, e.g.
for GLUE tokenisation with Hugging Face); `BertWordPieceVocabulary` exists only where
seqio/TensorFlow are installed.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import pathlib
import struct
import tempfile

try:  # The tf.data path; absent on TF-free images, which read exported shards instead.
  import seqio
except ImportError:
  seqio = None

BERT_BASE_UNCASED_MD5 = '64800d5d8528ce344256daf115d4965e'
BERT_BASE_UNCASED_SIZE = 30522
MAX_BYTES_PER_WORD = 100  # Google's and Hugging Face's limit; longer words become [UNK].


class VocabError(ValueError):
  """A vocabulary file that cannot be used (missing, unreadable, lacks special tokens)."""


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


# ----------------------------------------------------------------------------------------
# The default vocab file, rebuilt from blingfire.
# ----------------------------------------------------------------------------------------

def _cache_dir() -> pathlib.Path:
  root = os.environ.get('BERT_SYM_CACHE') or os.path.join(
      os.environ.get('XDG_CACHE_HOME') or os.path.expanduser('~/.cache'), 'bert_sym')
  return pathlib.Path(root)


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


def _write_atomically(path: pathlib.Path, data: bytes) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + '.tmp-')
  try:
    with os.fdopen(fd, 'wb') as f:
      f.write(data)
    os.replace(tmp, path)  # Readers see the old file or the whole new one, never half.
  except BaseException:
    os.unlink(tmp)
    raise


@functools.cache
def default_vocab_file() -> str:
  """Path of bert-base-uncased's `vocab.txt` (30,522 lines), rebuilt once and cached."""
  path = _cache_dir() / f'bert-base-uncased-{BERT_BASE_UNCASED_MD5[:8]}-vocab.txt'
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
  _write_atomically(path, data)
  return str(path)


# ----------------------------------------------------------------------------------------
# Reading any vocab file (local or gs://).
# ----------------------------------------------------------------------------------------

def resolve_vocab_path(vocab_path: str = '') -> str:
  return vocab_path or default_vocab_file()


def read_vocab_bytes(path: str) -> bytes:
  """Raw bytes of a vocab file; gs:// and other remote paths go through tf.io.gfile."""
  try:
    if '://' in path:
      import tensorflow as tf  # pylint: disable=import-outside-toplevel
      with tf.io.gfile.GFile(path, 'rb') as f:
        return f.read()
    return pathlib.Path(path).read_bytes()
  except Exception as e:  # OSError locally; tf.errors.NotFoundError etc. via gfile.
    raise VocabError(f'{path}: cannot read vocab file ({e})') from e


def read_vocab(path: str) -> list[str]:
  """Tokens of a `vocab.txt` (one per line, id = line number)."""
  raw = read_vocab_bytes(path)
  try:
    text = raw.decode('utf-8')
  except UnicodeDecodeError as e:
    raise VocabError(f'{path}: vocab file is not valid UTF-8 ({e})') from e
  tokens = text.split('\n')
  if tokens and tokens[-1] == '':
    tokens.pop()
  tokens = [t.rstrip('\r') for t in tokens]
  if not tokens:
    raise VocabError(f'{path}: vocab file is empty')
  return tokens


def special_ids(tokens: list[str], path: str) -> SpecialIds:
  """Ids of [PAD] [UNK] [CLS] [SEP] [MASK], looked up by token."""
  index = {}
  for i, t in enumerate(tokens):
    index.setdefault(t, i)
  missing = [t for t in _SPECIAL_TOKENS.values() if t not in index]
  if missing:
    raise VocabError(f'{path}: vocab lacks {", ".join(missing)}, which BERT MLM '
                     'pre-training needs; add them as lines of the file.')
  return SpecialIds(**{k: index[t] for k, t in _SPECIAL_TOKENS.items()})


def vocab_md5(path: str) -> str:
  return hashlib.md5(read_vocab_bytes(path)).hexdigest()


# ----------------------------------------------------------------------------------------
# seqio Vocabulary backed by TF Text (runs inside tf.data).
# ----------------------------------------------------------------------------------------

if seqio is not None:
  import tensorflow as tf
  import tensorflow_text as tf_text

  # TF only feeds the input pipeline. Left alone it would claim the GPUs' memory that JAX
  # needs (it finds the CUDA wheels jax[cuda] installs); every TF path imports this module.
  try:
    tf.config.set_visible_devices([], 'GPU')
  except RuntimeError:   # TF's devices were already initialised by the caller: its choice.
    pass

  class BertWordPieceVocabulary(seqio.Vocabulary):
    """Uncased BERT WordPiece: basic tokenisation + greedy longest-match-first WordPiece.

    `encode` returns raw WordPiece ids, no [CLS]/[SEP] (packing adds them). The basic
    tokeniser matches Hugging Face's `BertTokenizerFast(do_lower_case=True)`: drop
    NUL/U+FFFD/control characters, map whitespace to ' ', NFD + drop accents (Mn),
    lower-case, split on whitespace, punctuation and CJK characters.
    """

    def __init__(self, vocab_path: str = ''):
      self._path = resolve_vocab_path(vocab_path)
      self._tokens = read_vocab(self._path)
      self.special = special_ids(self._tokens, self._path)
      self.md5 = vocab_md5(self._path)
      super().__init__(extra_ids=0)

    @property
    def path(self) -> str:
      return self._path

    @property
    def tokens(self) -> list[str]:
      return list(self._tokens)

    @property
    def pad_id(self) -> int:
      return self.special.pad

    @property
    def eos_id(self) -> int | None:
      return None  # BERT has no EOS; [SEP] is added by packing, not by seqio.

    @property
    def unk_id(self) -> int:
      return self.special.unk

    @property
    def _base_vocab_size(self) -> int:
      return len(self._tokens)

    @functools.cached_property
    def _tokenizer(self) -> tf_text.BertTokenizer:
      with tf.init_scope():  # build eagerly even if first used inside a tf.data trace
        return self._make_tokenizer()

    def _make_tokenizer(self) -> tf_text.BertTokenizer:
      table = tf.lookup.StaticHashTable(
          tf.lookup.KeyValueTensorInitializer(
              tf.constant(self._tokens), tf.range(len(self._tokens), dtype=tf.int64)),
          default_value=self.special.unk)
      # Normalisation is done in `_normalize` (HF's order and lower-casing); TF Text's own
      # lower_case=True uses NFKC case folding, which differs from HF on e.g. ligatures.
      return tf_text.BertTokenizer(
          table, suffix_indicator='##', max_bytes_per_word=MAX_BYTES_PER_WORD,
          unknown_token='[UNK]', lower_case=False, token_out_type=tf.int32)

    @staticmethod
    def _normalize(s: tf.Tensor) -> tf.Tensor:
      # HF BertNormalizer: clean text, then strip accents (NFD, drop Mn), then lower-case.
      s = tf.strings.regex_replace(s, r'[\t\n\r\p{Zs}\p{Zl}\p{Zp}]', ' ')
      s = tf.strings.regex_replace(s, r'[\x{0}\x{FFFD}\p{Cc}\p{Cf}\p{Co}]', '')
      s = tf_text.normalize_utf8(s, 'NFD')
      s = tf.strings.regex_replace(s, r'\p{Mn}', '')
      # HF lower-cases char by char; ICU would turn a word-final capital sigma into 'ς'.
      s = tf.strings.regex_replace(s, 'Σ', 'σ')
      return tf.strings.lower(s, encoding='utf-8')

    def _encode_tf(self, s: tf.Tensor) -> tf.Tensor:
      """Scalar string -> int32 [n]; a batch of strings -> ragged int32 [b, None]."""
      s = tf.convert_to_tensor(s, tf.string)
      pieces = self._tokenizer.tokenize(self._normalize(tf.reshape(s, [-1])))
      ids = pieces.merge_dims(-2, -1)  # [b, words, pieces] -> [b, pieces]
      return ids[0] if s.shape.rank == 0 else ids

    def _decode_tf(self, ids: tf.Tensor) -> tf.Tensor:
      words = self._tokenizer.detokenize(tf.reshape(ids, [1, -1]))
      return tf.strings.reduce_join(words, separator=' ', axis=-1)[0]

    def _encode(self, s: str) -> list[int]:
      return self._encode_tf(tf.constant(s)).numpy().tolist()

    def _decode(self, ids) -> str:
      return self._decode_tf(tf.constant(list(ids), tf.int32)).numpy().decode('utf-8')

    def __eq__(self, other) -> bool:
      return isinstance(other, BertWordPieceVocabulary) and self.md5 == other.md5

    def __hash__(self) -> int:
      return hash(self.md5)


def get_vocabulary(vocab_path: str = '') -> 'BertWordPieceVocabulary':
  """The seqio vocabulary for `vocab_path` ('' = bert-base-uncased); needs TF + seqio."""
  if seqio is None:
    raise ImportError('get_vocabulary needs seqio and tensorflow-text (pip install -r '
                      'requirements.txt); TF-free training reads exported shards instead.')
  return _cached_vocabulary(resolve_vocab_path(vocab_path))


@functools.cache
def _cached_vocabulary(path: str) -> 'BertWordPieceVocabulary':
  return BertWordPieceVocabulary(path)

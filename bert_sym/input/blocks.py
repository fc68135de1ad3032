"""Packed blocks: packing documents into them (TF), and holding them by index (TF-free).

A block is `max_seq_len` token ids [CLS] ... [SEP]: every document is followed by [SEP],
the documents are concatenated into one stream, and the stream is cut into blocks of
`max_seq_len - 2` tokens, each wrapped as [CLS] ... [SEP], so every training sequence
starts and ends like a BERT input; the last, shorter block is padded rather than dropped
(the embedded corpus is small). This differs from Hugging Face `run_mlm`'s `group_texts`,
which the reference run used: there each document is wrapped as [CLS] doc [SEP], the
stream is cut every 512 tokens without re-wrapping, and the remainder is dropped. The
token budget per block is the same.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Iterator

from absl import logging
import numpy as np

from bert_sym.input import DataError, check_max_seq_len, import_tensorflow, sources
from bert_sym.input.tokenizer import WordPiece, check_uncased

_DOCS_PER_TOKENIZE_CALL = 64  # TF Text is much faster on a batch of strings than on one.
# Tokenising takes ~40x its text in memory: a corpus dumped without newlines (one document
# of GBs) ran out of it. Longer documents are tokenised in pieces of at most this many bytes
# (1 MiB a tokenizer call), each cut after a character where the tokenizer ends a word, so
# the ids are the whole document's (checked against Hugging Face in test_seqio_tasks.py).
_MAX_PIECE_BYTES = 16_384
# What the normalisation turns into a space, and BasicTokenizer's delimiters (ASCII and
# Unicode punctuation, CJK ideographs, and the four characters whose NFD is one of those
# plus a mark it deletes: U+1FEF, U+2260, U+226E, U+226F): each is a word of its own or
# none, after any cut.
_WORD_END = ('[\t\n\r\\p{Zs}\\p{Zl}\\p{Zp}!-/:-@\\[-`{-~\\p{P}\\x{1FEF}\\x{2260}\\x{226E}\\x{226F}'
             '\\x{4E00}-\\x{9FFF}'
             '\\x{3400}-\\x{4DBF}\\x{20000}-\\x{2A6DF}\\x{2A700}-\\x{2B73F}\\x{2B740}-\\x{2B81F}'
             '\\x{2B820}-\\x{2CEAF}\\x{F900}-\\x{FAFF}\\x{2F800}-\\x{2FA1F}]')

# What the normalisation deletes (tokenizer.WordPiece._normalize), marks after NFD included.
_DELETED = '[\\x{0}\\x{FFFD}\\p{Cc}\\p{Cf}\\p{Co}\\p{Mn}]'


@dataclasses.dataclass(eq=False)
class Blocks:
  """N packed blocks addressable by index, plus what masking needs."""
  arrays: list[np.ndarray]   # [n_i, L] each (memory-mapped for shards)
  vocab_tokens: list[str]
  special: dict[str, int]
  vocab_md5: str
  description: str           # for error messages
  num_tokens: int            # not [PAD]
  names: list[str] | None = None   # each array's file (shards), for error messages
  task: str | None = None          # the task the shards were exported from

  def __post_init__(self):
    self._starts = np.cumsum([0] + [len(a) for a in self.arrays])

  def __len__(self) -> int:
    return int(self._starts[-1])

  @property
  def max_seq_len(self) -> int:
    return int(self.arrays[0].shape[1])

  def take(self, rows: np.ndarray) -> np.ndarray:
    """The blocks at `rows`, their ids checked against the vocabulary (one max over the
    rows read: a damaged or foreign shard stops the run at its first read, naming it)."""
    rows = np.asarray(rows, np.int64)
    if len(self.arrays) == 1:
      out = np.asarray(self.arrays[0][rows])
      shard = np.zeros(len(rows), np.int64)
    else:
      shard = np.searchsorted(self._starts, rows, side='right') - 1
      out = np.empty((len(rows), self.max_seq_len), self.arrays[0].dtype)
      for s in np.unique(shard):
        at = shard == s
        out[at] = self.arrays[s][rows[at] - self._starts[s]]
    bad = first_out_of_vocabulary(out, len(self.vocab_tokens))
    if bad is not None:
      s = int(shard[bad])
      name = self.names[s] if self.names else f'{self.description} array {s}'
      raise out_of_vocabulary_error(name, int(rows[bad] - self._starts[s]), out[bad],
                                    len(self.vocab_tokens))
    return out


def first_out_of_vocabulary(out: np.ndarray, vocab_size: int) -> int | None:
  """Index of the first row of `out` holding an id outside [0, vocab_size), else None
  (cheap: one max and one min over the rows just read; int32 shards, for vocabularies over
  65,536 ids, can hold negative ones)."""
  if out.size and (int(out.max()) >= vocab_size or int(out.min()) < 0):
    return int(np.flatnonzero(((out >= vocab_size) | (out < 0)).any(axis=1))[0])
  return None


def out_of_vocabulary_error(path: str, block: int, row: np.ndarray,
                            vocab_size: int) -> DataError:
  bad = int(row[(row >= vocab_size) | (row < 0)][0])
  return DataError(
      f'{path}: block {block} holds token id {bad}, outside the vocabulary of {vocab_size} '
      'tokens (a damaged shard, or one exported with another vocabulary); re-export the '
      'split.')


# What the shard readers use of a split's metadata.json, with its type ('task' is compared
# with the config's, naming both): a hand edit or damaged copy that dropped or retyped one
# was a KeyError or TypeError traceback naming no file.
_METADATA_FIELDS = dict(max_seq_len=int, num_tokens=int, dtype=str, shards=list,
                        vocab_md5=str, vocab_size=int, special_ids=dict)


def check_metadata(metadata, url: str, format_version: int) -> None:
  """Refuses a split's metadata.json (read from `url`) that is not an export's."""
  if not isinstance(metadata, dict):   # JSON, but not what an export writes (a hand edit)
    raise DataError(f'{url} holds a JSON {type(metadata).__name__}, not an object; re-export.')
  if metadata.get('format_version') != format_version:
    raise DataError(f'{url}: shard format {metadata.get("format_version")}, this '
                    f'code reads {format_version}; re-export.')
  typed = lambda value, kind: isinstance(value, kind) and not isinstance(value, bool)
  bad = [k for k, kind in _METADATA_FIELDS.items() if not typed(metadata.get(k), kind)]
  if not bad:
    bad = [f'shards[{i}]' for i, s in enumerate(metadata['shards'])
           if not (isinstance(s, dict) and typed(s.get('num_blocks'), int)
                   and typed(s.get('file'), str) and s['file'].strip('.') and '/' not in s['file'])]
    bad += [f'special_ids.{k}' for k in ('pad', 'unk', 'cls', 'sep', 'mask')
            if not (typed(metadata['special_ids'].get(k), int)
                    and 0 <= metadata['special_ids'][k] < metadata['vocab_size'])]
    try:
      np.dtype(metadata['dtype'])
    except TypeError:
      bad.append('dtype')
  if bad:
    raise DataError(f'{url}: {", ".join(bad[:3])}{" ..." if len(bad) > 3 else ""} missing or '
                    'not what an export writes (a hand edit, a damaged copy?). Fix: copy '
                    'the split again, or re-export the split.')


def token_dtype(vocab_size: int):
  return np.uint16 if vocab_size <= 2**16 else np.int32


def packed_blocks(documents, max_seq_len: int, vocabulary):
  """{'text'} documents -> int32 [max_seq_len] blocks, unmasked, in order.

  `vocabulary`: a `tokenizer.WordPiece`, or the seqio Vocabulary that wraps one.
  """
  tf = import_tensorflow()
  check_max_seq_len(max_seq_len)
  special = vocabulary.special

  def tokenize(pieces, last, mid_word):   # -> the pieces' ids, and which end a document
    ids = tf.cast(vocabulary.encode_tf(pieces), tf.int32)  # ragged [pieces, ids]
    # A piece that starts inside a word holds the rest of a word longer than a piece: the
    # piece before ended with its [UNK] (over tokenizer.MAX_CHARS_PER_WORD characters).
    drop = mid_word & tf.reduce_any(tf.equal(ids[:, :1], special.unk), axis=1)
    starts = tf.boolean_mask(ids.row_starts(), drop)
    keep = tf.tensor_scatter_nd_update(tf.ones_like(ids.flat_values, tf.bool),
                                       starts[:, None], tf.zeros_like(starts, tf.bool))
    ids = tf.ragged.boolean_mask(ids, ids.with_flat_values(keep))
    return ids.flat_values, ids.row_lengths(), last

  def add_seps(continued_has_ids, element):   # -> the pieces' ids, [SEP] after each document
    flat, lengths, last = element
    # A document's pieces can span tokenizer batches: [SEP] after its last piece if any of
    # them had ids (a document of no token adds none).
    document = tf.cumsum(tf.cast(last, tf.int32), exclusive=True)
    has_ids = tf.math.segment_max(tf.cast(lengths > 0, tf.int32), document) > 0
    has_ids = tf.concat([has_ids[:1] | continued_has_ids, has_ids[1:]], axis=0)
    seps = tf.cast(last & tf.gather(has_ids, document), tf.int64)
    ids = tf.RaggedTensor.from_row_lengths(flat, lengths)
    seps = tf.RaggedTensor.from_row_lengths(tf.fill([tf.reduce_sum(seps)], special.sep), seps)
    return (~last[-1] & has_ids[-1]), tf.concat([ids, seps], axis=1).flat_values

  def wrap(chunk):
    block = tf.concat([[special.cls], chunk, [special.sep]], axis=0)
    block = tf.pad(block, [[0, max_seq_len - tf.size(block)]], constant_values=special.pad)
    return tf.ensure_shape(block, [max_seq_len])

  # Plain graph code: AutoGraph would only rewrite it, TF Text's tokenizer included, at
  # every start-up (measured: packing the embedded corpus 7.0 s -> 3.7 s, the same blocks).
  cut, tokenize, add_seps, wrap = (tf.autograph.experimental.do_not_convert(f)
                                   for f in (_cut_into_pieces, tokenize, add_seps, wrap))
  stream = (documents.map(lambda ex: ex['text'])
            .batch(_DOCS_PER_TOKENIZE_CALL)
            .map(cut, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
            .rebatch(_DOCS_PER_TOKENIZE_CALL)
            .map(tokenize, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
            .scan(tf.constant(False), add_seps))
  # rebatch = unbatch().batch(body) without materialising one element per token.
  return stream.rebatch(max_seq_len - 2).map(wrap, num_parallel_calls=tf.data.AUTOTUNE,
                                             deterministic=True)


def _cut_into_pieces(texts):
  """[b] documents -> (pieces, last piece of its document, starts inside a word), each
  piece at most _MAX_PIECE_BYTES, cut after the last _WORD_END character in those bytes. A
  stretch of _MAX_PIECE_BYTES without one is inside a word: cut at its middle, and the
  word, over MAX_CHARS_PER_WORD characters on both sides, is one [UNK] (`tokenize`). Not
  where the stretch holds characters the normalisation deletes (controls, combining
  marks): a side could then be short, or nothing, so the rest of that document is one
  piece, unbounded (a pathological text, tokenised exactly)."""
  tf = import_tensorflow()
  size, start = _MAX_PIECE_BYTES, tf.zeros(tf.shape(texts), tf.int64)
  substr = lambda pos, n: tf.strings.substr(texts, pos, tf.cast(n, tf.int64) + start)
  # Lengths from substr, not tf.strings.length: its int32 wraps at 2 GiB.
  rest_up_to = lambda pos: tf.strings.length(substr(pos, size + 1))

  def step(pos, mid_word, done, pieces, last, mid, emitted):
    rest = rest_up_to(pos)
    whole = rest <= size
    chunk = substr(pos, tf.where(whole, 0, size))
    # \C: any byte, also those of the character cut at the chunk's end.
    word_end = tf.strings.length(chunk) - tf.strings.length(
        tf.strings.regex_replace(chunk, '^\\C*' + _WORD_END, '', replace_global=False))
    middle = substr(tf.where(whole, pos, pos + size // 2),
                    tf.where(whole, 0, 4))   # to cut between characters
    middle = tf.io.decode_raw(middle, tf.uint8, fixed_length=4)
    to_start = tf.argmax(tf.cast(middle & 0xC0, tf.int32) != 0x80, axis=1,
                         output_type=tf.int32)
    mid_cut = ~whole & (word_end == 0)
    uncuttable = mid_cut & tf.strings.regex_full_match(chunk, '\\C*' + _DELETED + '\\C*')
    mid_cut &= ~uncuttable
    length = tf.where(whole, rest,
                      tf.where(word_end > 0, word_end, size // 2 + to_start))
    # The rest of an uncuttable document: substr stops at its end; pos stays (in range).
    # Nothing of a finished one: its rest was written again at every later step (the
    # mask drops it only after the stack), 1000 copies of a 16 MB document.
    piece = substr(pos, tf.where(done, tf.constant(0, tf.int64),
                                 tf.where(uncuttable, tf.int64.max, tf.cast(length, tf.int64))))
    i = pieces.size()
    step_by = tf.where(uncuttable, tf.constant(0, tf.int64), tf.cast(length, tf.int64))
    return (pos + step_by, mid_cut,
            done | whole | uncuttable, pieces.write(i, piece),
            last.write(i, whole | uncuttable), mid.write(i, mid_word), emitted.write(i, ~done))

  def split():
    arrays = [tf.TensorArray(dtype, 0, dynamic_size=True)
              for dtype in (tf.string, tf.bool, tf.bool, tf.bool)]
    no = tf.zeros(tf.shape(texts), tf.bool)
    _, _, _, *arrays = tf.while_loop(lambda _, __, done, *___: ~tf.reduce_all(done), step,
                                     [start, no, no] + arrays)
    # [step, document] -> document by document, each one's pieces in order
    pieces, last, mid, emitted = (tf.transpose(a.stack()) for a in arrays)
    return tuple(tf.boolean_mask(a, emitted) for a in (pieces, last, mid))

  return tf.cond(tf.reduce_all(rest_up_to(start) <= size),
                 lambda: (texts, tf.ones(tf.shape(texts), tf.bool),
                          tf.zeros(tf.shape(texts), tf.bool)), split)


def numpy_blocks(dataset, description: str) -> Iterator[np.ndarray]:
  """Iterates a tf.data dataset of blocks, turning TF errors into a DataError."""
  tf = import_tensorflow()
  try:
    for block in dataset.as_numpy_iterator():
      yield block
  except tf.errors.OpError as e:
    # Our own tf.debugging.Assert (e.g. invalid UTF-8) arrives wrapped in an iterator
    # dump; its payload "[path] [reason]" is the whole story.
    failed = re.search(r'assertion failed: \[(.*?)\] \[(.*?)\]', e.message)
    if failed:
      path, reason = failed.groups()
      fix = (' Fix: convert it, e.g. iconv -f latin1 -t utf-8 FILE > FILE.utf8.'
             if reason == 'is not valid UTF-8 text' else '')
      raise DataError(f'{path} {reason}.{fix}') from None
    raise DataError(f'{description}: {e.message}') from e


_BLOCKS_PER_READ = 256
# Above this share of [UNK] the vocabulary does not fit the text (a cased vocab.txt, which
# the uncased tokenizer never matches; another language): said, as training would go on.
UNK_WARNING_SHARE = 0.05


def unk_warning(description: str, unk: int, tokens: int) -> str | None:
  """The warning when [UNK] is more than UNK_WARNING_SHARE of the tokens, else None."""
  if tokens and unk / tokens > UNK_WARNING_SHARE:
    return (f'{description}: {unk / tokens:.1%} of the tokens are [UNK]: the vocabulary '
            'does not fit this text (the tokenizer lower-cases: a cased vocab.txt never '
            'matches). Fix: --config.data.vocab_path=<a vocab.txt of this text>.')
  return None


_PACKED: dict[tuple, Blocks] = {}  # one materialisation per process and corpus


def load_packed(data_config, split: str, documents=None) -> Blocks:
  """Packs config.data's corpus once per process, in memory.

  `documents(data_config, split)` gives the {'text'} documents: the trainer passes
  `seqio_tasks.task_documents` (the registered seqio task's source); the default reads the
  embedded corpus or text files directly (the same documents, without seqio).
  """
  task = data_config.task
  vocabulary = WordPiece(data_config.vocab_path)
  check_uncased(vocabulary.tokens, vocabulary.vocab_file)
  text_files = task == sources.TEXT_FILES_TASK
  cache_key = (task, split, data_config.max_seq_len, vocabulary.md5, documents,
               (data_config.text_files, data_config.get('validation_files', ''))
               if text_files else '')
  if cache_key not in _PACKED:
    description = f'task {task} split {split}'
    if text_files:
      files = (data_config.get('validation_files', '') if split == 'validation' else '')
      description += f' ({files or data_config.text_files})'
    docs = (documents or sources.config_documents)(data_config, split)
    dataset = packed_blocks(docs, data_config.max_seq_len, vocabulary)
    # Read in batches, as the shard export does: a Python step per block is pure overhead
    # (measured: about 10% of the load; the tokenising is the rest).
    batches = list(numpy_blocks(dataset.batch(_BLOCKS_PER_READ), description))
    if not batches:
      held_out = (': every 100th document (the first included) is held out for validation, '
                  'so a file of one document leaves training nothing. Fix: more text, or '
                  '--config.data.validation_files' if text_files and split == 'train' and
                  not data_config.get('validation_files') else '')
      raise DataError(f'{description}: empty corpus (no tokens after tokenising){held_out}')
    array = np.concatenate(batches).astype(token_dtype(vocabulary.vocab_size))
    num_tokens = int(np.count_nonzero(array != vocabulary.special.pad))
    warning = unk_warning(description, int(np.count_nonzero(array == vocabulary.special.unk)),
                          num_tokens)
    if warning:
      logging.warning('%s', warning)
    _PACKED[cache_key] = Blocks([array], list(vocabulary.tokens),
                                vocabulary.special.as_dict(), vocabulary.md5, description,
                                num_tokens)
  return _PACKED[cache_key]

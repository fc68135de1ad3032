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


def token_dtype(vocab_size: int):
  return np.uint16 if vocab_size <= 2**16 else np.int32


def packed_blocks(documents, max_seq_len: int, vocabulary):
  """{'text'} documents -> int32 [max_seq_len] blocks, unmasked, in order.

  `vocabulary`: a `tokenizer.WordPiece`, or the seqio Vocabulary that wraps one.
  """
  tf = import_tensorflow()
  check_max_seq_len(max_seq_len)
  special = vocabulary.special
  sep = tf.constant([special.sep], tf.int32)

  def tokenize(texts):   # -> each non-empty document's ids + [SEP], flattened
    ids = tf.cast(vocabulary.encode_tf(texts), tf.int32)  # ragged [docs, pieces]
    ids = tf.ragged.boolean_mask(ids, ids.row_lengths() > 0)
    seps = tf.RaggedTensor.from_row_lengths(
        tf.tile(sep, [ids.nrows()]), tf.ones([ids.nrows()], tf.int64))
    return tf.concat([ids, seps], axis=1).flat_values

  def wrap(chunk):
    block = tf.concat([[special.cls], chunk, [special.sep]], axis=0)
    block = tf.pad(block, [[0, max_seq_len - tf.size(block)]], constant_values=special.pad)
    return tf.ensure_shape(block, [max_seq_len])

  # Plain graph code: AutoGraph would only rewrite it, TF Text's tokenizer included, at
  # every start-up (measured: packing the embedded corpus 7.0 s -> 3.7 s, the same blocks).
  tokenize, wrap = (tf.autograph.experimental.do_not_convert(f) for f in (tokenize, wrap))
  stream = (documents.map(lambda ex: ex['text'])
            .batch(_DOCS_PER_TOKENIZE_CALL)
            .map(tokenize, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True))
  # rebatch = unbatch().batch(body) without materialising one element per token.
  return stream.rebatch(max_seq_len - 2).map(wrap, num_parallel_calls=tf.data.AUTOTUNE,
                                             deterministic=True)


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
             if 'UTF-8' in reason else '')
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

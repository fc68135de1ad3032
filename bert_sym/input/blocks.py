"""Packed blocks: packing documents into them, and reading them back (TF-free).

A block is `max_seq_len` token ids [CLS] ... [SEP]: every document is followed by [SEP],
the documents are concatenated into one stream, and the stream is cut into blocks of
`max_seq_len - 2` tokens, each wrapped as [CLS] ... [SEP], so every training sequence
starts and ends like a BERT input; the last, shorter block is padded rather than dropped
(the embedded corpus is small). This differs from Hugging Face `run_mlm`'s `group_texts`,
which the reference run used: there each document is wrapped as [CLS] doc [SEP], the
stream is cut every 512 tokens without re-wrapping, and the remainder is dropped. The
token budget per block is the same. Packing runs in tf.data (TF).

Blocks come from exported shards on disk (`load_shards`: `.npy` arrays + metadata.json +
vocab.txt, written by `bert_sym.input.export`, memory-mapped, TF-free), or, for a small
corpus, are packed in memory at the first call (`load_packed`: the embedded corpus, text
files up to a few hundred M tokens).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib
import re
from typing import Any, Iterator

import numpy as np

from bert_sym.input import DataError, check_max_seq_len, import_tensorflow, sources
from bert_sym.input.tokenizer import SpecialIds, WordPiece

SHARD_FORMAT_VERSION = 1
METADATA_FILE = 'metadata.json'
VOCAB_FILE = 'vocab.txt'
_DOCS_PER_TOKENIZE_CALL = 64  # TF Text is much faster on a batch of strings than on one.


@dataclasses.dataclass(eq=False)
class Blocks:
  """N packed blocks addressable by index, plus what masking needs."""
  arrays: list[np.ndarray]   # [n_i, L] each (memory-mapped for shards)
  vocab_tokens: list[str]
  special: dict[str, int]
  vocab_md5: str
  description: str           # for error messages

  def __post_init__(self):
    self._starts = np.cumsum([0] + [len(a) for a in self.arrays])

  def __len__(self) -> int:
    return int(self._starts[-1])

  @property
  def max_seq_len(self) -> int:
    return int(self.arrays[0].shape[1])

  def take(self, rows: np.ndarray) -> np.ndarray:
    if len(self.arrays) == 1:
      return np.asarray(self.arrays[0][rows])
    shard = np.searchsorted(self._starts, rows, side='right') - 1
    out = np.empty((len(rows), self.max_seq_len), self.arrays[0].dtype)
    for s in np.unique(shard):
      at = shard == s
      out[at] = self.arrays[s][rows[at] - self._starts[s]]
    return out


def token_dtype(vocab_size: int):
  return np.uint16 if vocab_size <= 2**16 else np.int32


def tokenize_documents(dataset, vocabulary):
  """{'text': string} -> int32 token stream pieces: each non-empty document + [SEP].

  `vocabulary`: a `tokenizer.WordPiece`, or the seqio Vocabulary that wraps one.
  """
  tf = import_tensorflow()
  sep = tf.constant([vocabulary.special.sep], tf.int32)

  def tokenize(texts):
    ids = tf.cast(vocabulary.encode_tf(texts), tf.int32)  # ragged [docs, pieces]
    ids = tf.ragged.boolean_mask(ids, ids.row_lengths() > 0)
    seps = tf.RaggedTensor.from_row_lengths(
        tf.tile(sep, [ids.nrows()]), tf.ones([ids.nrows()], tf.int64))
    return tf.concat([ids, seps], axis=1).flat_values

  return (dataset.map(lambda ex: ex['text'])
          .batch(_DOCS_PER_TOKENIZE_CALL)
          .map(tokenize, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True))


def pack_blocks(token_stream, max_seq_len: int, special: SpecialIds):
  """1-D token pieces -> int32 [max_seq_len] blocks [CLS] ... [SEP] (+ [PAD] at the end)."""
  tf = import_tensorflow()
  check_max_seq_len(max_seq_len)
  body = max_seq_len - 2

  def wrap(chunk):
    block = tf.concat([[special.cls], chunk, [special.sep]], axis=0)
    block = tf.pad(block, [[0, max_seq_len - tf.size(block)]], constant_values=special.pad)
    return tf.ensure_shape(block, [max_seq_len])

  # rebatch = unbatch().batch(body) without materialising one element per token.
  return token_stream.rebatch(body).map(wrap, num_parallel_calls=tf.data.AUTOTUNE,
                                         deterministic=True)


def packed_blocks(documents, max_seq_len: int, vocabulary):
  """A dataset of {'text'} documents, tokenised and packed, unmasked, in order."""
  stream = tokenize_documents(documents, vocabulary)
  return pack_blocks(stream, max_seq_len, vocabulary.special)


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


def read_metadata(shards_dir: str, split: str) -> dict[str, Any]:
  path = pathlib.Path(shards_dir) / split / METADATA_FILE
  if not path.exists():
    raise DataError(f'{path}: no such file; export the shards first: python -m '
                    f'bert_sym.streaming export --split={split} --out_dir={shards_dir} ...')
  metadata = json.loads(path.read_text())
  if metadata.get('format_version') != SHARD_FORMAT_VERSION:
    raise DataError(f'{path}: shard format {metadata.get("format_version")}, this code '
                    f'reads {SHARD_FORMAT_VERSION}; re-export.')
  return metadata


def load_shards(shards_dir: str, split: str, vocab_path: str = '') -> Blocks:
  """Memory-maps an exported split (TF-free)."""
  metadata = read_metadata(shards_dir, split)
  split_dir = pathlib.Path(shards_dir) / split
  vocab_bytes = (split_dir / VOCAB_FILE).read_bytes()
  if hashlib.md5(vocab_bytes).hexdigest() != metadata['vocab_md5']:
    raise DataError(f'{split_dir / VOCAB_FILE}: md5 differs from {METADATA_FILE}; re-export')
  if vocab_path and '://' not in vocab_path:
    given = hashlib.md5(pathlib.Path(vocab_path).read_bytes()).hexdigest()
    if given != metadata['vocab_md5']:
      raise DataError(f'{vocab_path}: vocab md5 {given} differs from the one the shards in '
                      f'{split_dir} were exported with ({metadata["vocab_md5"]}).')
  arrays = []
  for shard in metadata['shards']:
    path = split_dir / shard['file']
    if not path.exists():
      raise DataError(f'{path}: shard listed in {METADATA_FILE} is missing')
    array = np.load(path, mmap_mode='r')
    if array.shape != (shard['num_blocks'], metadata['max_seq_len']):
      raise DataError(f'{path}: shape {array.shape}, metadata says '
                      f'{(shard["num_blocks"], metadata["max_seq_len"])}')
    arrays.append(array)
  tokens = vocab_bytes.decode('utf-8').split('\n')[:metadata['vocab_size']]
  return Blocks(arrays, tokens, metadata['special_ids'], metadata['vocab_md5'],
                description=str(split_dir))


_PACKED: dict[tuple, Blocks] = {}  # one materialisation per process and corpus


def load_packed(data_config, split: str, documents=None) -> Blocks:
  """Packs config.data's corpus once per process, in memory.

  `documents(data_config, split)` gives the {'text'} documents: the trainer passes
  `seqio_tasks.task_documents` (the registered seqio task's source); the default reads the
  embedded corpus or text files directly (the same documents, without seqio).
  """
  task = data_config.task
  vocabulary = WordPiece(data_config.vocab_path)
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
    blocks = list(numpy_blocks(dataset, description))
    if not blocks:
      raise DataError(f'{description}: empty corpus (no tokens after tokenising)')
    array = np.stack(blocks).astype(token_dtype(vocabulary.vocab_size))
    _PACKED[cache_key] = Blocks([array], list(vocabulary.tokens),
                                vocabulary.special.as_dict(), vocabulary.md5, description)
  return _PACKED[cache_key]

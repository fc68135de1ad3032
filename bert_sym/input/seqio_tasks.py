"""seqio tasks for BERT MLM pre-training; `import bert_sym.input.seqio_tasks` registers them
(README.md's Data section lists them; `register_text_files_task` builds the text-files one).

Every task has 'train' and 'validation' splits and yields the five MLM features of
`masking.FEATURES` at `sequence_length['input_ids']`:

  seqio.get_mixture_or_task('bert_sym_mlm_embedded').get_dataset(
      sequence_length={'input_ids': 128}, split='validation', shuffle=False)

Masking inside a task uses the mask seed given at registration (default 0) and the
block's position in the packed stream; the trainer's iterator instead masks packed blocks
with its own seed. Also here: the seqio Vocabulary over `tokenizer.WordPiece` and the TF
twin of `masking.mask_blocks`.
"""

from __future__ import annotations

import functools

import numpy as np
import seqio

from bert_sym.input import MAX_SEQ_LEN, DataError, check_max_seq_len, import_tensorflow
from bert_sym.input import blocks, masking, sources, tokenizer
from bert_sym.input.sources import EMBEDDED_TASK, TEXT_FILES_TASK

tf = import_tensorflow()


class BertWordPieceVocabulary(seqio.Vocabulary):
  """`tokenizer.WordPiece` as a seqio Vocabulary (raw ids, no [CLS]/[SEP], no EOS)."""

  def __init__(self, vocab_path: str = ''):
    self.wordpiece = tokenizer.WordPiece(vocab_path)
    self.special = self.wordpiece.special
    self.md5 = self.wordpiece.md5
    super().__init__(extra_ids=0)

  @property
  def path(self) -> str:
    return self.wordpiece.vocab_file

  @property
  def tokens(self) -> list[str]:
    return list(self.wordpiece.tokens)

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
    return self.wordpiece.vocab_size

  def _encode_tf(self, s: tf.Tensor) -> tf.Tensor:
    return self.wordpiece.encode_tf(s)

  def _decode_tf(self, ids: tf.Tensor) -> tf.Tensor:
    return self.wordpiece.decode_tf(ids)

  def _encode(self, s: str) -> list[int]:
    return self._encode_tf(tf.constant(s)).numpy().tolist()

  def _decode(self, ids) -> str:
    return self._decode_tf(tf.constant(list(ids), tf.int32)).numpy().decode('utf-8')

  def __eq__(self, other) -> bool:
    return isinstance(other, BertWordPieceVocabulary) and self.md5 == other.md5

  def __hash__(self) -> int:
    return hash(self.md5)


@functools.cache
def get_vocabulary(vocab_path: str = '') -> BertWordPieceVocabulary:
  """The seqio vocabulary for `vocab_path` ('' = bert-base-uncased)."""
  return BertWordPieceVocabulary(vocab_path)


# ----------------------------------------------------------------------------------------
# Masking in TF: mirrors `masking.mask_blocks` (NumPy) op for op, so the tasks (tf.data)
# and the trainer's iterator give bit-identical examples (uint32 arithmetic wraps in both;
# TF overloads ^ | & * % on integer tensors, but not >> or <<).
# ----------------------------------------------------------------------------------------

def _fmix32(x: tf.Tensor) -> tf.Tensor:
  rshift = tf.bitwise.right_shift
  x = (x ^ rshift(x, np.uint32(16))) * np.uint32(masking.FMIX_C1)
  x = (x ^ rshift(x, np.uint32(13))) * np.uint32(masking.FMIX_C2)
  return x ^ rshift(x, np.uint32(16))


def _example_key(seed: int, example_index: tf.Tensor) -> tf.Tensor:
  index = tf.cast(example_index, tf.uint64)
  lo = tf.cast(index & np.uint64(0xFFFFFFFF), tf.uint32)
  hi = tf.cast(tf.bitwise.right_shift(index, np.uint64(32)), tf.uint32)
  key = _fmix32(tf.constant((seed & 0xFFFFFFFF) ^ masking.GOLDEN, tf.uint32))
  return _fmix32(_fmix32(key ^ lo) ^ hi)


def _position_bits(key: tf.Tensor, positions: tf.Tensor, stream: int) -> tf.Tensor:
  counter = tf.cast(positions, tf.uint32) * np.uint32(4) | np.uint32(stream)   # p << 2 | s
  return _fmix32(key ^ _fmix32(counter))


def mask_block_tf(block: tf.Tensor, example_index: tf.Tensor, seed: int,
                  spec: masking.MaskSpec) -> dict[str, tf.Tensor]:
  """One int32 [L] block -> the five MLM features; a pure function of (seed, index)."""
  length = tf.shape(block)[0]
  positions = tf.range(length)
  key = _example_key(seed, example_index)
  candidate = tf.gather(tf.constant(spec.maskable), block)
  if spec.whole_word:
    continuation = tf.gather(tf.constant(spec.continuation), block)
    previous = tf.concat([[False], candidate[:-1]], axis=0)
    word_start = candidate & ~(continuation & previous)
  else:
    word_start = candidate
  # Each candidate's word start: the latest word start at or before it.
  word_id = tf.maximum(tf.cumsum(tf.cast(word_start, tf.int32)) - 1, 0)
  start_positions = tf.concat([tf.boolean_mask(positions, word_start), [0]], axis=0)
  start_of = tf.gather(start_positions, word_id)
  score = tf.cast(_position_bits(key, start_of, masking.STREAM_SELECT), tf.int64)
  order_key = tf.where(candidate, score * masking.POSITION_RADIX + tf.cast(start_of, tf.int64),
                       masking.NOT_A_CANDIDATE)
  # A word is predicted iff the candidate tokens of all words ranked up to it fit the
  # budget; written as the O(L^2) definition (the NumPy twin sorts instead).
  ranked_up_to = tf.reduce_sum(
      tf.cast((order_key[None, :] <= order_key[:, None]) & candidate[None, :], tf.int32),
      axis=1)
  num_candidates = tf.reduce_sum(tf.cast(candidate, tf.int32))
  budget = tf.cast(tf.floor(tf.cast(num_candidates, tf.float64) * spec.mask_rate + 0.5),
                   tf.int32)
  budget = tf.minimum(tf.minimum(tf.maximum(budget, 1), spec.max_predictions),
                      num_candidates)
  selected = candidate & (ranked_up_to <= budget)

  action = _position_bits(key, positions, masking.STREAM_ACTION)
  random_token = tf.cast(
      _position_bits(key, positions, masking.STREAM_TOKEN) % np.uint32(spec.vocab_size),
      tf.int32)
  replaced = tf.where(action < np.uint32(masking.MASK_BELOW), spec.mask_id,
                      tf.where(action < np.uint32(masking.RANDOM_BELOW), random_token, block))
  return dict(
      input_ids=tf.where(selected, replaced, block),
      token_type_ids=tf.zeros_like(block),
      attention_mask=tf.cast(block != spec.pad_id, tf.int32),
      mlm_targets=tf.where(selected, block, 0),
      mlm_weights=tf.cast(selected, tf.float32),
  )


def mask_blocks_tf(blocks: tf.data.Dataset, seed: int, spec: masking.MaskSpec,
                   first_index: int = 0) -> tf.data.Dataset:
  """Masks the i-th block with example index `first_index + i`."""
  return blocks.enumerate(start=first_index).map(
      lambda i, block: mask_block_tf(block, i, seed, spec),
      num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def _max_seq_len(sequence_length: dict[str, int] | None) -> int:
  if not sequence_length or not sequence_length.get('input_ids'):
    raise ValueError("bert_sym MLM tasks need sequence_length={'input_ids': L, ...}")
  lengths = {v for k, v in sequence_length.items() if k in masking.FEATURES and v}
  if len(lengths) != 1:
    raise ValueError(f'all MLM features share one length; got {sequence_length}')
  return check_max_seq_len(lengths.pop())


def tokenize_and_pack(dataset: tf.data.Dataset, sequence_length, output_features
                      ) -> tf.data.Dataset:
  vocabulary = output_features['input_ids'].vocabulary
  return blocks.packed_blocks(dataset, _max_seq_len(sequence_length), vocabulary)


def mask_for_mlm(dataset: tf.data.Dataset, output_features, *, seed: int = 0,
                 mask_rate: float = 0.15, whole_word: bool = False,
                 max_predictions: int | None = None) -> tf.data.Dataset:
  """Packed blocks -> MLM features. `max_predictions=None`: no cap beyond the rate."""
  vocabulary = output_features['input_ids'].vocabulary
  spec = masking.MaskSpec.from_vocab(
      vocabulary.tokens, vocabulary.special.as_dict(), mask_rate=mask_rate,
      whole_word=whole_word, max_predictions=max_predictions or MAX_SEQ_LEN)
  return mask_blocks_tf(dataset, seed, spec)


def output_features(vocabulary: seqio.Vocabulary) -> dict[str, seqio.Feature]:
  ints = dict(vocabulary=vocabulary, add_eos=False, dtype=tf.int32, rank=1)
  return dict(
      input_ids=seqio.Feature(**ints),
      token_type_ids=seqio.Feature(**ints),
      attention_mask=seqio.Feature(**ints),
      mlm_targets=seqio.Feature(**ints),
      mlm_weights=seqio.Feature(vocabulary=seqio.PassThroughVocabulary(1), add_eos=False,
                                dtype=tf.float32, rank=1),
  )


def _register(name: str, source: seqio.DataSource, vocab_path: str = '', *,
              mask_seed: int = 0, mask_rate: float = 0.15, whole_word: bool = False,
              max_predictions: int | None = None) -> seqio.Task:
  if name in seqio.TaskRegistry.names():
    seqio.TaskRegistry.remove(name)  # re-registration (e.g. new globs) replaces the task
  return seqio.TaskRegistry.add(
      name,
      source=source,
      preprocessors=[
          tokenize_and_pack,
          functools.partial(mask_for_mlm, seed=mask_seed, mask_rate=mask_rate,
                            whole_word=whole_word, max_predictions=max_predictions),
      ],
      output_features=output_features(get_vocabulary(vocab_path)),
  )


def documents(task_name: str, split: str, part: int = 0, num_parts: int = 1):
  """The task's {'text'} documents in source order (no shuffle); part `part` of
  `num_parts` is a set of TFDS files, or every num_parts-th document of a function source."""
  task = seqio.get_mixture_or_task(task_name)
  if split not in task.splits:
    raise DataError(f'seqio task {task_name} has no split {split!r}; it has {task.splits}')
  if isinstance(task.source, seqio.TfdsDataSource):
    return task.source.get_dataset(split=split, shuffle=False,
                                   shard_info=seqio.ShardInfo(part, num_parts))
  dataset = task.source.get_dataset(split=split, shuffle=False)   # read whole per part
  return dataset.shard(num_parts, part) if num_parts > 1 else dataset


def packed_blocks(task_name: str, split: str, max_seq_len: int,
                  vocabulary: BertWordPieceVocabulary | None = None, part: int = 0,
                  num_parts: int = 1) -> tf.data.Dataset:
  """`documents`, tokenised and packed, unmasked."""
  vocabulary = (vocabulary or
                seqio.get_mixture_or_task(task_name).output_features['input_ids'].vocabulary)
  return blocks.packed_blocks(documents(task_name, split, part, num_parts), max_seq_len,
                              vocabulary)


def register_text_files_task(name: str, patterns: str | list[str], *, vocab_path: str = '',
                             holdout_every: int = sources.HOLDOUT_EVERY,
                             validation_patterns: str | list[str] = '', **mask_kwargs
                             ) -> seqio.Task:
  """Registers (or replaces) task `name` over text files matching `patterns`.

  `patterns`, `holdout_every`, `validation_patterns`: see `sources.text_files_dataset_fn`;
  `vocab_path`: the output features' vocab.txt ('' = bert-base-uncased); `mask_kwargs`:
  mask_seed, mask_rate, whole_word, max_predictions for get_dataset.
  """
  source = seqio.FunctionDataSource(  # a bad glob fails here, at configuration time
      sources.text_files_dataset_fn(patterns, holdout_every=holdout_every,
                                    validation_patterns=validation_patterns),
      splits=sources.SPLITS)
  return _register(name, source, vocab_path, **mask_kwargs)


def task_documents(data_config, split: str):
  """The documents of config.data's registered seqio task: what the trainer packs for
  source='seqio', so a task registered under any name is read."""
  return documents(task_for_config(data_config), split)


def task_for_config(data_config) -> str:
  """The task name for `config.data`, registering the text-files task from its globs."""
  if data_config.task == TEXT_FILES_TASK:
    register_text_files_task(TEXT_FILES_TASK, data_config.text_files,
                             vocab_path=data_config.vocab_path,
                             validation_patterns=data_config.get('validation_files', ''))
  return data_config.task


_register(EMBEDDED_TASK, seqio.FunctionDataSource(sources.embedded_dataset,
                                                  splits=sources.SPLITS))
for _name, (_tfds_name, _splits) in sources.TFDS_SOURCES.items():
  _register(_name, seqio.TfdsDataSource(tfds_name=_tfds_name, splits=_splits))

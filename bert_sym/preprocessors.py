"""seqio preprocessors for BERT MLM pre-training, in TF ops (they run inside tf.data).

  documents ('text') -> tokenize_documents -> pack_blocks -> mask_blocks -> MLM features

`pack_blocks`: every document is followed by [SEP], the documents are concatenated into
one stream, and the stream is cut into blocks of `max_seq_len - 2` tokens, each wrapped as
[CLS] ... [SEP], so every training sequence starts and ends like a BERT input; the last,
shorter block is padded rather than dropped (the embedded corpus is small). This differs
from Hugging Face `run_mlm`'s `group_texts`, which the reference run used: there each
document is wrapped as [CLS] doc [SEP], the stream is cut every 512 tokens without
re-wrapping, and the remainder is dropped. The token budget per block is the same. `mask_block_tf` mirrors `bert_sym.data.mask_blocks` (NumPy) op
for op, so the tf.data and the TF-free paths give bit-identical examples.
"""

from __future__ import annotations

import seqio
import tensorflow as tf

from bert_sym import data as data_lib
from bert_sym import vocab as vocab_lib

MAX_SEQ_LEN = data_lib.MAX_SEQ_LEN
_DOCS_PER_TOKENIZE_CALL = 64  # TF Text is much faster on a batch of strings than on one.


def tokenize_documents(dataset: tf.data.Dataset,
                       vocabulary: vocab_lib.BertWordPieceVocabulary) -> tf.data.Dataset:
  """{'text': string} -> int32 token stream pieces: each non-empty document + [SEP]."""
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


def pack_blocks(token_stream: tf.data.Dataset, max_seq_len: int,
                special: vocab_lib.SpecialIds) -> tf.data.Dataset:
  """1-D token pieces -> int32 [max_seq_len] blocks [CLS] ... [SEP] (+ [PAD] at the end)."""
  data_lib.check_max_seq_len(max_seq_len)
  body = max_seq_len - 2

  def wrap(chunk):
    block = tf.concat([[special.cls], chunk, [special.sep]], axis=0)
    block = tf.pad(block, [[0, max_seq_len - tf.size(block)]], constant_values=special.pad)
    return tf.ensure_shape(block, [max_seq_len])

  # rebatch = unbatch().batch(body) without materialising one element per token.
  return token_stream.rebatch(body).map(wrap, num_parallel_calls=tf.data.AUTOTUNE,
                                         deterministic=True)


# ----------------------------------------------------------------------------------------
# Masking: the TF twin of bert_sym.data.mask_blocks (same hash, same selection rule).
# ----------------------------------------------------------------------------------------

def _fmix32(x: tf.Tensor) -> tf.Tensor:
  """murmur3's 32-bit finaliser; uint32 arithmetic wraps as in NumPy."""
  x = tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, tf.constant(16, tf.uint32)))
  x = x * tf.constant(data_lib.FMIX_C1, tf.uint32)
  x = tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, tf.constant(13, tf.uint32)))
  x = x * tf.constant(data_lib.FMIX_C2, tf.uint32)
  return tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, tf.constant(16, tf.uint32)))


def _example_key(seed: int, example_index: tf.Tensor) -> tf.Tensor:
  index = tf.cast(example_index, tf.uint64)
  lo = tf.cast(tf.bitwise.bitwise_and(index, tf.constant(0xFFFFFFFF, tf.uint64)), tf.uint32)
  hi = tf.cast(tf.bitwise.right_shift(index, tf.constant(32, tf.uint64)), tf.uint32)
  key = _fmix32(tf.constant((seed & 0xFFFFFFFF) ^ data_lib.GOLDEN, tf.uint32))
  return _fmix32(tf.bitwise.bitwise_xor(_fmix32(tf.bitwise.bitwise_xor(key, lo)), hi))


def _position_bits(key: tf.Tensor, positions: tf.Tensor, stream: int) -> tf.Tensor:
  counter = tf.bitwise.bitwise_or(
      tf.bitwise.left_shift(tf.cast(positions, tf.uint32), tf.constant(2, tf.uint32)),
      tf.constant(stream, tf.uint32))
  return _fmix32(tf.bitwise.bitwise_xor(key, _fmix32(counter)))


def mask_block_tf(block: tf.Tensor, example_index: tf.Tensor, seed: int,
                  spec: data_lib.MaskSpec) -> dict[str, tf.Tensor]:
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
  score = tf.cast(_position_bits(key, start_of, data_lib.STREAM_SELECT),
                  tf.int64)
  order_key = tf.where(candidate, score * data_lib.POSITION_RADIX + tf.cast(start_of, tf.int64),
                       data_lib.NOT_A_CANDIDATE)
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

  action = _position_bits(key, positions, data_lib.STREAM_ACTION)
  random_token = tf.cast(
      _position_bits(key, positions, data_lib.STREAM_TOKEN) % tf.constant(
          spec.vocab_size, tf.uint32), tf.int32)
  replaced = tf.where(action < tf.constant(data_lib.MASK_BELOW, tf.uint32), spec.mask_id,
                      tf.where(action < tf.constant(data_lib.RANDOM_BELOW, tf.uint32),
                               random_token, block))
  return dict(
      input_ids=tf.where(selected, replaced, block),
      token_type_ids=tf.zeros_like(block),
      attention_mask=tf.cast(block != spec.pad_id, tf.int32),
      mlm_targets=tf.where(selected, block, 0),
      mlm_weights=tf.cast(selected, tf.float32),
  )


def mask_blocks(blocks: tf.data.Dataset, seed: int, spec: data_lib.MaskSpec,
                first_index: int = 0) -> tf.data.Dataset:
  """Masks the i-th block with example index `first_index + i`."""
  return blocks.enumerate(start=first_index).map(
      lambda i, block: mask_block_tf(block, i, seed, spec),
      num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


# ----------------------------------------------------------------------------------------
# The same steps as seqio preprocessors (sequence length chosen at get_dataset time).
# ----------------------------------------------------------------------------------------

def _max_seq_len(sequence_length: dict[str, int] | None) -> int:
  if not sequence_length or not sequence_length.get('input_ids'):
    raise ValueError("bert_sym MLM tasks need sequence_length={'input_ids': L, ...}")
  lengths = {v for k, v in sequence_length.items() if k in data_lib.FEATURES and v}
  if len(lengths) != 1:
    raise ValueError(f'all MLM features share one length; got {sequence_length}')
  return data_lib.check_max_seq_len(lengths.pop())


def tokenize_and_pack(dataset: tf.data.Dataset, sequence_length, output_features
                      ) -> tf.data.Dataset:
  vocabulary = output_features['input_ids'].vocabulary
  stream = tokenize_documents(dataset, vocabulary)
  return pack_blocks(stream, _max_seq_len(sequence_length), vocabulary.special)


def mask_for_mlm(dataset: tf.data.Dataset, output_features, *, seed: int = 0,
                 mask_rate: float = 0.15, whole_word: bool = False,
                 max_predictions: int | None = None) -> tf.data.Dataset:
  """Packed blocks -> MLM features. `max_predictions=None`: no cap beyond the rate."""
  vocabulary = output_features['input_ids'].vocabulary
  spec = data_lib.MaskSpec.from_vocab(
      vocabulary.tokens, vocabulary.special.as_dict(), mask_rate=mask_rate,
      whole_word=whole_word, max_predictions=max_predictions or MAX_SEQ_LEN)
  return mask_blocks(dataset, seed, spec)


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

"""The TF twin of `bert_sym.input.masking`: the same hash, the same selection rule.

`mask_block_tf` mirrors `masking.mask_blocks` (NumPy) op for op, so the seqio tasks
(tf.data) and the trainer's iterator give bit-identical examples. Imports TensorFlow.
"""

from __future__ import annotations

from bert_sym.input import import_tensorflow, masking

tf = import_tensorflow()


def _fmix32(x: tf.Tensor) -> tf.Tensor:
  """murmur3's 32-bit finaliser; uint32 arithmetic wraps as in NumPy."""
  x = tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, tf.constant(16, tf.uint32)))
  x = x * tf.constant(masking.FMIX_C1, tf.uint32)
  x = tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, tf.constant(13, tf.uint32)))
  x = x * tf.constant(masking.FMIX_C2, tf.uint32)
  return tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, tf.constant(16, tf.uint32)))


def _example_key(seed: int, example_index: tf.Tensor) -> tf.Tensor:
  index = tf.cast(example_index, tf.uint64)
  lo = tf.cast(tf.bitwise.bitwise_and(index, tf.constant(0xFFFFFFFF, tf.uint64)), tf.uint32)
  hi = tf.cast(tf.bitwise.right_shift(index, tf.constant(32, tf.uint64)), tf.uint32)
  key = _fmix32(tf.constant((seed & 0xFFFFFFFF) ^ masking.GOLDEN, tf.uint32))
  return _fmix32(tf.bitwise.bitwise_xor(_fmix32(tf.bitwise.bitwise_xor(key, lo)), hi))


def _position_bits(key: tf.Tensor, positions: tf.Tensor, stream: int) -> tf.Tensor:
  counter = tf.bitwise.bitwise_or(
      tf.bitwise.left_shift(tf.cast(positions, tf.uint32), tf.constant(2, tf.uint32)),
      tf.constant(stream, tf.uint32))
  return _fmix32(tf.bitwise.bitwise_xor(key, _fmix32(counter)))


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
  score = tf.cast(_position_bits(key, start_of, masking.STREAM_SELECT),
                  tf.int64)
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
      _position_bits(key, positions, masking.STREAM_TOKEN) % tf.constant(
          spec.vocab_size, tf.uint32), tf.int32)
  replaced = tf.where(action < tf.constant(masking.MASK_BELOW, tf.uint32), spec.mask_id,
                      tf.where(action < tf.constant(masking.RANDOM_BELOW, tf.uint32),
                               random_token, block))
  return dict(
      input_ids=tf.where(selected, replaced, block),
      token_type_ids=tf.zeros_like(block),
      attention_mask=tf.cast(block != spec.pad_id, tf.int32),
      mlm_targets=tf.where(selected, block, 0),
      mlm_weights=tf.cast(selected, tf.float32),
  )


def mask_blocks(blocks: tf.data.Dataset, seed: int, spec: masking.MaskSpec,
                first_index: int = 0) -> tf.data.Dataset:
  """Masks the i-th block with example index `first_index + i`."""
  return blocks.enumerate(start=first_index).map(
      lambda i, block: mask_block_tf(block, i, seed, spec),
      num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

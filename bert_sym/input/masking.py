"""BERT masking with a counter-based hash RNG (NumPy), and the epoch permutation.

Masking is a pure function of (seed, g, block), g being the example's global index: a
murmur3 finaliser hashes (seed, g, position, stream) into the random bits of each
decision, so any batch is computed from its step alone (O(1) resume, no RNG state). The
seqio tasks mask with this same function (`seqio_tasks.mask_blocks_tf`).
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import numpy as np

from bert_sym.input import MAX_SEQ_LEN, DataError

FEATURES = ('input_ids', 'token_type_ids', 'attention_mask', 'mlm_targets', 'mlm_weights')

# Counter-based RNG: murmur3 fmix32 constants, a golden-ratio seed offset, one stream per
# random decision.
FMIX_C1 = 0x85EBCA6B
FMIX_C2 = 0xC2B2AE35
GOLDEN = 0x9E3779B9
STREAM_SELECT, STREAM_ACTION, STREAM_TOKEN, STREAM_PERMUTE = 0, 1, 2, 3
MASK_BELOW = int(0.8 * 2**32)     # action bits below this: [MASK] (80%)
RANDOM_BELOW = int(0.9 * 2**32)   # below this: random token (10%); else unchanged (10%)
POSITION_RADIX = 1024             # > MAX_SEQ_LEN: (score, word start) as one int64 key
NOT_A_CANDIDATE = 2**62           # larger than every candidate's key


@dataclasses.dataclass(frozen=True, eq=False)
class MaskSpec:
  """What masking needs to know about the vocabulary, and the masking knobs."""
  vocab_size: int
  pad_id: int
  mask_id: int
  maskable: np.ndarray       # bool [vocab]: False for [PAD] [UNK] [CLS] [SEP] [MASK]
  continuation: np.ndarray   # bool [vocab]: WordPiece '##' pieces
  mask_rate: float = 0.15
  whole_word: bool = False
  max_predictions: int = MAX_SEQ_LEN

  @classmethod
  def from_vocab(cls, tokens: list[str], special: Mapping[str, int], **knobs) -> 'MaskSpec':
    if not 0.0 < knobs.get('mask_rate', 0.15) < 1.0:
      raise DataError(f'mask_rate must be in (0, 1), got {knobs["mask_rate"]}')
    maskable = np.ones(len(tokens), bool)
    maskable[list(special.values())] = False
    continuation = np.array([t.startswith('##') for t in tokens], bool)
    return cls(vocab_size=len(tokens), pad_id=special['pad'], mask_id=special['mask'],
               maskable=maskable, continuation=continuation, **knobs)


def fmix32(x: np.ndarray) -> np.ndarray:
  x = x ^ (x >> np.uint32(16))
  x = x * np.uint32(FMIX_C1)
  x = x ^ (x >> np.uint32(13))
  x = x * np.uint32(FMIX_C2)
  return x ^ (x >> np.uint32(16))


def example_keys(seed: int, example_index: np.ndarray) -> np.ndarray:
  index = np.asarray(example_index, np.uint64)
  lo = (index & np.uint64(0xFFFFFFFF)).astype(np.uint32)
  hi = (index >> np.uint64(32)).astype(np.uint32)
  key = fmix32(np.uint32((seed & 0xFFFFFFFF) ^ GOLDEN))
  return fmix32(fmix32(key ^ lo) ^ hi)


def position_bits(keys: np.ndarray, positions: np.ndarray, stream: int) -> np.ndarray:
  counter = (positions.astype(np.uint32) << np.uint32(2)) | np.uint32(stream)
  return fmix32(keys ^ fmix32(counter))


def mask_blocks(blocks: np.ndarray, example_index: np.ndarray, seed: int,
                spec: MaskSpec) -> dict[str, np.ndarray]:
  """BERT masking of int [B, L] blocks; row b is example `example_index[b]`.

  Budget per row: k = min(max_predictions, max(1, round(rate * n))) of the n maskable
  tokens (original BERT). Units (tokens, or whole words) are ranked by a hash score and
  taken while the running token count stays <= k. Each chosen token becomes [MASK] (80%),
  a uniformly random id (10%) or stays (10%); all chosen tokens are targets.
  """
  blocks = np.asarray(blocks).astype(np.int32)
  batch, length = blocks.shape
  with np.errstate(over='ignore'):
    keys = example_keys(seed, example_index)[:, None]
    positions = np.broadcast_to(np.arange(length, dtype=np.int64), (batch, length))
    candidate = spec.maskable[blocks]
    if spec.whole_word:
      previous = np.pad(candidate[:, :-1], ((0, 0), (1, 0)))
      word_start = candidate & ~(spec.continuation[blocks] & previous)
    else:
      word_start = candidate
    start_of = np.maximum.accumulate(np.where(word_start, positions, 0), axis=1)
    score = position_bits(keys, start_of, STREAM_SELECT).astype(np.int64)
    order_key = np.where(candidate, score * POSITION_RADIX + start_of, NOT_A_CANDIDATE)
    # ranked_up_to[t] = #candidates whose key <= key[t]; tokens of a word share a key.
    order = np.argsort(order_key, axis=1, kind='stable')
    sorted_key = np.take_along_axis(order_key, order, axis=1)
    last_of_key = np.ones_like(candidate)
    last_of_key[:, :-1] = sorted_key[:, :-1] != sorted_key[:, 1:]
    end = np.where(last_of_key, np.arange(length), length)
    end = np.minimum.accumulate(end[:, ::-1], axis=1)[:, ::-1]
    ranked_up_to = np.empty_like(end)
    np.put_along_axis(ranked_up_to, order, end + 1, axis=1)

    num_candidates = candidate.sum(axis=1)
    budget = np.floor(num_candidates.astype(np.float64) * spec.mask_rate + 0.5).astype(np.int64)
    budget = np.minimum(np.clip(budget, 1, spec.max_predictions), num_candidates)
    selected = candidate & (ranked_up_to <= budget[:, None])

    action = position_bits(keys, positions, STREAM_ACTION)
    random_token = (position_bits(keys, positions, STREAM_TOKEN)
                    % np.uint32(spec.vocab_size)).astype(np.int32)
  replaced = np.where(action < np.uint32(MASK_BELOW), np.int32(spec.mask_id),
                      np.where(action < np.uint32(RANDOM_BELOW), random_token, blocks))
  return dict(
      input_ids=np.where(selected, replaced, blocks).astype(np.int32),
      token_type_ids=np.zeros_like(blocks),
      attention_mask=(blocks != spec.pad_id).astype(np.int32),
      mlm_targets=np.where(selected, blocks, 0).astype(np.int32),
      mlm_weights=selected.astype(np.float32),
  )


def permutation(num_blocks: int, seed: int, epoch: int) -> np.ndarray:
  """A hash-defined permutation: stable across NumPy versions and platforms."""
  with np.errstate(over='ignore'):
    key = example_keys(seed ^ 0x5EED, np.array([epoch]))
    bits = position_bits(key, np.arange(num_blocks, dtype=np.int64), STREAM_PERMUTE)
  order_key = (bits.astype(np.uint64) << np.uint64(32)) | np.arange(num_blocks,
                                                                   dtype=np.uint64)
  return np.argsort(order_key).astype(np.int64)

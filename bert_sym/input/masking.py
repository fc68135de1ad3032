"""BERT masking with a counter-based hash RNG (NumPy).

Masking is a pure function of (seed, g, block), g being the example's index in the stream
that is read: a murmur3 finaliser hashes (seed, g, the block's ids, position, stream) into
the random bits of each decision, so any batch is computed from its step alone (O(1)
resume, no RNG state). The seqio tasks mask with this same function
(`seqio_tasks.mask_blocks_tf`). The block's ids enter the key because g alone is not
global there: a seqio client reading a task in shards (get_dataset with a ShardInfo per
host, as t5x does) numbers every shard's blocks from 0, and keyed by (seed, g) the k-th
blocks of all shards were masked at the same positions with the same 80/10/10 draws. g
stays in the key so that a block read again (the next epoch, a repeated document) is
masked anew.
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
STREAM_SELECT, STREAM_ACTION, STREAM_TOKEN = 0, 1, 2
STREAM_CONTENT = 3                # the last free stream (2 bits): hashes the block's ids
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


def block_keys(seed: int, example_index: np.ndarray, blocks: np.ndarray) -> np.ndarray:
  """uint32 [B]: the key of row b's random draws, from (seed, example_index[b], blocks[b]).

  The row's ids are hashed as a wrapping sum of one hash per (position, id): vectorised
  over the whole batch, order-sensitive, and two different blocks collide with
  probability about 2^-32. Callers wrap uint32 overflow (np.errstate), as mask_blocks does.
  """
  blocks = np.asarray(blocks)
  positions = np.arange(blocks.shape[1], dtype=np.int64)
  terms = position_bits(blocks.astype(np.uint32), positions, STREAM_CONTENT)
  total = terms.sum(axis=1, dtype=np.uint64)   # < 2^41 at 512 positions: no wrap
  content = fmix32((total & np.uint64(0xFFFFFFFF)).astype(np.uint32)
                   ^ (total >> np.uint64(32)).astype(np.uint32))
  return fmix32(example_keys(seed, example_index) ^ content)


def mask_blocks(blocks: np.ndarray, example_index: np.ndarray, seed: int,
                spec: MaskSpec) -> dict[str, np.ndarray]:
  """BERT masking of int [B, L] blocks; row b is example `example_index[b]`.

  Selection follows google-research/bert `create_masked_lm_predictions`: the budget per
  row is num_to_predict = min(max_predictions, max(1, round(rate * n))) with n the row's
  tokens ([CLS] and [SEP] included, padding not; Python's round, half to even); units
  (tokens, or whole words) are visited in a random order (a hash score in place of
  rng.shuffle) and a unit is taken when it fits in what is left of the budget; one that
  would overflow it is skipped and the next one tried. Candidates are the maskable tokens
  (BERT's: all but [CLS] and [SEP]; here [PAD], [UNK] and [MASK] are left out too). Each
  chosen token becomes [MASK] (80%), a uniformly random id (10%) or stays (10%); all
  chosen tokens are targets.
  """
  blocks = np.asarray(blocks).astype(np.int32)
  batch, length = blocks.shape
  with np.errstate(over='ignore'):
    keys = block_keys(seed, example_index, blocks)[:, None]
    positions = np.broadcast_to(np.arange(length, dtype=np.int64), (batch, length))
    candidate = spec.maskable[blocks]
    if spec.whole_word:
      previous = np.pad(candidate[:, :-1], ((0, 0), (1, 0)))
      word_start = candidate & ~(spec.continuation[blocks] & previous)
    else:
      word_start = candidate
    start_of = np.maximum.accumulate(np.where(word_start, positions, 0), axis=1)
    score = position_bits(keys, start_of, STREAM_SELECT).astype(np.int64)
    # The visiting order of the units: ascending (score, word start), one key per unit.
    unit_key = np.where(word_start, score * POSITION_RADIX + start_of, NOT_A_CANDIDATE)
    num_tokens = (blocks != spec.pad_id).sum(axis=1)
    budget = np.minimum(spec.max_predictions,
                        np.maximum(1, np.rint(num_tokens * spec.mask_rate))).astype(np.int64)
    taken_start = _take_units(unit_key, _unit_lengths(candidate, start_of), budget)
    selected = candidate & np.take_along_axis(taken_start, start_of, axis=1)

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


def _unit_lengths(candidate: np.ndarray, start_of: np.ndarray) -> np.ndarray:
  """int [B, L]: at a unit's first position, its number of candidate tokens."""
  lengths = np.zeros(candidate.shape, np.int64)
  rows = np.broadcast_to(np.arange(candidate.shape[0])[:, None], candidate.shape)
  np.add.at(lengths, (rows[candidate], start_of[candidate]), 1)
  return lengths


def _take_units(unit_key: np.ndarray, unit_length: np.ndarray,
                budget: np.ndarray) -> np.ndarray:
  """bool [B, L] at unit starts: BERT's greedy pass over the units in key order.

  A unit is taken if it fits in the budget left, skipped if it would overflow it; the pass
  ends when the budget is used up. Vectorised over rows, one iteration per rank; with
  single-token units nothing can overflow, so the first `budget` units are the answer.
  """
  order = np.argsort(unit_key, axis=1, kind='stable')
  is_unit = np.take_along_axis(unit_key, order, axis=1) != NOT_A_CANDIDATE
  length = np.where(is_unit, np.take_along_axis(unit_length, order, axis=1), 0)
  if (length <= 1).all():
    take = is_unit & (np.cumsum(length, axis=1) <= budget[:, None])
  else:
    take = np.zeros_like(is_unit)
    used = np.zeros_like(budget)
    for rank in range(length.shape[1]):
      open_rows = used < budget
      if not (open_rows & is_unit[:, rank]).any():   # units come first in every row
        break
      fits = is_unit[:, rank] & open_rows & (used + length[:, rank] <= budget)
      take[:, rank] = fits
      used += np.where(fits, length[:, rank], 0)
  taken = np.zeros_like(take)
  np.put_along_axis(taken, order, take, axis=1)
  return taken

"""`masking.mask_blocks` selects exactly what BERT's `create_masked_lm_predictions` selects.

The reference below is written from google-research/bert create_pretraining_data.py (the
function of that name), independently of bert_sym: candidate units built from token
strings, num_to_predict = min(max_predictions_per_seq, max(1, int(round(len(tokens) *
masked_lm_prob)))) over all tokens of the instance, then one pass over the shuffled units
that skips a unit overflowing the budget and goes on. The two share the random draws: the
reference's rng.shuffle puts the units in the order of bert_sym's hash score, so the
selected positions must agree position for position. The 80/10/10 replacement draws are
not shared (checked by their statistics in test_data.py).

Candidates differ in one documented way: BERT masks every token but [CLS] and [SEP];
bert_sym also leaves out [PAD], [UNK] and [MASK], so the reference is told to skip them
too, and the blocks never put a '##' piece right after a token that is not a candidate
(BERT would glue it to the previous candidate word, across the special token).
"""

import numpy as np
import pytest
from scipy import stats

from bert_sym.input import DataError
from bert_sym.input import masking
from bert_sym.input import tokenizer as vocab_lib

L = 64
NOT_CANDIDATES = ('[CLS]', '[SEP]')          # BERT's
ALSO_SKIPPED = ('[PAD]', '[UNK]', '[MASK]')   # bert_sym's vocabulary specials


def create_masked_lm_positions(tokens, masked_lm_prob, max_predictions_per_seq,
                               do_whole_word_mask, shuffle, skipped=None):
  """BERT's selection (create_masked_lm_predictions), returning the masked positions.

  `skipped` (a list) collects the units passed over for overflowing the budget.
  """
  cand_indexes = []
  for i, token in enumerate(tokens):
    if token in NOT_CANDIDATES or token in ALSO_SKIPPED:
      continue
    if do_whole_word_mask and len(cand_indexes) >= 1 and token.startswith('##'):
      cand_indexes[-1].append(i)
    else:
      cand_indexes.append([i])
  shuffle(cand_indexes)
  num_to_predict = min(max_predictions_per_seq,
                       max(1, int(round(len(tokens) * masked_lm_prob))))
  masked, covered = [], set()
  for index_set in cand_indexes:
    if len(masked) >= num_to_predict:
      break
    if len(masked) + len(index_set) > num_to_predict:
      if skipped is not None:
        skipped.append(index_set)
      continue
    if any(index in covered for index in index_set):
      continue
    for index in index_set:
      covered.add(index)
      masked.append(index)
  return sorted(masked)


def _vocab():
  path = vocab_lib.default_vocab_file()
  tokens = vocab_lib.read_vocab(path)
  return tokens, vocab_lib.special_ids(tokens, path).as_dict()


def _blocks(tokens, special, rows, seed=0):
  """[CLS] text [SEP] text [SEP] [PAD]...: random WordPiece ids of varying length, long
  words ('##' runs) frequent, a few [UNK]; padded rows of every length down to 3."""
  rng = np.random.default_rng(seed)
  pieces = np.flatnonzero([t.startswith('##') for t in tokens])
  words = np.array([i for i, t in enumerate(tokens)
                    if not t.startswith(('##', '[')) and i not in special.values()])
  out = np.full((rows, L), special['pad'], np.int64)
  for r in range(rows):
    n = L if r % 3 else int(rng.integers(3, L + 1))
    row, previous_is_candidate = [special['cls']], False
    while len(row) < n - 1:
      if len(row) == n // 2:
        row.append(special['sep'])
        previous_is_candidate = False
      elif previous_is_candidate and rng.random() < 0.45:   # long words are common
        row.append(int(rng.choice(pieces)))
      elif rng.random() < 0.02:
        row.append(special['unk'])
        previous_is_candidate = False
        continue
      else:
        row.append(int(rng.choice(words)))
      previous_is_candidate = row[-1] != special['sep']
    out[r, :n] = row[:n - 1] + [special['sep']]
  return out


def _shuffle_like(seed, example, row):
  """rng.shuffle for the reference: the units in bert_sym's hash order (score, start), keyed
  by (seed, example index, the block's ids) as mask_blocks keys them."""
  with np.errstate(over='ignore'):   # uint32 hash arithmetic wraps by design
    key = masking.block_keys(seed, np.array([example]), row[None])

  def shuffle(cand_indexes):
    starts = np.array([unit[0] for unit in cand_indexes], np.int64)
    with np.errstate(over='ignore'):
      score = masking.position_bits(key, starts, masking.STREAM_SELECT).astype(np.int64)
    order = np.lexsort((starts, score))
    cand_indexes[:] = [cand_indexes[i] for i in order]
  return shuffle


@pytest.mark.parametrize('whole_word,rate,max_predictions', [
    (True, 0.15, 20), (False, 0.15, 20), (True, 0.4, 12), (True, 0.15, 64)])
def test_selection_matches_bert_create_masked_lm_predictions(whole_word, rate,
                                                             max_predictions):
  tokens, special = _vocab()
  spec = masking.MaskSpec.from_vocab(tokens, special, mask_rate=rate, whole_word=whole_word,
                                     max_predictions=max_predictions)
  blocks = _blocks(tokens, special, rows=300)
  seed, first = 11, 1000
  out = masking.mask_blocks(blocks, first + np.arange(len(blocks)), seed, spec)
  rows_with_a_skip = 0
  for r, row in enumerate(blocks):
    row_tokens = [tokens[i] for i in row if i != special['pad']]
    skipped = []
    expected = create_masked_lm_positions(
        row_tokens, rate, max_predictions, whole_word,
        _shuffle_like(seed, first + r, row), skipped)
    got = np.flatnonzero(out['mlm_weights'][r]).tolist()
    assert got == expected, f'row {r}: {got} != {expected}'
    rows_with_a_skip += bool(skipped)
  # The blocks exercise the rule that differs from stopping at the first overflow.
  assert rows_with_a_skip > (30 if whole_word else -1)


def test_budget_counts_every_token_of_the_instance():
  """The budget is 15% of all non-padding tokens ([CLS], [SEP], [UNK] included), rounded as
  Python's round; with whole words, skipping the overflowing ones fills it almost always."""
  tokens, special = _vocab()
  blocks = _blocks(tokens, special, rows=3000, seed=1)
  lengths = (blocks != special['pad']).sum(axis=1)
  budget = np.array([max(1, int(round(n * 0.15))) for n in lengths])
  # Half to even: a 30-token row (4.5) gets 4 predictions, a 10-token row (1.5) gets 2.
  assert {30, 10} <= set(lengths.tolist())
  assert budget[lengths == 30].max() == 4 and budget[lengths == 10].max() == 2
  spec = masking.MaskSpec.from_vocab(tokens, special, max_predictions=L)
  counts = masking.mask_blocks(blocks, np.arange(len(blocks)), 0, spec)['mlm_weights'].sum(1)
  # (a short row of [CLS] [UNK] [SEP] has nothing to mask)
  np.testing.assert_array_equal(counts, np.minimum(budget, spec.maskable[blocks].sum(1)))
  spec = masking.MaskSpec.from_vocab(tokens, special, whole_word=True, max_predictions=L)
  counts = masking.mask_blocks(blocks, np.arange(len(blocks)), 0, spec)['mlm_weights'].sum(1)
  assert (counts <= budget).all() and (counts == budget).mean() > 0.98
  full = lengths == L
  assert counts[full].sum() / lengths[full].sum() == pytest.approx(10 / 64, abs=1e-3)


# From a mutation audit: each test fails with the rule it names broken.

def _vocab_and_specials():
  path = vocab_lib.default_vocab_file()
  tokens = vocab_lib.read_vocab(path)
  return tokens, vocab_lib.special_ids(tokens, path).as_dict()


def test_a_three_token_row_still_gets_one_prediction():
  """BERT: num_to_predict = max(1, int(round(n * rate))); for [CLS] word [SEP] (n=3,
  round(0.45) = 0) that is 1, so the one word is always a target."""
  tokens, special = _vocab_and_specials()
  spec = masking.MaskSpec.from_vocab(tokens, special, max_predictions=20)
  word = tokens.index('house')
  L = 16
  row = [special['cls'], word, special['sep']] + [special['pad']] * (L - 3)
  blocks = np.array([row] * 50)
  out = masking.mask_blocks(blocks, np.arange(50), 0, spec)
  assert max(1, int(round(3 * 0.15))) == 1
  np.testing.assert_array_equal(out['mlm_weights'].sum(1), np.ones(50))
  assert (out['mlm_weights'][:, 1] == 1).all()
  assert (out['mlm_targets'][:, 1] == word).all()


def test_random_replacement_covers_every_id_of_a_small_vocabulary():
  """The random 10% draws uniformly from ALL ids 0..V-1 (BERT: randint(0, V-1) inclusive),
  the last id included. Small vocabulary so every id is seen many times."""
  vocab = 7
  maskable = np.ones(vocab, bool)
  maskable[[0, 1]] = False     # pad=0, mask=1
  spec = masking.MaskSpec(vocab_size=vocab, pad_id=0, mask_id=1, maskable=maskable,
                          continuation=np.zeros(vocab, bool), mask_rate=0.5,
                          max_predictions=64)
  rng = np.random.default_rng(0)
  blocks = rng.integers(2, vocab, size=(4000, 64)).astype(np.int32)
  out = masking.mask_blocks(blocks, np.arange(len(blocks)), 3, spec)
  selected = out['mlm_weights'] > 0
  ids = out['input_ids'][selected]
  orig = blocks[selected]
  # Positions neither [MASK] nor left alone are the random draws that moved; together with
  # the random draws that landed on the original id, the 'random' branch is uniform over V.
  moved = ids[(ids != 1) & (ids != orig)]
  counts = np.bincount(moved, minlength=vocab)
  assert counts[vocab - 1] > 0, counts
  # Ids 2..6 are the originals (uniform), so among moved draws they are equally likely;
  # id 0 is never an original, so it is never 'unmoved': expected 5/4 of the others.
  assert stats.chisquare(counts[2:]).pvalue > 1e-3, counts
  assert counts[0] / counts[2:].mean() == pytest.approx(5 / 4, rel=0.08), counts


@pytest.mark.parametrize('rate', [0.0, 1.0, -0.1, 1.5])
def test_mask_rate_outside_the_open_interval_is_refused(rate):
  tokens, special = _vocab_and_specials()
  with pytest.raises(DataError, match='mask_rate'):
    masking.MaskSpec.from_vocab(tokens, special, mask_rate=rate)


def test_pretraining_blocks_are_one_segment():
  """No NSP: every position is segment 0, also after an inner [SEP]."""
  tokens, special = _vocab_and_specials()
  spec = masking.MaskSpec.from_vocab(tokens, special)
  word = tokens.index('house')
  row = [special['cls'], word, word, special['sep'], word, word, special['sep'], special['pad']]
  out = masking.mask_blocks(np.array([row] * 4), np.arange(4), 0, spec)
  assert (out['token_type_ids'] == 0).all()


def test_the_three_random_streams_never_share_a_counter():
  """Selection, 80/10/10 action and random token draw from one hash of (example, position,
  stream): were two streams' counters to coincide (e.g. stream 2 at position p with stream
  0 at p + 1), the random token at p would be a function of the selection score at p + 1."""
  positions = np.broadcast_to(np.arange(512), (4, 512))
  with np.errstate(over='ignore'):   # uint32 hashing wraps by design, as in mask_blocks
    keys = masking.example_keys(0, np.arange(4))[:, None]
    streams = [masking.position_bits(keys, positions, s) for s in
               (masking.STREAM_SELECT, masking.STREAM_ACTION, masking.STREAM_TOKEN)]
  for a, bits_a in enumerate(streams):
    for b, bits_b in enumerate(streams):
      if a != b:
        assert not np.any(bits_a == bits_b)
        assert not np.any(bits_a[:, :-1] == bits_b[:, 1:])   # stream a at p, b at p + 1


def test_the_masks_of_a_fixed_batch_are_pinned():
  """A run resumed on a newer bert_sym reads the stream it started on only while an
  example's masks stay a function of (seed, example index, tokens) alone: the masked
  batch of fixed blocks is pinned here by its SHA-256. Swapping the random-token and
  keep-as-is draws kept every statistic the other tests check. A change that moves this
  value moves every run's masks (README, "Data": masking is a pure function of (seed,
  example index, block)): change it only knowingly, as a run resumed across it reads other
  masks. Moved once: the block's ids entered the key (same-index blocks of a seqio task's
  shards were masked alike; test_seqio_tasks.py)."""
  import hashlib  # pylint: disable=g-import-not-at-top
  tokens, special = _vocab_and_specials()
  spec = masking.MaskSpec.from_vocab(tokens, special, max_predictions=20)
  ids = 1000 + (np.arange(8 * 64) * 7919) % 20000   # fixed, no RNG of numpy's
  blocks = ids.reshape(8, 64).astype(np.int32)
  blocks[:, 0], blocks[:, -1] = special['cls'], special['sep']
  blocks[3, 40:] = special['pad']
  out = masking.mask_blocks(blocks, np.arange(100, 108), 7, spec)
  digest = hashlib.sha256(b''.join(np.ascontiguousarray(out[k]).tobytes()
                                   for k in sorted(out))).hexdigest()
  assert out['mlm_weights'].sum() > 0
  assert digest == '5daac30ad6a69a49ff3171087b99ac6a21e6976f4ffd69b77b7ceaaa69a520b6'

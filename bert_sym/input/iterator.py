"""The trainer's iterator: per-host batches of MLM features, batch k a function of k.

  * Global example g (the g-th sequence the run consumes, over all hosts) is block
    pi_e(g % N) of epoch e = g // N, with pi_e the keyed Feistel permutation of the N
    blocks (`feistel_permutation`, keyed by (seed, e), computed per index: no
    O(N) array per epoch; a pseudo-random permutation, not a uniform draw from all N!
    orders, which is immaterial for SGD), the same for every source, so a checkpoint of one source
    resumes on the same blocks read through another. Each example is masked by
    `masking.mask_blocks`, a pure function of (seed, g, block); 'validation' is read in
    order. Resuming at step k replays nothing.
  * Host p of P takes rows [p*B, (p+1)*B) of each global batch of P*B examples: the global
    batch does not depend on the number of hosts, and each host reads only its rows.

Imports no TensorFlow unless config.data.source='seqio' (GPU images lack TF).
"""

from __future__ import annotations

import math
from typing import Any, Mapping

from absl import logging
import numpy as np

from bert_sym.input import DataError, check_max_seq_len, masking, shard_reader, sources, tokenizer
from bert_sym.input import START_UP_FIX, storage_errors
from bert_sym.input import blocks as blocks_lib

EPOCH_WARNING_THRESHOLD = 10
VOCAB_PADDING = 128   # rows past the data's vocabulary that a table may be padded with
FEISTEL_ROUNDS = 6
SHUFFLE_KIND = 'feistel-v1'
_FEISTEL_SALT = 0xFE157E1
# Nothing is saved on the way out, and the checkpoint holds the position of its own step.
_MID_RUN_FIX = ('once this machine can read it again, rerun the same command: the run '
                'resumes from its last checkpoint.')


def feistel_permutation(offset: np.ndarray, num_blocks: int, seed: int,
                        epoch: np.ndarray | int) -> np.ndarray:
  """pi_epoch(offset) for offsets in [0, num_blocks): a bijection for every (seed, epoch).

  Balanced Feistel network on 2h-bit integers (2^2h >= N), round function murmur3's
  finaliser keyed by (seed, epoch, round); values >= N are walked through the network
  again (cycle walking), which keeps the map a bijection of [0, N). Fewer than 4
  network passes per index on average.
  """
  offset = np.asarray(offset, np.int64)
  if num_blocks <= 1:
    return np.zeros_like(offset)
  half = max(1, math.ceil(math.log2(num_blocks) / 2))
  mask = np.uint64((1 << half) - 1)
  epoch = np.broadcast_to(np.asarray(epoch, np.int64), offset.shape)
  with np.errstate(over='ignore'):
    keys = [masking.example_keys(seed ^ _FEISTEL_SALT, epoch * FEISTEL_ROUNDS + r)
            for r in range(FEISTEL_ROUNDS)]

    def network(x, k):
      left, right = x >> np.uint64(half), x & mask
      for key in k:
        mixed = masking.fmix32(key ^ right.astype(np.uint32))
        left, right = right, left ^ (mixed.astype(np.uint64) & mask)
      return (left << np.uint64(half)) | right

    x = network(offset.astype(np.uint64), keys)
    outside = np.flatnonzero(x >= np.uint64(num_blocks))
    while outside.size:
      x[outside] = network(x[outside], [k[outside] for k in keys])
      outside = outside[x[outside] >= np.uint64(num_blocks)]
  return x.astype(np.int64)


class MLMIterator:
  """Per-host batches of MLM features; batch k is a pure function of (seed, k).

  'train' is shuffled (a keyed permutation of all blocks, new every epoch) and repeats
  forever. 'validation' is read in order and also repeats (deterministically), so a fresh
  validation iterator always yields the same `eval_steps` batches.
  """

  def __init__(self, blocks, spec: masking.MaskSpec, *, batch_size: int, seed: int,
               shuffle: bool, start_step: int = 0, process_index: int = 0,
               process_count: int = 1):
    if batch_size < 1 or not 0 <= process_index < process_count:
      raise ValueError(f'bad batch_size={batch_size} or process {process_index} of '
                       f'{process_count}')
    self._blocks, self._spec = blocks, spec
    self._batch_size, self._seed, self._shuffle = batch_size, seed, shuffle
    self._process_index, self._process_count = process_index, process_count
    self._step = start_step

  @property
  def num_blocks(self) -> int:
    return len(self._blocks)

  def _rows(self, example_index: np.ndarray) -> np.ndarray:
    epoch, offset = np.divmod(example_index, self.num_blocks)
    if not self._shuffle:
      return offset
    return feistel_permutation(offset, self.num_blocks, self._seed, epoch)

  def batch(self, step: int) -> dict[str, np.ndarray]:
    """The batch at `step` (no state change)."""
    first = (step * self._process_count + self._process_index) * self._batch_size
    example_index = first + np.arange(self._batch_size, dtype=np.int64)
    # A storage outage or a file gone since start-up: the user's to fix, in one line.
    with storage_errors(self._blocks.description, _MID_RUN_FIX, mid_run=True):
      blocks = self._blocks.take(self._rows(example_index))
    return masking.mask_blocks(blocks, example_index, self._seed, self._spec)

  def __iter__(self) -> 'MLMIterator':
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batch = self.batch(self._step)
    self._step += 1
    return batch

  def get_state(self) -> dict[str, Any]:
    """The read position, with what makes it meaningful: the order (shuffle kind, seed)
    and the corpus (vocabulary md5, block length, block count)."""
    return dict(step=self._step, seed=self._seed,
                shuffle=SHUFFLE_KIND if self._shuffle else 'none',
                num_blocks=self.num_blocks, max_seq_len=self._blocks.max_seq_len,
                vocab_md5=self._blocks.vocab_md5, batch_size=self._batch_size,
                process_count=self._process_count)

  def set_state(self, state: Mapping[str, Any], fix: str = '') -> None:
    """`fix`: what resumes, when the caller knows (the config keys changed since the run
    wrote the state, as flags); else the generic advice."""
    hint, fix = fix, fix or ('Fix: resume with the data and config the checkpoint was '
                             'written with, or start a new --workdir.')
    mine = self.get_state()
    if 'shuffle' not in state:
      raise DataError(
          'cannot resume: the checkpointed input state has no shuffle kind, so it was '
          "written by an older bert_sym that shuffled source='shards' and 'seqio' by "
          f'argsort; this one reads every source in the {SHUFFLE_KIND} order, and '
          'resuming would read blocks twice or never. Fix: start a new --workdir (or '
          'finish the run with the version that wrote it).')
    # A block length or vocabulary changed also changes the block count: said first, as
    # the cause (config.data.max_seq_len named, not only num_blocks).
    for key, what in (('shuffle', 'another block order'), ('seed', 'another order'),
                      ('vocab_md5', 'another vocabulary'), ('max_seq_len', 'another corpus'),
                      ('num_blocks', 'another corpus')):
      if key in state and state[key] != mine[key]:
        raise DataError(
            f'cannot resume: the checkpointed input state has {key}={state[key]!r}, this '
            f'run has {mine[key]!r} ({what}); resuming would not continue the same epoch. '
            f'{fix}')
    # The read position depends only on the global batch, so a run may resume on another
    # number of hosts as long as batch_size x process_count is unchanged.
    if 'batch_size' in state:
      saved = state['batch_size'] * state.get('process_count', 1)
      if saved != self._batch_size * self._process_count:
        raise DataError(
            f'cannot resume: the checkpoint was written with a global batch of {saved} '
            f'sequences, this run reads {self._batch_size * self._process_count}. ' + (
                hint or f'Fix: resume with config.batch_size={saved} (the global batch), '
                'or start a new --workdir.'))
    self._step = int(state['step'])


def mask_spec(data_config, blocks) -> masking.MaskSpec:
  return masking.MaskSpec.from_vocab(
      blocks.vocab_tokens, blocks.special, mask_rate=data_config.mask_rate,
      whole_word=data_config.whole_word_masking,
      max_predictions=data_config.max_predictions_per_seq)


def load_blocks(data_config, split: str, documents=None):
  """The blocks of `config.data.source`; `documents`: see `blocks.load_packed` ('seqio')."""
  if data_config.source in ('streaming', 'shards'):
    with storage_errors(shard_reader.join_url(data_config.shards_dir, split), START_UP_FIX):
      return shard_reader.open_blocks(data_config, split)
  check_max_seq_len(data_config.max_seq_len)
  if data_config.source != 'seqio':
    raise DataError(f"config.data.source must be 'seqio', 'shards' or 'streaming', got "
                    f'{data_config.source!r}')
  if data_config.task in sources.TFDS_SOURCES:   # billions of tokens: never in memory
    raise DataError(f"config.data.source='seqio' would pack all of {data_config.task} in "
                    "memory; stream it instead (--config.data.source=streaming). "
                    + shard_reader.prepare_instructions(data_config))
  return blocks_lib.load_packed(data_config, split, documents)


def make_mlm_iterator(data_config, *, batch_size: int, split: str, seed: int,
                      start_step: int = 0, process_index: int | None = None,
                      process_count: int | None = None, documents=None) -> MLMIterator:
  """Iterator of per-host MLM batches for `config.data` (see the module docstring).

  `data_config.shuffle` permutes 'train' afresh every epoch (the same Feistel order for
  every source); validation is read in order.
  """
  if process_index is None or process_count is None:
    import jax  # pylint: disable=import-outside-toplevel
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  blocks = load_blocks(data_config, split, documents)
  shuffle = split == 'train' and data_config.shuffle
  return MLMIterator(blocks, mask_spec(data_config, blocks), batch_size=batch_size,
                  seed=seed, shuffle=shuffle, start_step=start_step,
                  process_index=process_index, process_count=process_count)


def vocab_size(data_config) -> int:
  """Vocabulary size of the data (the model's vocab_size is at least that)."""
  if data_config.source in ('streaming', 'shards'):   # also checks the corpus is prepared
    return len(load_blocks(data_config, 'train').vocab_tokens)
  return len(tokenizer.read_vocab(data_config.vocab_path or tokenizer.default_vocab_file()))


def describe_corpus(iterator, config) -> list[str]:
  """Lines for the log: corpus size and the number of epochs config.total_steps reads.

  Above EPOCH_WARNING_THRESHOLD epochs a WARNING line, for the caller's console only (it
  was also logged, so the default logs showed it twice). [] for iterators not made here
  (e.g. synthetic test inputs).
  """
  blocks = getattr(iterator, '_blocks', None)
  if blocks is None or not hasattr(iterator, 'num_blocks'):
    return []
  num_blocks = iterator.num_blocks
  examples = config.total_steps * config.batch_size
  epochs = examples / max(num_blocks, 1)
  lines = [f'Corpus {config.data.task} ({config.data.source}: {blocks.description}): '
           f'{blocks.num_tokens:,} tokens in {num_blocks:,} blocks of {blocks.max_seq_len}; '
           f'{config.total_steps:,} steps x {config.batch_size} sequences read '
           f'{epochs:.2f} epochs.']
  logging.info('%s', lines[0])
  if epochs > EPOCH_WARNING_THRESHOLD:
    warning = (f'the run reads the corpus {epochs:.1f} times (> '
               f'{EPOCH_WARNING_THRESHOLD} epochs): the model will memorise it. Use a '
               'larger corpus (see `python -m bert_sym.shards export`) or fewer steps.')
    lines.append('WARNING: ' + warning)
  spare = config.model.vocab_size - len(blocks.vocab_tokens)
  if spare >= VOCAB_PADDING:   # more than a padding of the table: rows no input id reaches
    lines.append(
        f'WARNING: config.model.vocab_size={config.model.vocab_size}, but the data '
        f'vocabulary has {len(blocks.vocab_tokens):,} tokens: {spare:,} rows of the '
        'embedding and the MLM softmax are never a target, yet the loss, parameter count '
        f'and MFU include them. Fix (a new run; a checkpoint keeps its table): '
        f'--config.model.vocab_size={len(blocks.vocab_tokens)} (or padded to a multiple '
        f'of {VOCAB_PADDING}).')
  return lines

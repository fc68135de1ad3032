"""MLM input pipeline: masking, exported shards, and the trainer-facing iterator.

Design (why it is deterministic and resumable):
  * Packed, unmasked blocks ([CLS] ... [SEP], `max_seq_len` ids) come from a seqio task
    (`bert_sym.tasks.packed_blocks`, TF) -- either exported once to shards on disk
    (`python -m bert_sym.data export`, source='shards'), or, for source='seqio',
    materialised in memory at the first call (fine for the embedded corpus and text files
    up to a few hundred M tokens; export Wikipedia/C4 to shards instead).
  * Global example g (the g-th sequence the run consumes, over all hosts) is block
    perm_e[g % N] of epoch e = g // N, with perm_e a hash-defined permutation of the N
    blocks (seeded by (seed, e)); 'validation' is read in order. So batch k is computed
    from k alone: resuming at step k is O(1) and replays nothing.
  * Masking is a pure function of (seed, g, block) with a counter-based hash RNG
    (murmur3's finaliser), implemented here in NumPy and op for op in TF
    (`bert_sym.preprocessors.mask_block_tf`), so both paths give bit-identical examples.
  * Host p of P takes rows [p*B, (p+1)*B) of each global batch of P*B examples: the global
    batch does not depend on the number of hosts, and each host reads only its rows.

This module imports no TensorFlow unless source='seqio' (GPU images lack TF).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import pathlib
import re
import sys
import tempfile
from typing import Any, Iterator, Mapping

import numpy as np

FEATURES = ('input_ids', 'token_type_ids', 'attention_mask', 'mlm_targets', 'mlm_weights')
MAX_SEQ_LEN = 512  # the model's max_position_embeddings
SHARD_FORMAT_VERSION = 1
METADATA_FILE = 'metadata.json'
VOCAB_FILE = 'vocab.txt'

# Counter-based RNG: murmur3 fmix32 constants, a golden-ratio seed offset, one stream per
# random decision. Shared with the TF twin in preprocessors.py.
FMIX_C1 = 0x85EBCA6B
FMIX_C2 = 0xC2B2AE35
GOLDEN = 0x9E3779B9
STREAM_SELECT, STREAM_ACTION, STREAM_TOKEN, STREAM_PERMUTE = 0, 1, 2, 3
MASK_BELOW = int(0.8 * 2**32)     # action bits below this: [MASK] (80%)
RANDOM_BELOW = int(0.9 * 2**32)   # below this: random token (10%); else unchanged (10%)
POSITION_RADIX = 1024             # > MAX_SEQ_LEN: (score, word start) as one int64 key
NOT_A_CANDIDATE = 2**62           # larger than every candidate's key


class DataError(ValueError):
  """Bad input data or configuration; the message names the file and the problem."""


def check_max_seq_len(max_seq_len: int) -> int:
  if not 3 <= max_seq_len <= MAX_SEQ_LEN:
    raise DataError(f'max_seq_len={max_seq_len} is outside [3, {MAX_SEQ_LEN}]: the model '
                    f'has {MAX_SEQ_LEN} position embeddings (max_position_embeddings).')
  return max_seq_len


# ----------------------------------------------------------------------------------------
# Masking (NumPy).
# ----------------------------------------------------------------------------------------

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


def _fmix32(x: np.ndarray) -> np.ndarray:
  x = x ^ (x >> np.uint32(16))
  x = x * np.uint32(FMIX_C1)
  x = x ^ (x >> np.uint32(13))
  x = x * np.uint32(FMIX_C2)
  return x ^ (x >> np.uint32(16))


def _example_keys(seed: int, example_index: np.ndarray) -> np.ndarray:
  index = np.asarray(example_index, np.uint64)
  lo = (index & np.uint64(0xFFFFFFFF)).astype(np.uint32)
  hi = (index >> np.uint64(32)).astype(np.uint32)
  key = _fmix32(np.uint32((seed & 0xFFFFFFFF) ^ GOLDEN))
  return _fmix32(_fmix32(key ^ lo) ^ hi)


def _position_bits(keys: np.ndarray, positions: np.ndarray, stream: int) -> np.ndarray:
  counter = (positions.astype(np.uint32) << np.uint32(2)) | np.uint32(stream)
  return _fmix32(keys ^ _fmix32(counter))


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
    keys = _example_keys(seed, example_index)[:, None]
    positions = np.broadcast_to(np.arange(length, dtype=np.int64), (batch, length))
    candidate = spec.maskable[blocks]
    if spec.whole_word:
      previous = np.pad(candidate[:, :-1], ((0, 0), (1, 0)))
      word_start = candidate & ~(spec.continuation[blocks] & previous)
    else:
      word_start = candidate
    start_of = np.maximum.accumulate(np.where(word_start, positions, 0), axis=1)
    score = _position_bits(keys, start_of, STREAM_SELECT).astype(np.int64)
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
    budget = np.minimum(np.minimum(np.maximum(budget, 1), spec.max_predictions),
                        num_candidates)
    selected = candidate & (ranked_up_to <= budget[:, None])

    action = _position_bits(keys, positions, STREAM_ACTION)
    random_token = (_position_bits(keys, positions, STREAM_TOKEN)
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
    key = _example_keys(seed ^ 0x5EED, np.array([epoch]))
    bits = _position_bits(key, np.arange(num_blocks, dtype=np.int64), STREAM_PERMUTE)
  order_key = (bits.astype(np.uint64) << np.uint64(32)) | np.arange(num_blocks,
                                                                   dtype=np.uint64)
  return np.argsort(order_key).astype(np.int64)


# ----------------------------------------------------------------------------------------
# Packed blocks: exported shards (TF-free reader) or materialised from a seqio task.
# ----------------------------------------------------------------------------------------

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


def write_atomically(path: pathlib.Path, write) -> None:
  """`write(f)` into a temporary file beside `path`, then an atomic rename: a reader
  sees the old file or the whole new one, never half (shards, metadata, exports)."""
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + '.tmp-')
  try:
    with os.fdopen(fd, 'wb') as f:
      write(f)
    os.replace(tmp, path)
  except BaseException:
    os.unlink(tmp)
    raise


def _token_dtype(vocab_size: int):
  return np.uint16 if vocab_size <= 2**16 else np.int32


def export_shards(task: str, split: str, max_seq_len: int, out_dir: str, *,
                  vocab_path: str = '', text_files: str = '',
                  blocks_per_shard: int = 1 << 16) -> pathlib.Path:
  """Writes the task's packed blocks to `out_dir/split/` (shards, vocab.txt, metadata).

  Every file is written to a temporary name and renamed; metadata.json comes last, so a
  directory with metadata.json is complete. Needs TF (tokenisation runs in tf.data).
  """
  from bert_sym import tasks, vocab as vocab_lib  # pylint: disable=import-outside-toplevel
  check_max_seq_len(max_seq_len)
  if task == tasks.TEXT_FILES_TASK:
    tasks.register_text_files_task(task, text_files, vocab_path=vocab_path)
  vocabulary = vocab_lib.get_vocabulary(vocab_path)
  dtype = _token_dtype(vocabulary.vocab_size)
  split_dir = pathlib.Path(out_dir) / split
  split_dir.mkdir(parents=True, exist_ok=True)

  shards, pending, num_tokens = [], [], 0

  def flush():
    name = f'blocks-{len(shards):05d}.npy'
    array = np.stack(pending).astype(dtype)
    write_atomically(split_dir / name, lambda f: np.save(f, array))
    shards.append({'file': name, 'num_blocks': len(array)})
    pending.clear()

  dataset = tasks.packed_blocks(task, split, max_seq_len, vocabulary)
  for block in _numpy_blocks(dataset, description=f'task {task} split {split}'):
    pending.append(block)
    num_tokens += int((block != vocabulary.special.pad).sum())
    if len(pending) == blocks_per_shard:
      flush()
  if pending:
    flush()
  if not shards:
    raise DataError(f'task {task} split {split}: empty corpus (no tokens after tokenising)')

  vocab_bytes = vocab_lib.read_vocab_bytes(vocabulary.path)
  write_atomically(split_dir / VOCAB_FILE, lambda f: f.write(vocab_bytes))
  metadata = dict(
      format_version=SHARD_FORMAT_VERSION, task=task, split=split, max_seq_len=max_seq_len,
      num_blocks=sum(s['num_blocks'] for s in shards), num_tokens=num_tokens,
      dtype=np.dtype(dtype).name, shards=shards, vocab_md5=vocabulary.md5,
      vocab_size=vocabulary.vocab_size, special_ids=vocabulary.special.as_dict(),
      text_files=text_files)
  write_atomically(split_dir / METADATA_FILE,
                    lambda f: f.write(json.dumps(metadata, indent=1).encode()))
  return split_dir


def _numpy_blocks(dataset, description: str) -> Iterator[np.ndarray]:
  """Iterates a tf.data dataset of blocks, turning TF errors into a DataError."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
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
                    f'bert_sym.data export --split={split} --out_dir={shards_dir} ...')
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


_SEQIO_BLOCKS: dict[tuple, Blocks] = {}  # one materialisation per process and corpus


def load_seqio_blocks(data_config, split: str) -> Blocks:
  """Packs a seqio task's split once per process and keeps it in memory."""
  from bert_sym import tasks, vocab as vocab_lib  # pylint: disable=import-outside-toplevel
  task = tasks.task_for_config(data_config)
  vocabulary = vocab_lib.get_vocabulary(data_config.vocab_path)
  cache_key = (task, split, data_config.max_seq_len, vocabulary.md5,
               (data_config.text_files, data_config.get('validation_files', ''))
               if task == tasks.TEXT_FILES_TASK else '')
  if cache_key not in _SEQIO_BLOCKS:
    description = f'task {task} split {split}'
    if task == tasks.TEXT_FILES_TASK:
      files = (data_config.get('validation_files', '') if split == 'validation' else '')
      description += f' ({files or data_config.text_files})'
    dataset = tasks.packed_blocks(task, split, data_config.max_seq_len, vocabulary)
    blocks = list(_numpy_blocks(dataset, description))
    if not blocks:
      raise DataError(f'{description}: empty corpus (no tokens after tokenising)')
    array = np.stack(blocks).astype(_token_dtype(vocabulary.vocab_size))
    _SEQIO_BLOCKS[cache_key] = Blocks([array], vocabulary.tokens,
                                      vocabulary.special.as_dict(), vocabulary.md5,
                                      description)
  return _SEQIO_BLOCKS[cache_key]


def load_blocks(data_config, split: str) -> Blocks:
  check_max_seq_len(data_config.max_seq_len)
  if data_config.source == 'shards':
    if not data_config.shards_dir:
      raise DataError("source='shards' needs config.data.shards_dir")
    blocks = load_shards(data_config.shards_dir, split, data_config.vocab_path)
    if blocks.max_seq_len != data_config.max_seq_len:
      raise DataError(f'{blocks.description}: shards hold {blocks.max_seq_len}-token '
                      f'blocks, config asks max_seq_len={data_config.max_seq_len}')
    return blocks
  if data_config.source == 'seqio':
    from bert_sym import streaming  # pylint: disable=import-outside-toplevel
    if data_config.task in streaming.TASKS_IN_TFDS:   # billions of tokens: never in memory
      raise DataError(f"config.data.source='seqio' would pack all of {data_config.task} in "
                      "memory; stream it instead (--config.data.source=streaming).\n"
                      + streaming.prepare_instructions(data_config))
    return load_seqio_blocks(data_config, split)
  raise DataError(f"config.data.source must be 'seqio', 'shards' or 'streaming', got "
                  f'{data_config.source!r}')


# ----------------------------------------------------------------------------------------
# The trainer-facing iterator.
# ----------------------------------------------------------------------------------------

class MLMIterator:
  """Per-host batches of MLM features; batch k is a pure function of (seed, k).

  'train' is shuffled (an exact per-epoch permutation of all blocks) and repeats forever.
  'validation' is read in order and also repeats (deterministically), so a fresh
  validation iterator always yields the same `eval_steps` batches.
  """

  def __init__(self, blocks: Blocks, spec: MaskSpec, *, batch_size: int, seed: int,
               shuffle: bool, start_step: int = 0, process_index: int = 0,
               process_count: int = 1):
    if batch_size < 1 or not 0 <= process_index < process_count:
      raise ValueError(f'bad batch_size={batch_size} or process {process_index} of '
                       f'{process_count}')
    self._blocks, self._spec = blocks, spec
    self._batch_size, self._seed, self._shuffle = batch_size, seed, shuffle
    self._process_index, self._process_count = process_index, process_count
    self._step = start_step
    self._permutations: dict[int, np.ndarray] = {}

  @property
  def num_blocks(self) -> int:
    return len(self._blocks)

  def _rows(self, example_index: np.ndarray) -> np.ndarray:
    epoch, offset = np.divmod(example_index, self.num_blocks)
    if not self._shuffle:
      return offset
    rows = np.empty_like(offset)
    for e in np.unique(epoch):
      if e not in self._permutations:
        self._permutations = {k: v for k, v in self._permutations.items() if k >= e - 1}
        self._permutations[int(e)] = permutation(self.num_blocks, self._seed, int(e))
      rows[epoch == e] = self._permutations[int(e)][offset[epoch == e]]
    return rows

  def batch(self, step: int) -> dict[str, np.ndarray]:
    """The batch at `step` (no state change)."""
    first = (step * self._process_count + self._process_index) * self._batch_size
    example_index = first + np.arange(self._batch_size, dtype=np.int64)
    blocks = self._blocks.take(self._rows(example_index))
    return mask_blocks(blocks, example_index, self._seed, self._spec)

  def __iter__(self) -> 'MLMIterator':
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batch = self.batch(self._step)
    self._step += 1
    return batch

  def get_state(self) -> dict[str, Any]:
    return dict(step=self._step, seed=self._seed, num_blocks=self.num_blocks,
                vocab_md5=self._blocks.vocab_md5, batch_size=self._batch_size,
                process_count=self._process_count)

  def set_state(self, state: Mapping[str, Any]) -> None:
    mine = self.get_state()
    for key in ('seed', 'num_blocks', 'vocab_md5'):
      if key in state and state[key] != mine[key]:
        raise DataError(f'cannot resume: checkpointed input state has {key}={state[key]}, '
                        f'this iterator has {mine[key]} (different data)')
    # The read position depends only on the global batch, so a run may resume on another
    # number of hosts as long as batch_size x process_count is unchanged.
    if 'batch_size' in state:
      saved = state['batch_size'] * state.get('process_count', 1)
      if saved != self._batch_size * self._process_count:
        raise DataError(
            f'cannot resume: the checkpoint was written with a global batch of {saved} '
            f'sequences, this run reads {self._batch_size * self._process_count}; keep '
            'config.batch_size unchanged when resuming')
    self._step = int(state['step'])


def _mask_spec(data_config, blocks: Blocks) -> MaskSpec:
  return MaskSpec.from_vocab(
      blocks.vocab_tokens, blocks.special, mask_rate=data_config.mask_rate,
      whole_word=data_config.whole_word_masking,
      max_predictions=data_config.max_predictions_per_seq)


def make_mlm_iterator(data_config, *, batch_size: int, split: str, seed: int,
                      start_step: int = 0, process_index: int | None = None,
                      process_count: int | None = None) -> MLMIterator:
  """Iterator of per-host MLM batches for `config.data` (see the module docstring).

  `data_config.shuffle` permutes 'train' exactly, afresh every epoch (blocks are indexed,
  so no shuffle buffer is needed); validation is always read in order.
  """
  if process_index is None or process_count is None:
    import jax  # pylint: disable=import-outside-toplevel
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if data_config.source == 'streaming':   # any size, local or gs:// (bert_sym.streaming)
    from bert_sym import streaming  # pylint: disable=import-outside-toplevel
    return streaming.make_iterator(data_config, batch_size=batch_size, split=split, seed=seed,
                                   start_step=start_step, process_index=process_index,
                                   process_count=process_count)
  blocks = load_blocks(data_config, split)
  shuffle = split == 'train' and data_config.shuffle
  return MLMIterator(blocks, _mask_spec(data_config, blocks), batch_size=batch_size,
                     seed=seed, shuffle=shuffle, start_step=start_step,
                     process_index=process_index, process_count=process_count)


def vocab_size(data_config) -> int:
  """Vocabulary size of the data (the model's vocab_size must equal it)."""
  if data_config.source == 'streaming':   # also checks that the corpus is prepared
    from bert_sym import streaming  # pylint: disable=import-outside-toplevel
    return streaming.vocab_size(data_config)
  if data_config.source == 'shards':
    return int(read_metadata(data_config.shards_dir, 'train')['vocab_size'])
  from bert_sym import vocab as vocab_lib  # pylint: disable=import-outside-toplevel
  return len(vocab_lib.read_vocab(vocab_lib.resolve_vocab_path(data_config.vocab_path)))


# ----------------------------------------------------------------------------------------
# Command line: python -m bert_sym.data export ...
# ----------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(prog='python -m bert_sym.data')
  commands = parser.add_subparsers(dest='command', required=True)
  export = commands.add_parser('export', help='write packed blocks of a task to shards')
  export.add_argument('--task', default='bert_sym_mlm_embedded')
  export.add_argument('--split', default='train,validation', help='comma-separated')
  export.add_argument('--max_seq_len', type=int, default=512)
  export.add_argument('--out_dir', required=True)
  export.add_argument('--vocab_path', default='')
  export.add_argument('--text_files', default='', help="globs for bert_sym_mlm_text_files")
  export.add_argument('--blocks_per_shard', type=int, default=1 << 16)
  args = parser.parse_args(argv)
  for split in args.split.split(','):
    split_dir = export_shards(args.task, split, args.max_seq_len, args.out_dir,
                              vocab_path=args.vocab_path, text_files=args.text_files,
                              blocks_per_shard=args.blocks_per_shard)
    metadata = read_metadata(args.out_dir, split)
    print(f'{split_dir}: {metadata["num_blocks"]} blocks, {metadata["num_tokens"]} tokens')


if __name__ == '__main__':
  # Run the imported module's main so that tasks.py and this CLI share one bert_sym.data.
  from bert_sym import data as _data  # pylint: disable=import-self
  _data.main(sys.argv[1:])

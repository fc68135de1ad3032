r"""Streaming MLM input for corpora of any size: packed-block shards read by range requests.

  # once, on any number of machines (worker i of N converts parts i, i+N, ...):
  python -m bert_sym.streaming export --task=bert_sym_mlm_c4 --out_dir=gs://BUCKET/c4_512 \
      --tfds_data_dir=gs://BUCKET/tfds --num_workers=N --worker_index=i
  python -m bert_sym.streaming finalize --out_dir=gs://BUCKET/c4_512   # (the last worker
                                                                        #  already did)
  # then, on every training host (no TensorFlow needed):
  python -m bert_sym.train --config=configs/sym_base.py --workdir=gs://BUCKET/run \
      --config.data.shards_dir=gs://BUCKET/c4_512

Format: the fixed-size-block `.npy` shards of `bert_sym.data` (uint16 [n, max_seq_len]),
plus one `metadata.json` per split listing them in reading order, so block b lives at a
computable byte offset of one shard. Reading a batch is one range request per block
through fsspec (local paths with os.pread; gs:// through gcsfs; memory:// and file://
exercise the remote code path in tests). Host memory is bounded whatever the corpus size:
no array of the corpus's size is ever built.

Order: example g of the run is block pi_e(g mod N) of epoch e = g // N, where pi_e is a
keyed Feistel bijection of [0, N) (cycle-walking over the next power of four), keyed by
(seed, e). It is computed per index (O(1) memory, O(1) resume at any step) and mixes the
whole corpus every epoch, unlike a shuffle buffer or shard-order shuffling; it is a
pseudo-random permutation, not a uniform draw from all N! orders, which is immaterial for
SGD. The price is that consecutive examples are in unrelated places of the corpus (one
small range read per example): cheap on local disk and GCS with concurrent reads, and the
iterator prefetches the next batches in a thread. Masking is `bert_sym.data.mask_blocks`,
a pure function of (seed, g, block), as on the other input paths.

Export: a split is cut into `num_parts` deterministic parts (default: one per TFDS source
file; `--num_parts` for function sources such as text files), each tokenised, packed and
written on its own as `part-PPPPP-KKKKK.npy` shards, then recorded by `part-PPPPP.json`.
The output therefore depends on the parts, never on how many workers converted them: 2
workers write exactly the files 1 worker writes. Every file is written under a temporary
name and renamed (object stores publish an object only once fully uploaded), a part whose
manifest exists is skipped on a rerun, and `metadata.json` is written once every part's
manifest exists, by whichever worker finishes last (or by `finalize`).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import io
import json
import math
import os
import sys
import threading
import uuid
from typing import Any, Mapping

from absl import logging
import numpy as np

from bert_sym import data as data_lib

TASKS_IN_TFDS = {'bert_sym_mlm_wikipedia': 'wikipedia/20230601.en',
                 'bert_sym_mlm_c4': 'c4/en'}
EPOCH_WARNING_THRESHOLD = 10
METADATA_TIMEOUT_S = 5.0   # first read of a split's metadata.json
FEISTEL_ROUNDS = 6
SHUFFLE_KIND = 'feistel-v1'
_FEISTEL_SALT = 0xFE157E1
_HEADER_BYTES = 4096   # enough for any .npy header this code writes
# = bert_sym.vocab.BERT_BASE_UNCASED_MD5 (tested); not imported: vocab.py imports seqio and
# so TensorFlow where installed, which costs the trainer ~10 s before it can fail fast.
BERT_BASE_UNCASED_MD5 = '64800d5d8528ce344256daf115d4965e'


# ----------------------------------------------------------------------------------------
# Filesystems: one layer (fsspec) for local paths, gs://, memory://, file://.
# ----------------------------------------------------------------------------------------

def _fs(url: str):
  import fsspec  # pylint: disable=import-outside-toplevel
  try:
    return fsspec.core.url_to_fs(url)
  except ImportError as e:
    raise data_lib.DataError(f'{url}: no filesystem for this URL ({e}); for gs:// install '
                             'gcsfs (pip install gcsfs, in requirements.txt).') from e


def _join(url: str, *names: str) -> str:
  return '/'.join([url.rstrip('/')] + list(names))


def _is_local(url: str) -> bool:
  return '://' not in url


def _read_text(url: str) -> str:
  fs, path = _fs(url)
  with fs.open(path, 'rb') as f:
    return f.read().decode('utf-8')


def _exists(url: str) -> bool:
  fs, path = _fs(url)
  return fs.exists(path)


def _write_bytes(url: str, write) -> None:
  """Writes atomically: local files via a temporary name + rename; an object store makes
  an object visible only once its upload completes, so it is written in place."""
  fs, path = _fs(url)
  if _is_local(url) or url.startswith('file://'):
    fs.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f'{path}.tmp-{uuid.uuid4().hex[:8]}'
    try:
      with fs.open(tmp, 'wb') as f:
        write(f)
      os.replace(tmp, path)
    except BaseException:
      if fs.exists(tmp):
        fs.rm(tmp)
      raise
  else:
    with fs.open(path, 'wb') as f:
      write(f)


def _write_json(url: str, value) -> None:
  _write_bytes(url, lambda f: f.write(json.dumps(value, indent=1).encode()))


# ----------------------------------------------------------------------------------------
# The shuffle: a keyed Feistel bijection of [0, N), computed per index.
# ----------------------------------------------------------------------------------------

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
    keys = [data_lib._example_keys(seed ^ _FEISTEL_SALT,  # pylint: disable=protected-access
                                   epoch * FEISTEL_ROUNDS + r) for r in range(FEISTEL_ROUNDS)]

    def network(x, k):
      left, right = x >> np.uint64(half), x & mask
      for key in k:
        mixed = data_lib._fmix32(key ^ right.astype(np.uint32))  # pylint: disable=protected-access
        left, right = right, left ^ (mixed.astype(np.uint64) & mask)
      return (left << np.uint64(half)) | right

    x = network(offset.astype(np.uint64), keys)
    outside = np.flatnonzero(x >= np.uint64(num_blocks))
    while outside.size:
      x[outside] = network(x[outside], [k[outside] for k in keys])
      outside = outside[x[outside] >= np.uint64(num_blocks)]
  return x.astype(np.int64)


# ----------------------------------------------------------------------------------------
# Reading: metadata, then blocks by byte range.
# ----------------------------------------------------------------------------------------

def prepare_instructions(data_config) -> str:
  """How to prepare the configured corpus, and how to smoke-test without it."""
  task = data_config.task
  tfds_name = TASKS_IN_TFDS.get(task)
  out = data_config.shards_dir or 'gs://BUCKET/' + task.replace('bert_sym_mlm_', '') + (
      f'_{data_config.max_seq_len}')
  steps = []
  if tfds_name:
    steps.append(f'  tfds build {tfds_name} --data_dir=gs://BUCKET/tensorflow_datasets'
                 '   # once (or use a prepared copy)')
  extra = ' --tfds_data_dir=gs://BUCKET/tensorflow_datasets' if tfds_name else ''
  steps.append(f'  python -m bert_sym.streaming export --task={task}{extra} '
               f'--max_seq_len={data_config.max_seq_len} --out_dir={out} '
               '[--num_workers=N --worker_index=I]   # TF needed here only')
  return '\n'.join([
      f'Prepare it once (launch/tpu_vm.sh does this with EXPORT_TO={out}):', *steps,
      f'then pass --config.data.shards_dir={out}.',
      'To smoke-test on the small embedded corpus instead: --config=configs/tiny.py, or '
      '--config.data.task=bert_sym_mlm_embedded --config.data.source=seqio.'])


def _with_timeout(fn, seconds: float):
  """fn() in a daemon thread; TimeoutError after `seconds` (gcsfs retries an unreachable
  bucket for a minute; the trainer should fail in seconds)."""
  result = {}

  def run():
    try:
      result['value'] = fn()
    except BaseException as e:  # pylint: disable=broad-except
      result['error'] = e

  thread = threading.Thread(target=run, daemon=True)
  thread.start()
  thread.join(seconds)
  if thread.is_alive():
    raise TimeoutError(f'no answer within {seconds:.0f} s (unreachable, or no credentials)')
  if 'error' in result:
    raise result['error']
  return result['value']


def read_metadata(shards_dir: str, split: str, data_config=None) -> dict[str, Any]:
  url = _join(shards_dir, split, data_lib.METADATA_FILE)

  def read():
    if not _exists(url):
      raise FileNotFoundError(f'{url}: no such file')
    return _read_text(url)

  try:
    metadata = json.loads(_with_timeout(read, METADATA_TIMEOUT_S))
  except (OSError, ValueError) as e:   # missing, unreachable, unreadable
    if isinstance(e, data_lib.DataError):
      raise
    what = (f'config.data.task={data_config.task!r} reads exported shards, '
            if data_config is not None else '')
    raise data_lib.DataError(
        f'{what}but {url} cannot be read ({type(e).__name__}: {e}); the corpus is not '
        'prepared there, or the export did not finish.\n' +
        (prepare_instructions(data_config) if data_config is not None else '')) from e
  if metadata.get('format_version') != data_lib.SHARD_FORMAT_VERSION:
    raise data_lib.DataError(f'{url}: shard format {metadata.get("format_version")}, this '
                             f'code reads {data_lib.SHARD_FORMAT_VERSION}; re-export.')
  return metadata


class StreamingBlocks:
  """N packed blocks of an exported split, read on demand by byte range (never mapped).

  Has the interface of `bert_sym.data.Blocks` that the iterator uses (len, max_seq_len,
  take, vocab_tokens, special, vocab_md5, description) plus `num_tokens`.
  """

  def __init__(self, shards_dir: str, split: str, data_config=None):
    self.split_url = _join(shards_dir, split)
    self.description = self.split_url
    self.metadata = metadata = read_metadata(shards_dir, split, data_config)
    vocab_bytes = _read_text(_join(self.split_url, data_lib.VOCAB_FILE)).encode('utf-8')
    if hashlib.md5(vocab_bytes).hexdigest() != metadata['vocab_md5']:
      raise data_lib.DataError(f'{self.split_url}/{data_lib.VOCAB_FILE}: md5 differs from '
                               f'{data_lib.METADATA_FILE}; re-export')
    self.vocab_tokens = vocab_bytes.decode('utf-8').split('\n')[:metadata['vocab_size']]
    self.special = metadata['special_ids']
    self.vocab_md5 = metadata['vocab_md5']
    self.num_tokens = int(metadata['num_tokens'])
    self._length = int(metadata['max_seq_len'])
    self._dtype = np.dtype(metadata['dtype'])
    self._files = [s['file'] for s in metadata['shards']]
    self._counts = np.array([s['num_blocks'] for s in metadata['shards']], np.int64)
    self._starts = np.concatenate([[0], np.cumsum(self._counts)])
    self._offsets: dict[int, int] = {}   # shard -> byte offset of its data (.npy header)
    self._fds: dict[int, int] = {}       # local files: shard -> open descriptor
    self._local = _is_local(shards_dir)
    if not self._local:
      self._fs, self._root = _fs(self.split_url)

  def __len__(self) -> int:
    return int(self._starts[-1])

  @property
  def max_seq_len(self) -> int:
    return self._length

  def _path(self, shard: int) -> str:
    return (os.path.join(self.split_url, self._files[shard]) if self._local
            else f'{self._root}/{self._files[shard]}')

  def _read_ranges(self, shards, starts, ends) -> list[bytes]:
    if self._local:
      out = []
      for shard, start, end in zip(shards, starts, ends):
        if shard not in self._fds:
          self._fds[shard] = os.open(self._path(shard), os.O_RDONLY)
        out.append(os.pread(self._fds[shard], end - start, start))
      return out
    return self._fs.cat_ranges([self._path(s) for s in shards], list(starts), list(ends))

  def _data_offset(self, shard: int) -> int:
    if shard not in self._offsets:
      head = self._read_ranges([shard], [0], [_HEADER_BYTES])[0]
      buffer = io.BytesIO(head)
      try:
        version = np.lib.format.read_magic(buffer)
        reader = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                  else np.lib.format.read_array_header_2_0)
        shape, fortran, dtype = reader(buffer)
      except ValueError as e:
        raise data_lib.DataError(f'{self._path(shard)}: not a .npy shard ({e})') from e
      expected = (int(self._counts[shard]), self._length)
      if shape != expected or fortran or dtype != self._dtype:
        raise data_lib.DataError(
            f'{self._path(shard)}: array {shape} {dtype}, metadata says {expected} '
            f'{self._dtype}; re-export')
      self._offsets[shard] = buffer.tell()
    return self._offsets[shard]

  def take(self, rows: np.ndarray) -> np.ndarray:
    rows = np.asarray(rows, np.int64)
    out = np.empty((len(rows), self._length), self._dtype)
    if not len(rows):
      return out
    order = np.argsort(rows, kind='stable')
    sorted_rows = rows[order]
    shard = np.searchsorted(self._starts, sorted_rows, side='right') - 1
    # One range per run of consecutive rows in one shard (in-order reads coalesce).
    new_run = np.ones(len(rows), bool)
    new_run[1:] = (np.diff(sorted_rows) != 1) | (np.diff(shard) != 0)
    run_first = np.flatnonzero(new_run)
    run_size = np.diff(np.append(run_first, len(rows)))
    row_bytes = self._length * self._dtype.itemsize
    run_shard = shard[run_first]
    for s in np.unique(run_shard):
      self._data_offset(int(s))
    starts = [self._offsets[int(s)] + int(r - self._starts[s]) * row_bytes
              for s, r in zip(run_shard, sorted_rows[run_first])]
    ends = [start + int(n) * row_bytes for start, n in zip(starts, run_size)]
    chunks = self._read_ranges([int(s) for s in run_shard], starts, ends)
    flat = np.frombuffer(b''.join(chunks), self._dtype).reshape(len(rows), self._length)
    out[order] = flat
    return out

  def close(self) -> None:
    for fd in self._fds.values():
      os.close(fd)
    self._fds.clear()

  def __del__(self):
    try:
      self.close()
    except Exception:  # pylint: disable=broad-except
      pass


def open_blocks(data_config, split: str) -> StreamingBlocks:
  """The configured split, checked against the config (task, length, vocabulary)."""
  data_lib.check_max_seq_len(data_config.max_seq_len)
  if not data_config.shards_dir:
    raise data_lib.DataError(
        f"config.data.source='streaming' reads config.data.task={data_config.task!r} from "
        'exported shards, and config.data.shards_dir is not set.\n' +
        prepare_instructions(data_config))
  blocks = StreamingBlocks(data_config.shards_dir, split, data_config)
  task = blocks.metadata.get('task')
  if task != data_config.task:
    raise data_lib.DataError(
        f'{blocks.description} holds task {task!r}, the config asks '
        f'config.data.task={data_config.task!r}: pass the shards of that task, or set '
        f'--config.data.task={task} if these are the ones you mean.')
  if blocks.max_seq_len != data_config.max_seq_len:
    raise data_lib.DataError(f'{blocks.description}: shards hold {blocks.max_seq_len}-token '
                             f'blocks, config asks max_seq_len={data_config.max_seq_len}')
  if data_config.vocab_path and '://' not in data_config.vocab_path:
    with open(data_config.vocab_path, 'rb') as f:
      expected = hashlib.md5(f.read()).hexdigest()
  elif not data_config.vocab_path:
    expected = BERT_BASE_UNCASED_MD5
  else:
    expected = blocks.vocab_md5
  if expected != blocks.vocab_md5:
    raise data_lib.DataError(
        f'{blocks.description}: exported with vocabulary md5 {blocks.vocab_md5}, the config '
        f'uses {data_config.vocab_path or "bert-base-uncased"} (md5 {expected}).')
  return blocks


class StreamingMLMIterator(data_lib.MLMIterator):
  """`bert_sym.data.MLMIterator` over `StreamingBlocks`, with the Feistel shuffle and a
  read-ahead thread (batch k is a pure function of k, so reading ahead is safe)."""

  def __init__(self, *args, prefetch: int = 2, **kwargs):
    super().__init__(*args, **kwargs)
    self._prefetch = prefetch
    self._pool = (concurrent.futures.ThreadPoolExecutor(1, 'streaming-prefetch')
                  if prefetch else None)
    self._ahead: dict[int, concurrent.futures.Future] = {}

  def _rows(self, example_index: np.ndarray) -> np.ndarray:
    epoch, offset = np.divmod(example_index, self.num_blocks)
    if not self._shuffle:
      return offset
    return feistel_permutation(offset, self.num_blocks, self._seed, epoch)

  def __next__(self) -> dict[str, np.ndarray]:
    if self._pool is None:
      return super().__next__()
    step = self._step
    self._ahead = {k: v for k, v in self._ahead.items() if k >= step}
    for k in range(step, step + 1 + self._prefetch):
      if k not in self._ahead:
        self._ahead[k] = self._pool.submit(self.batch, k)
    self._step += 1
    return self._ahead.pop(step).result()

  def get_state(self) -> dict[str, Any]:
    return dict(super().get_state(), shuffle=SHUFFLE_KIND if self._shuffle else 'none')

  def set_state(self, state: Mapping[str, Any]) -> None:
    mine = self.get_state()['shuffle']
    if state.get('shuffle') != mine:
      raise data_lib.DataError(
          f'cannot resume: the checkpointed input state has shuffle='
          f'{state.get("shuffle")!r} (another input source), this iterator {mine!r}')
    super().set_state(state)
    self._ahead.clear()


def make_iterator(data_config, *, batch_size: int, split: str, seed: int, start_step: int = 0,
                  process_index: int = 0, process_count: int = 1) -> StreamingMLMIterator:
  blocks = open_blocks(data_config, split)
  spec = data_lib._mask_spec(data_config, blocks)  # pylint: disable=protected-access
  return StreamingMLMIterator(
      blocks, spec, batch_size=batch_size, seed=seed,
      shuffle=split == 'train' and data_config.shuffle, start_step=start_step,
      process_index=process_index, process_count=process_count)


def vocab_size(data_config) -> int:
  open_blocks(data_config, 'train')  # checks the whole configuration, fails fast
  return int(read_metadata(data_config.shards_dir, 'train', data_config)['vocab_size'])


# ----------------------------------------------------------------------------------------
# What the run will read: logged by the trainer.
# ----------------------------------------------------------------------------------------

def describe_corpus(iterator, config) -> list[str]:
  """Lines for the log: corpus size and the number of epochs config.total_steps reads.

  Warns (absl) above EPOCH_WARNING_THRESHOLD epochs. [] for iterators that are not the
  data module's (e.g. synthetic test inputs).
  """
  blocks = getattr(iterator, '_blocks', None)
  if blocks is None or not hasattr(iterator, 'num_blocks'):
    return []
  num_blocks = iterator.num_blocks
  num_tokens = getattr(blocks, 'num_tokens', None)
  if num_tokens is None and config.data.source == 'shards':
    num_tokens = data_lib.read_metadata(config.data.shards_dir, 'train')['num_tokens']
  if num_tokens is None:   # in-memory blocks (seqio path): small, count them
    pad = blocks.special['pad']
    num_tokens = sum(int(np.count_nonzero(np.asarray(a) != pad)) for a in blocks.arrays)
  examples = config.total_steps * config.batch_size
  epochs = examples / max(num_blocks, 1)
  lines = [f'Corpus {config.data.task} ({config.data.source}: {blocks.description}): '
           f'{num_tokens:,} tokens in {num_blocks:,} blocks of {blocks.max_seq_len}; '
           f'{config.total_steps:,} steps x {config.batch_size} sequences read '
           f'{epochs:.2f} epochs.']
  if epochs > EPOCH_WARNING_THRESHOLD:
    warning = (f'the run reads the corpus {epochs:.1f} times (> '
               f'{EPOCH_WARNING_THRESHOLD} epochs): the model will memorise it. Use a '
               'larger corpus (see `python -m bert_sym.streaming export`) or fewer steps.')
    logging.info('%s', lines[0])
    logging.warning('%s', warning)
    return lines + ['WARNING: ' + warning]
  logging.info('%s', lines[0])
  return lines


# ----------------------------------------------------------------------------------------
# Export: parts -> shards + part manifests -> metadata.json (TF needed here only).
# ----------------------------------------------------------------------------------------

def part_manifest_name(part: int) -> str:
  return f'part-{part:05d}.json'


class PartWriter:
  """Writes one part's blocks as shards of `blocks_per_shard`, then its manifest.

  Memory: one shard buffer. Used by `export` and by tests writing synthetic corpora.
  """

  def __init__(self, split_url: str, part: int, num_parts: int, *, max_seq_len: int,
               dtype, pad_id: int, blocks_per_shard: int = 1 << 16):
    self.split_url, self.part, self.num_parts = split_url, part, num_parts
    self.max_seq_len, self.pad_id = max_seq_len, pad_id
    self._buffer = np.empty((blocks_per_shard, max_seq_len), dtype)
    self._filled = 0
    self.shards: list[dict[str, Any]] = []
    self.num_tokens = 0

  def add(self, blocks: np.ndarray) -> None:
    blocks = np.asarray(blocks).reshape(-1, self.max_seq_len)
    while len(blocks):
      n = min(len(blocks), len(self._buffer) - self._filled)
      self._buffer[self._filled:self._filled + n] = blocks[:n]
      self.num_tokens += int(np.count_nonzero(blocks[:n] != self.pad_id))
      self._filled += n
      blocks = blocks[n:]
      if self._filled == len(self._buffer):
        self._flush()

  def _flush(self) -> None:
    name = f'part-{self.part:05d}-{len(self.shards):05d}.npy'
    array = self._buffer[:self._filled]
    _write_bytes(_join(self.split_url, name),
                 lambda f: np.lib.format.write_array(f, array, version=(1, 0)))
    self.shards.append({'file': name, 'num_blocks': int(self._filled)})
    self._filled = 0

  def close(self, **info) -> dict[str, Any]:
    if self._filled:
      self._flush()
    manifest = dict(part=self.part, num_parts=self.num_parts, shards=self.shards,
                    num_blocks=sum(s['num_blocks'] for s in self.shards),
                    num_tokens=self.num_tokens, max_seq_len=self.max_seq_len,
                    dtype=self._buffer.dtype.name, **info)
    _write_json(_join(self.split_url, part_manifest_name(self.part)), manifest)
    return manifest


def write_vocab(split_url: str, vocab_bytes: bytes) -> None:
  _write_bytes(_join(split_url, data_lib.VOCAB_FILE), lambda f: f.write(vocab_bytes))


def finalize(out_dir: str, split: str) -> dict[str, Any] | None:
  """Merges the part manifests into metadata.json; None while parts are missing.

  Idempotent and safe to run concurrently (every writer writes the same bytes).
  """
  split_url = _join(out_dir, split)
  fs, path = _fs(split_url)
  fs.invalidate_cache(path)   # other workers wrote parts since this process listed it
  names = sorted(os.path.basename(p) for p in fs.glob(f'{path}/part-?????.json'))
  if not names:
    return None
  manifests = [json.loads(_read_text(_join(split_url, n))) for n in names]
  first = manifests[0]
  for m in manifests:
    for key in ('num_parts', 'max_seq_len', 'dtype', 'vocab_md5', 'task', 'split'):
      if m.get(key) != first.get(key):
        raise data_lib.DataError(f'{split_url}: part {m["part"]} has {key}={m.get(key)!r}, '
                                 f'part {first["part"]} has {first.get(key)!r}; the parts '
                                 'come from different exports: remove the directory and '
                                 're-export.')
  if len(manifests) < first['num_parts']:
    return None
  shards = [s for m in manifests for s in m['shards']]
  if not shards:
    raise data_lib.DataError(f'{split_url}: empty corpus (no tokens after tokenising)')
  metadata = dict(
      format_version=data_lib.SHARD_FORMAT_VERSION, task=first['task'], split=split,
      max_seq_len=first['max_seq_len'], num_blocks=sum(s['num_blocks'] for s in shards),
      num_tokens=sum(m['num_tokens'] for m in manifests), dtype=first['dtype'],
      shards=shards, vocab_md5=first['vocab_md5'], vocab_size=first['vocab_size'],
      special_ids=first['special_ids'], text_files=first.get('text_files', ''),
      num_parts=first['num_parts'])
  _write_json(_join(split_url, data_lib.METADATA_FILE), metadata)
  return metadata


def _part_blocks(task_name: str, split: str, part: int, num_parts: int, max_seq_len: int,
                 vocabulary):
  """Packed blocks of one part of the split (tf.data)."""
  import seqio  # pylint: disable=import-outside-toplevel
  from bert_sym import preprocessors  # pylint: disable=import-outside-toplevel
  task = seqio.get_mixture_or_task(task_name)
  if split not in task.splits:
    raise data_lib.DataError(f'task {task_name} has no split {split!r}; it has {task.splits}')
  if isinstance(task.source, seqio.TfdsDataSource):   # a part is a set of TFDS files
    documents = task.source.get_dataset(split=split, shuffle=False,
                                        shard_info=seqio.ShardInfo(part, num_parts))
  else:   # function sources: every num_parts-th document (reads the source per part)
    documents = task.source.get_dataset(split=split, shuffle=False)
    if num_parts > 1:
      documents = documents.shard(num_parts, part)
  stream = preprocessors.tokenize_documents(documents, vocabulary)
  return preprocessors.pack_blocks(stream, max_seq_len, vocabulary.special)


def default_num_parts(task_name: str, split: str) -> int:
  """One part per TFDS source file (a natural, fixed unit of work); 1 otherwise."""
  import seqio  # pylint: disable=import-outside-toplevel
  source = seqio.get_mixture_or_task(task_name).source
  if isinstance(source, seqio.TfdsDataSource):
    return len(source.list_shards(split))
  return 1


def export(task: str, split: str, max_seq_len: int, out_dir: str, *, num_parts: int = 0,
           num_workers: int = 1, worker_index: int = 0, vocab_path: str = '',
           text_files: str = '', tfds_data_dir: str = '',
           blocks_per_shard: int = 1 << 16) -> dict[str, Any] | None:
  """Converts this worker's parts of `task`/`split`; returns the metadata once complete."""
  from bert_sym import tasks, vocab as vocab_lib  # pylint: disable=import-outside-toplevel
  data_lib.check_max_seq_len(max_seq_len)
  if not 0 <= worker_index < num_workers:
    raise data_lib.DataError(f'--worker_index={worker_index} is not in [0, {num_workers})')
  if tfds_data_dir:
    import seqio  # pylint: disable=import-outside-toplevel
    seqio.set_tfds_data_dir_override(tfds_data_dir)
  if task == tasks.TEXT_FILES_TASK:
    tasks.register_text_files_task(task, text_files, vocab_path=vocab_path)
  vocabulary = vocab_lib.get_vocabulary(vocab_path)
  num_parts = num_parts or default_num_parts(task, split)
  split_url = _join(out_dir, split)
  write_vocab(split_url, vocab_lib.read_vocab_bytes(vocabulary.path))
  info = dict(task=task, split=split, vocab_md5=vocabulary.md5,
              vocab_size=vocabulary.vocab_size, special_ids=vocabulary.special.as_dict(),
              text_files=text_files)
  for part in range(worker_index, num_parts, num_workers):
    if _exists(_join(split_url, part_manifest_name(part))):
      logging.info('%s: part %d already exported, skipped', split_url, part)
      continue
    writer = PartWriter(split_url, part, num_parts, max_seq_len=max_seq_len,
                        dtype=data_lib._token_dtype(vocabulary.vocab_size),  # pylint: disable=protected-access
                        pad_id=vocabulary.special.pad, blocks_per_shard=blocks_per_shard)
    dataset = _part_blocks(task, split, part, num_parts, max_seq_len, vocabulary)
    description = f'task {task} split {split} part {part}/{num_parts}'
    for batch in data_lib._numpy_blocks(dataset.batch(256), description):  # pylint: disable=protected-access
      writer.add(batch)
    manifest = writer.close(**info)
    print(f'{split_url}: part {part}/{num_parts}: {manifest["num_blocks"]} blocks, '
          f'{manifest["num_tokens"]} tokens', flush=True)
  return finalize(out_dir, split)


# ----------------------------------------------------------------------------------------
# Command line.
# ----------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog='python -m bert_sym.streaming')
  commands = parser.add_subparsers(dest='command', required=True)
  ex = commands.add_parser('export', help="convert this worker's parts of a task to shards")
  ex.add_argument('--task', required=True, help='e.g. bert_sym_mlm_c4')
  ex.add_argument('--split', default='train,validation', help='comma-separated')
  ex.add_argument('--max_seq_len', type=int, default=512)
  ex.add_argument('--out_dir', required=True, help='local directory or gs://bucket/path')
  ex.add_argument('--num_workers', type=int, default=1)
  ex.add_argument('--worker_index', type=int, default=0)
  ex.add_argument('--num_parts', type=int, default=0,
                  help='0 = one per TFDS source file (1 for text files); must be the same '
                       'for every worker')
  ex.add_argument('--tfds_data_dir', default='', help='where `tfds build` wrote the data')
  ex.add_argument('--vocab_path', default='')
  ex.add_argument('--text_files', default='', help='globs for bert_sym_mlm_text_files')
  ex.add_argument('--blocks_per_shard', type=int, default=1 << 16)
  fin = commands.add_parser('finalize', help='write metadata.json once all parts exist; '
                                             'exit 1 while some are missing')
  fin.add_argument('--out_dir', required=True)
  fin.add_argument('--split', default='train,validation')
  args = parser.parse_args(argv)
  missing = []
  for split in args.split.split(','):
    if args.command == 'export':
      metadata = export(args.task, split, args.max_seq_len, args.out_dir,
                        num_parts=args.num_parts, num_workers=args.num_workers,
                        worker_index=args.worker_index, vocab_path=args.vocab_path,
                        text_files=args.text_files, tfds_data_dir=args.tfds_data_dir,
                        blocks_per_shard=args.blocks_per_shard)
    else:
      metadata = finalize(args.out_dir, split)
    if metadata is None:
      missing.append(split)
      print(f'{_join(args.out_dir, split)}: parts still missing (other workers); '
            'metadata.json is written when the last one finishes.')
    else:
      print(f'{_join(args.out_dir, split)}: complete, {metadata["num_blocks"]} blocks, '
            f'{metadata["num_tokens"]} tokens')
  return 1 if (missing and args.command == 'finalize') else 0


if __name__ == '__main__':
  from bert_sym import streaming as _streaming  # pylint: disable=import-self
  sys.exit(_streaming.main(sys.argv[1:]))

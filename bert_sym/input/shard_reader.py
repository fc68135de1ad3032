r"""Exported shards: their format, read by byte range (any size, local or gs://) or
memory-mapped (local), TF-free.

Each split holds `.npy` shards of fixed-size blocks (uint16 [n, max_seq_len]), vocab.txt
and a `metadata.json` listing the shards in reading order, written by
`bert_sym.input.shard_writer`. Block b lives at a computable byte offset of one shard, read
through fsspec (os.pread for local paths; memory:// and file:// exercise the remote code
path in tests), so host memory is bounded whatever the corpus size. The order in which
blocks are read is the iterator's (`iterator.feistel_permutation`).
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import io
import json
import os
import pathlib
import posixpath
import shlex
import threading
from typing import Any

import numpy as np

from bert_sym.input import DataError, check_complete_reads, check_max_seq_len, is_storage_error, sources
from bert_sym.input.blocks import Blocks, check_metadata, first_out_of_vocabulary
from bert_sym.input.blocks import out_of_vocabulary_error
from bert_sym.input.tokenizer import BERT_BASE_UNCASED_MD5, vocab_md5

SHARD_FORMAT_VERSION = 1
METADATA_FILE = 'metadata.json'
VOCAB_FILE = 'vocab.txt'
METADATA_TIMEOUT_S = 5.0   # first read of a split's metadata.json
_HEADER_BYTES = 4096   # enough for any .npy header this code writes
# A corpus has thousands of shards (C4: 1,024 source files at least); the usual limit of
# open files is 1,024. Source 'streaming' keeps this many open, the least recently read
# closed first; 'shards' maps all of them (one descriptor each, see load_shards).
MAX_OPEN_SHARDS = 64


def filesystem(url: str):
  import fsspec  # pylint: disable=import-outside-toplevel
  try:
    return fsspec.core.url_to_fs(url)
  except ImportError as e:
    raise DataError(f'{url}: no filesystem for this URL ({e}); for gs:// install '
                    'gcsfs (pip install gcsfs, in requirements.txt).') from e


def join_url(url: str, *names: str) -> str:
  return '/'.join([url.rstrip('/')] + list(names))


def read_bytes(url: str) -> bytes:
  fs, path = filesystem(url)
  return fs.cat_file(path)


def exists(url: str) -> bool:
  fs, path = filesystem(url)
  return fs.exists(path)


def prepare_instructions(data_config) -> str:
  """How to prepare the configured corpus, and how to smoke-test without it (one line)."""
  task = data_config.task
  tfds_name = sources.TFDS_SOURCES.get(task, ('',))[0].split(':')[0]
  out = data_config.shards_dir or 'gs://BUCKET/' + task.replace('bert_sym_mlm_', '') + (
      f'_{data_config.max_seq_len}')
  steps = []
  if tfds_name:
    steps.append(f'`tfds build {tfds_name} --data_dir=gs://BUCKET/tensorflow_datasets` '
                 '(once, or use a prepared copy), then')
  flags = [f'--task={task}', *(['--tfds_data_dir=gs://BUCKET/tensorflow_datasets']
                                 if tfds_name else []), f'--max_seq_len={data_config.max_seq_len}']
  # The files and vocabulary the config reads: without them the export of the text-files
  # task fails, and other shards carry a vocabulary md5 the trainer rejects. Quoted: the
  # shell must pass a glob on, not expand it.
  for key in ('text_files', 'validation_files', 'vocab_path'):
    if data_config.get(key, ''):
      flags.append(f'--{key}={shlex.quote(data_config[key])}')
  flags.append(f'--out_dir={shlex.quote(out)}')
  steps.append(f'`python -m bert_sym.shards export {" ".join(flags)}` (TF needed there '
               'only; launch/tpu_vm.sh does this with EXPORT_TO)')
  # Already on the embedded corpus (configs/tiny.py asked to read shards): seqio reads it
  # as it is; any other task's smoke test is the tiny config.
  instead = ('--config.data.source=seqio' if task == sources.EMBEDDED_TASK
             else '--config=configs/tiny.py')
  return ' '.join([
      'Fix: prepare it once:', *steps,
      f'and pass --config.data.shards_dir={shlex.quote(out)}; to smoke-test on the small '
      f'embedded corpus instead: {instead}.'])


def missing_shards_dir(data_config) -> str:
  """The error for source 'streaming' or 'shards' without config.data.shards_dir."""
  return (f'config.data.source={data_config.source!r} reads config.data.task='
          f'{data_config.task!r} from exported shards, and config.data.shards_dir is not set. '
          + prepare_instructions(data_config))


def _with_timeout(fn, seconds: float):
  """fn() in a daemon thread; TimeoutError after `seconds` (gcsfs retries an unreachable
  bucket for a minute; the trainer should fail in seconds)."""
  future = concurrent.futures.Future()

  def run():
    try:
      future.set_result(fn())
    except BaseException as e:  # pylint: disable=broad-except
      future.set_exception(e)

  threading.Thread(target=run, daemon=True).start()
  try:
    return future.result(seconds)
  except concurrent.futures.TimeoutError:
    raise TimeoutError(
        f'no answer within {seconds:.0f} s (unreachable, no credentials, or retrying)') from None


def read_metadata(shards_dir: str, split: str, data_config=None) -> dict[str, Any]:
  url = join_url(shards_dir, split, METADATA_FILE)

  def read():
    if not exists(url):
      if exists(join_url(shards_dir, METADATA_FILE)):   # one split of a corpus, not the corpus
        parent = posixpath.dirname(shards_dir.rstrip('/'))
        raise DataError(f'{shards_dir} is one split of an exported corpus (it holds '
                        f'{METADATA_FILE} itself). Fix: pass the corpus directory, its '
                        f'parent: --config.data.shards_dir={parent}')
      raise FileNotFoundError(f'{url}: no such file')
    return read_bytes(url)

  try:
    metadata = json.loads(_with_timeout(read, METADATA_TIMEOUT_S))
  except Exception as e:   # missing, unreachable, unreadable (gcsfs: HttpError, not OSError)
    if isinstance(e, DataError) or not (isinstance(e, (OSError, ValueError)) or is_storage_error(e)):
      raise   # (a bug is not an unprepared corpus)
    what = (f'config.data.task={data_config.task!r} reads exported shards, '
            if data_config is not None else '')
    prepare = (prepare_instructions(data_config) if data_config is not None
               else 'Fix: export it (python -m bert_sym.shards export).')
    if isinstance(e, FileNotFoundError) or (isinstance(e, ValueError) and not is_storage_error(e)):
      why = 'the corpus is not prepared there, or the export did not finish. '   # (or a hand edit)
    else:   # a timeout, a refused or failed read: the corpus may well be there
      why = ('the storage did not answer or refused the read (network, credentials, '
             'permissions): check that this machine can read it. If it was never '
             'prepared: ')
    raise DataError(
        f'{what}but {url} cannot be read ({type(e).__name__}: {e}); {why}{prepare}') from e
  check_metadata(metadata, url, SHARD_FORMAT_VERSION)
  sources.check_exported_files(metadata, data_config, join_url(shards_dir, split))
  return metadata


def read_vocab_tokens(split_url: str, metadata: dict[str, Any]) -> list[str]:
  """The split's vocab.txt, checked against its metadata."""
  url = join_url(split_url, VOCAB_FILE)
  try:
    vocab_bytes = read_bytes(url)
  except FileNotFoundError:   # a partial copy (only *.npy and metadata.json, say)
    raise DataError(f'{url}: the split has no {VOCAB_FILE}, which its shards need; copy '
                    'the whole split again (every file of the directory), or re-export '
                    'it.') from None
  if hashlib.md5(vocab_bytes).hexdigest() != metadata['vocab_md5']:
    raise DataError(f'{split_url}/{VOCAB_FILE}: md5 differs from {METADATA_FILE}; re-export')
  return vocab_bytes.decode('utf-8').split('\n')[:metadata['vocab_size']]


def _parse_header(path: str, head: bytes) -> tuple[tuple[int, ...], bool, np.dtype, int]:
  """(shape, fortran_order, dtype, data offset) of a .npy file's first bytes."""
  buffer = io.BytesIO(head)
  try:
    version = np.lib.format.read_magic(buffer)
    reader = (np.lib.format.read_array_header_1_0 if version == (1, 0)
              else np.lib.format.read_array_header_2_0)
    shape, fortran, dtype = reader(buffer)
  except Exception as e:  # pylint: disable=broad-except  (any garbage: ValueError, SyntaxError...)
    raise DataError(f'{path}: not a .npy shard (garbage header: {one_line(e)}); the file is '
                    'damaged: re-export the split or copy it again.') from None
  return shape, fortran, dtype, buffer.tell()


def one_line(error) -> str:
  return ' '.join(str(error).split())[:200]


def verify_shards(split_url: str, metadata: dict[str, Any]) -> list[int]:
  """Checks every shard that metadata.json lists, before training: it exists, its .npy
  header says the expected shape and dtype, its size is exactly header + blocks x length x
  itemsize (a truncated, resized or half-copied file), and its first block's ids lie in
  the vocabulary (a shard of another vocabulary; every later read is checked too).
  Returns each shard's data offset. One range read per shard (header + first block)."""
  length, dtype = int(metadata['max_seq_len']), np.dtype(metadata['dtype'])
  row_bytes = length * dtype.itemsize
  files = [s['file'] for s in metadata['shards']]
  missing = lambda path: DataError(f'{path}: shard listed in {METADATA_FILE} is missing; '
                                   'copy the whole split again, or re-export it.')
  if '://' not in split_url:
    paths = [os.path.join(split_url, f) for f in files]
    sizes, heads = [], []
    for path in paths:
      try:
        sizes.append(os.stat(path).st_size)
        with open(path, 'rb') as f:
          heads.append(f.read(_HEADER_BYTES + row_bytes))
      except FileNotFoundError:
        raise missing(path) from None
  else:
    fs, root = filesystem(split_url)
    fs.invalidate_cache(root)
    listing = {os.path.basename(e['name'].rstrip('/')): e['size']
               for e in fs.ls(root, detail=True)}
    paths = [join_url(split_url, f) for f in files]
    for path, name in zip(paths, files):
      if name not in listing:
        raise missing(path)
    sizes = [int(listing[f]) for f in files]
    # on_error='raise': fsspec's default returns a failed read's exception in place of its
    # bytes, which then fails later as a TypeError that hides the storage error.
    heads = fs.cat_ranges([f'{root}/{f}' for f in files], [0] * len(files),
                          [min(_HEADER_BYTES + row_bytes, size) for size in sizes],
                          on_error='raise')
  offsets = []
  for shard, path, size, head in zip(metadata['shards'], paths, sizes, heads):
    shape, fortran, found_dtype, offset = _parse_header(path, head)
    expected = (int(shard['num_blocks']), length)
    if tuple(shape) != expected or fortran or found_dtype != dtype:
      raise DataError(f'{path}: array {tuple(shape)} {found_dtype}, {METADATA_FILE} says '
                      f'{expected} {dtype}; the file belongs to another export: '
                      're-export the split.')
    want = offset + expected[0] * row_bytes
    if size != want:
      raise DataError(
          f'{path}: {size:,} bytes, but {expected[0]} blocks of {length} {dtype} need '
          f'{want:,} ({"truncated" if size < want else "extra bytes"}: an interrupted '
          'copy or export?); copy the split again or re-export it.')
    first = np.frombuffer(head[offset:offset + row_bytes], dtype)
    if len(first) == length and first_out_of_vocabulary(first[None], metadata['vocab_size']) == 0:
      raise out_of_vocabulary_error(path, 0, first, metadata['vocab_size'])
    offsets.append(offset)
  return offsets


def load_shards(shards_dir: str, split: str, data_config=None) -> Blocks:
  """An exported split on local disk, memory-mapped (source='shards')."""
  metadata = read_metadata(shards_dir, split, data_config)
  split_dir = pathlib.Path(shards_dir) / split
  tokens = read_vocab_tokens(str(split_dir), metadata)
  verify_shards(str(split_dir), metadata)
  _allow_open_files(len(metadata['shards']), str(split_dir))
  arrays = [np.load(split_dir / shard['file'], mmap_mode='r') for shard in metadata['shards']]
  return Blocks(arrays, tokens, metadata['special_ids'], metadata['vocab_md5'],
                str(split_dir), int(metadata['num_tokens']),
                names=[str(split_dir / s['file']) for s in metadata['shards']],
                task=metadata.get('task'))


def _allow_open_files(num_shards: int, where: str) -> None:
  """Every memory map holds a file descriptor: raise the soft limit of open files towards
  the hard one, or say why the split cannot be mapped (rather than EMFILE mid-load)."""
  import resource  # pylint: disable=import-outside-toplevel
  soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
  open_now = len(os.listdir('/proc/self/fd')) if os.path.isdir('/proc/self/fd') else 0
  # What is open already (the other split's maps), and room for checkpoints and sockets.
  need = open_now + num_shards + 1024
  if soft == resource.RLIM_INFINITY or soft >= need:
    return
  if hard == resource.RLIM_INFINITY or hard >= need:
    resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
    return
  raise DataError(
      f'{where}: {num_shards} shards to memory-map (one open file each), but this process '
      f'may open at most {hard} files (ulimit -Hn). Fix: --config.data.source=streaming '
      f'(keeps {MAX_OPEN_SHARDS} open), or raise the limit, or re-export with larger shards.')


class StreamingBlocks:
  """N packed blocks of an exported split, read on demand by byte range (never mapped);
  what the iterator uses of `blocks.Blocks`, plus `metadata`."""

  def __init__(self, shards_dir: str, split: str, data_config=None):
    self.split_url = self.description = join_url(shards_dir, split)
    self.metadata = metadata = read_metadata(shards_dir, split, data_config)
    self.vocab_tokens = read_vocab_tokens(self.split_url, metadata)
    self.special = metadata['special_ids']
    self.vocab_md5 = metadata['vocab_md5']
    self.num_tokens = int(metadata['num_tokens'])
    self._length = int(metadata['max_seq_len'])
    self._dtype = np.dtype(metadata['dtype'])
    self._files = [s['file'] for s in metadata['shards']]
    self._counts = np.array([s['num_blocks'] for s in metadata['shards']], np.int64)
    self._starts = np.concatenate([[0], np.cumsum(self._counts)])
    self._offsets = verify_shards(self.split_url, metadata)   # data start of each shard
    self.task = metadata.get('task')
    self._fds: dict[int, int] = {}       # local files: shard -> open descriptor
    self._local = '://' not in shards_dir
    if not self._local:
      self._fs, self._root = filesystem(self.split_url)

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
        fd = self._fds.pop(shard, None)   # re-inserted last: the dict is in order of use
        if fd is None:
          fd = os.open(self._path(shard), os.O_RDONLY)
          if len(self._fds) >= MAX_OPEN_SHARDS:
            os.close(self._fds.pop(next(iter(self._fds))))
        self._fds[shard] = fd
        out.append(os.pread(fd, end - start, start))
      return out
    return self._fs.cat_ranges([self._path(s) for s in shards], list(starts), list(ends),
                               on_error='raise')   # see verify_shards

  def _data_offset(self, shard: int) -> int:
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
    starts = [self._data_offset(int(s)) + int(r - self._starts[s]) * row_bytes
              for s, r in zip(run_shard, sorted_rows[run_first])]
    ends = [start + int(n) * row_bytes for start, n in zip(starts, run_size)]
    chunks = self._read_ranges([int(s) for s in run_shard], starts, ends)
    check_complete_reads(chunks, starts, ends, lambda i: self._path(int(run_shard[i])))
    flat = np.frombuffer(b''.join(chunks), self._dtype).reshape(len(rows), self._length)
    bad = first_out_of_vocabulary(flat, len(self.vocab_tokens))
    if bad is not None:
      s = int(shard[bad])
      raise out_of_vocabulary_error(self._path(s), int(sorted_rows[bad] - self._starts[s]),
                                    flat[bad], len(self.vocab_tokens))
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


def open_blocks(data_config, split: str) -> Blocks | StreamingBlocks:
  """The configured split of source 'streaming' or 'shards', checked against the config
  (task, length, vocabulary)."""
  check_max_seq_len(data_config.max_seq_len)
  source = data_config.source
  if not data_config.shards_dir:
    raise DataError(missing_shards_dir(data_config))
  if source == 'shards':
    blocks = load_shards(data_config.shards_dir, split, data_config)
  else:
    blocks = StreamingBlocks(data_config.shards_dir, split, data_config)
  if len(blocks) == 0:   # a hand-edited metadata.json: the iterator would divide by zero
    raise DataError(f'{blocks.description} holds no blocks (its {METADATA_FILE} lists only '
                    'empty shards); re-export the split from a corpus with text in it.')
  # Both sources: shards of another task would train on another corpus without a word.
  if blocks.task != data_config.task:
    raise DataError(
        f'{blocks.description} holds task {blocks.task!r}, the config asks '
        f'config.data.task={data_config.task!r}: pass the shards of that task, or set '
        f'--config.data.task={blocks.task} if these are the ones you mean.')
  if blocks.max_seq_len != data_config.max_seq_len:
    raise DataError(f'{blocks.description}: shards hold {blocks.max_seq_len}-token '
                    f'blocks, config asks max_seq_len={data_config.max_seq_len}. Fix: '
                    f'--config.data.max_seq_len={blocks.max_seq_len}, or export shards of '
                    f'that length.')
  # The same vocabulary check for both sources (a remote vocab_path read through fsspec,
  # TF-free): config.json records the vocab GLUE and the Hugging Face export tokenise with.
  vocab_path = data_config.vocab_path
  if not vocab_path:
    expected = BERT_BASE_UNCASED_MD5
  elif '://' in vocab_path:
    try:
      expected = hashlib.md5(read_bytes(vocab_path)).hexdigest()
    except Exception as e:  # pylint: disable=broad-except
      raise DataError(f'config.data.vocab_path={vocab_path}: cannot read it ({one_line(e)}). '
                      'Fix: the path of the vocab.txt the shards were exported with.') from e
  else:
    expected = vocab_md5(vocab_path)
  if expected != blocks.vocab_md5:
    raise DataError(
        f'{blocks.description}: exported with vocabulary md5 {blocks.vocab_md5}, the '
        f'config uses {vocab_path or "bert-base-uncased"} (md5 {expected}). Fix: '
        '--config.data.vocab_path=<the vocab.txt the shards were exported with>, or '
        're-export them with this one.')
  return blocks

"""Whole-file writes: a reader sees the old file or the complete new one, never half.

One helper for every file this package writes outside orbax (shards, metadata, the
vocabulary cache, Hugging Face exports, GLUE results and predictions, plots), local or
remote:
- a local path (or file://): a temporary file beside the target, synced to disk, then
  `os.replace`, which is atomic on POSIX;
- an object store (gs://, s3://, memory://) through fsspec: the data goes to a local
  temporary file first and is uploaded only once complete (an object is visible only when
  its upload finishes). The upload itself is not in a `with` block either: fsspec's
  buffered files (gcsfs, s3fs) finalise the upload on close, so leaving the block on an
  exception or Ctrl-C part-way would publish the half under the final name; it is
  discarded instead. Filesystems whose files exist from open on and grow as written
  (memory://, sftp, HDFS, FTP, SMB) get a temporary name beside the target, then a move.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import os
import shutil
import tempfile
import uuid
from typing import Callable, IO

import fsspec
from etils import epath

_UPLOAD_CHUNK_BYTES = 16 << 20
# fsspec protocols whose open('wb') creates the file under its name at once (memory://:
# empty, truncating the old one) and writes into it as it goes.
_WRITES_IN_PLACE = {'memory', 'sftp', 'ssh', 'hdfs', 'arrow_hdfs', 'webhdfs', 'ftp', 'smb'}


DEFAULT_CACHE_ROOT = '~/.cache/bert_sym'   # as the configs spell their cache directories


def user_cache_dir(name: str) -> str:
  """`name` under the directory bert_sym keeps between runs (the vocabulary, JAX's compiled
  steps, GLUE's token ids): $BERT_SYM_CACHE, else $XDG_CACHE_HOME/bert_sym, else
  ~/.cache/bert_sym. The tests point $BERT_SYM_CACHE at a directory of their own."""
  root = os.environ.get('BERT_SYM_CACHE') or os.path.join(
      os.environ.get('XDG_CACHE_HOME') or os.path.expanduser('~/.cache'), 'bert_sym')
  return os.path.join(root, name)


def cache_dir(configured: str) -> str:
  """A config's cache directory on this machine: its default, ~/.cache/bert_sym/NAME, is
  NAME under user_cache_dir; any other path as given. The config keeps the symbolic
  default, so that a config.json compares equal, and reruns (configs/from_json.py), on
  any machine and under any $BERT_SYM_CACHE."""
  if configured.startswith(DEFAULT_CACHE_ROOT + '/'):
    return user_cache_dir(configured[len(DEFAULT_CACHE_ROOT) + 1:].lstrip('/'))
  return os.path.expanduser(configured)


def local_path(path: str) -> str | None:
  """The filesystem path of a local path or file:// URL; None for an object store."""
  if path.startswith('file://'):
    return path[len('file://'):]
  return None if '://' in path else path


def _upload(fs, staged: IO[bytes], remote: str) -> None:
  """Copies `staged` to `remote`, publishing it only if the whole copy succeeded."""
  f = fs.open(remote, 'wb')
  try:
    shutil.copyfileobj(staged, f, length=_UPLOAD_CHUNK_BYTES)
  except BaseException:
    # Not close(): it would finalise, i.e. publish, the part uploaded so far. discard()
    # aborts the upload session (gcsfs, s3fs); should that fail too, the unfinished session
    # just expires, and the original error is the one to report. Marking the file closed
    # keeps its __del__ from closing (publishing) it when it is garbage-collected.
    with contextlib.suppress(Exception):
      f.discard()
    if isinstance(f, fsspec.spec.AbstractBufferedFile):
      f.closed = True
    raise
  f.close()


# A write goes to `<name>.tmp-<8 hex>` (locally hidden: `.<name>.tmp-...`) and is renamed
# when complete; remove_leftover_temporaries globs the same pattern, so both are spelled here.
def _temporary(name: str) -> str:
  return f'{name}.tmp-{uuid.uuid4().hex[:8]}'


def _temporaries(name: str) -> str:
  return f'{name}.tmp-' + '?' * 8


def write_atomically(path, data: bytes | str | Callable[[IO[bytes]], object]) -> None:
  """Writes `data` (bytes; text as UTF-8; or a function given the open binary file) to
  `path`, creating its directory."""
  path = str(path)   # os.PathLike, epath (gs://) or a URL string
  write = data if callable(data) else (
      lambda f: f.write(data.encode('utf-8') if isinstance(data, str) else data))
  local = local_path(path)
  if local is None:
    fs, remote = fsspec.core.url_to_fs(path)
    with tempfile.TemporaryFile() as staged:
      write(staged)
      staged.seek(0)
      protocols = {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)
      if not protocols & _WRITES_IN_PLACE:
        _upload(fs, staged, remote)
        return
      tmp = _temporary(remote)
      try:
        _upload(fs, staged, tmp)
        fs.mv(tmp, remote)
      except BaseException:
        with contextlib.suppress(Exception):
          if fs.exists(tmp):
            fs.rm(tmp)
        raise
    return
  directory = os.path.dirname(os.path.abspath(local))
  os.makedirs(directory, exist_ok=True)
  tmp = os.path.join(directory, _temporary(f'.{os.path.basename(local)}'))
  try:
    with open(tmp, 'wb') as f:
      write(f)
      # Before the rename: else a power loss (not a crash) can leave the new name on an
      # empty file, the old contents gone.
      f.flush()
      _fsync(f.fileno())
    os.replace(tmp, local)
    _fsync_directory(directory)   # the rename itself
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def remove_leftover_temporaries(path: str) -> None:
  """Deletes the temporary files that `write_atomically(path, ...)` calls killed mid-write
  (SIGKILL, preemption: no `except` runs) left beside `path`; the basename may be a glob
  (`part-00001-*.npy`). A rerun writes the file again under a new temporary name, so each
  kill left a whole-size copy (a model, a shard) for good, and an export folder shipped
  it. Only for files that no other process is writing now (their rename would fail)."""
  path = str(path)
  local = local_path(path)
  if local is not None:
    directory, name = os.path.split(os.path.abspath(local))
    stale = glob.glob(os.path.join(glob.escape(directory), _temporaries(f'.{name}')))
    for tmp in stale:
      with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    return
  fs, remote = fsspec.core.url_to_fs(path)
  protocols = {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)
  if protocols & _WRITES_IN_PLACE:   # the only remote writes with a temporary name
    for tmp in fs.glob(_temporaries(remote)):
      with contextlib.suppress(FileNotFoundError):
        fs.rm(tmp)


def _fsync(fd: int) -> None:
  try:
    os.fsync(fd)
  except OSError as e:   # a filesystem without fsync (some FUSE mounts) is no write error;
    if e.errno not in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
      raise            # an I/O error is: the data may not be on the disk


def _fsync_directory(directory: str) -> None:
  with contextlib.suppress(OSError):   # not every filesystem (or OS) opens directories
    fd = os.open(directory, os.O_RDONLY)
    try:
      os.fsync(fd)
    finally:
      os.close(fd)


# Object-store clients whose failures are not OSErrors: TensorFlow's gfile, etils.epath's
# gs:// backend once TF is imported (tf.errors.OpError: no network, no credentials, no
# such bucket, permission denied), gcsfs (HttpError; 401 without credentials, 5xx once its
# own retries are spent) with google-auth and aiohttp under it, s3fs and adlfs with theirs.
STORAGE_CLIENTS = {'tensorflow', 'gcsfs', 'google', 'aiohttp', 'requests', 'fsspec', 's3fs',
                   'botocore', 'aiobotocore', 'adlfs', 'azure'}


# The fix for a bucket this machine cannot reach or write (a workdir, an output directory).
UNREACHABLE_FIX = ('check that this machine can reach and write it (network, credentials, '
                   'bucket permissions)')


def is_storage_client_error(e: BaseException) -> bool:
  """An object store's failure as its client raised it, not an OSError (those are worded
  by the command line already): a bucket this machine cannot reach or write, not a bug."""
  return (isinstance(e, Exception) and not isinstance(e, OSError)
          and type(e).__module__.split('.')[0] in STORAGE_CLIENTS
          and not is_unsupported_scheme(e))


def is_unsupported_scheme(e: BaseException) -> bool:
  """TensorFlow's gfile, which etils.epath (orbax's paths) uses for URLs once TensorFlow is
  installed, has no file system for the scheme (s3://, az://): no network would help."""
  return (type(e).__name__ == 'UnimplementedError'
          and type(e).__module__.split('.')[0] == 'tensorflow')


def check_writable(directory, what: str) -> epath.Path:
  """Creates `directory` and writes and removes a probe file in it, so that a place this
  process cannot write fails at once, in one line naming `what` (the flag and its value),
  and not at the first save after data loading and compiling."""
  path = epath.Path(directory)
  try:
    path.mkdir(parents=True, exist_ok=True)
    probe = path / f'.write-probe-{os.getpid()}-{uuid.uuid4().hex[:8]}'
    probe.write_text('')
    probe.unlink()
  except Exception as e:  # pylint: disable=broad-except
    if is_unsupported_scheme(e):
      raise ValueError(f'Cannot write to {what}: {" ".join(str(e).split())[:300]} (TensorFlow\'s '
                       'file system, which orbax\'s paths use once TensorFlow is installed). '
                       'Fix: a local directory or gs://bucket/path.') from e
    if is_storage_client_error(e):   # was a traceback: a gs:// workdir is where this happens
      raise ValueError(f'Cannot write to {what}: {type(e).__name__}: '
                       f'{" ".join(str(e).split())[:300]}. Fix: {UNREACHABLE_FIX}, or pass '
                       'another directory.') from e
    if not isinstance(e, OSError):
      raise
    blocker = next((p for p in [path, *path.parents] if p.exists() and not p.is_dir()), None)
    why = (f'{blocker} is a file, not a directory' if blocker is not None   # errno 17 / 20
           else str(e))
    raise ValueError(f'Cannot write to {what}: {why}. Pass a writable directory (local '
                     'path or gs://bucket/path).') from e
  return path

"""The MLM input pipeline, one module per stage (README.md's Layout says what each does); a
module imports only those before it: embedded (the corpus an installed package ships),
sources, tokenizer, masking, blocks, streaming, iterator, seqio_tasks, export (corpus ->
shards, `python -m bert_sym.shards`).

TensorFlow is imported by `import_tensorflow` (here, with what all stages share), only
where TF runs: the shards and streaming paths never load it.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import sys
import traceback

from bert_sym import files
from bert_sym.cli import UserError, one_line, user_error_message

MAX_SEQ_LEN = 512  # BERT's; masking packs a position into its sort key below 1024


class DataError(UserError, ValueError):
  """Bad input data or configuration; the message names the file and the problem."""


# What only a bug of the reader makes a read return (a closed descriptor, a bad offset or
# buffer); every other OSError is the storage's: a disk, a network file system, an object
# store and its client's connection (aiohttp's are OSErrors, a DNS failure errno -2 or -3).
_READER_BUG_ERRNOS = {errno.EBADF, errno.EINVAL, errno.EFAULT}
# The object stores' clients that raise a ValueError for a request the store refused
# (gcsfs: a 400 'Bad Request', a requester-pays bucket).
_VALUE_ERROR_CLIENTS = ('gcsfs', 's3fs', 'adlfs')


def is_storage_error(e: BaseException) -> bool:
  """The storage's failure, not a bug: an OSError but the reader's own, an error of a
  storage client, or a ValueError an object store's client raised itself."""
  if isinstance(e, OSError):   # (gcsfs raises a plain OSError('Forbidden') too)
    return e.errno not in _READER_BUG_ERRNOS
  if isinstance(e, ValueError):
    return _raised_by_a_client(e)
  return files.is_storage_client_error(e)


def _raised_by_a_client(e: BaseException) -> bool:
  """Whether the innermost frame of `e` is in an installed object-store client's package
  (not a path that merely names one, not fsspec's 'Protocol not known' for a typo)."""
  frames = traceback.extract_tb(e.__traceback__)
  packages = [os.path.dirname(sys.modules[client].__file__) + os.sep   # (imported: it raised)
              for client in _VALUE_ERROR_CLIENTS if client in sys.modules]
  return bool(frames) and any(frames[-1].filename.startswith(p) for p in packages)


@contextlib.contextmanager
def storage_errors(url: str, fix: str, *, mid_run: bool = False):
  """A failed read of the storage under `url` (not our own DataError, not a bug) as a
  DataError naming `url` and `fix`: the command line words only OSError subclasses, so
  gcsfs's errors were a traceback that hid which data could not be read."""
  try:
    yield
  except Exception as e:  # pylint: disable=broad-except
    if mid_run and isinstance(e, (FileNotFoundError, PermissionError)):
      # The command line's "check the path given" would send the user to a path that was
      # right: the run read this file at start-up.
      raise DataError(f'{url} cannot be read ({type(e).__name__}: {e}): a file the run read '
                      'at start-up is gone or no longer readable (moved, deleted, its '
                      'permissions changed). Fix: put it back (copy the split again), then '
                      'rerun the same command: the run resumes from its last checkpoint.') from e
    # What the command line words already (a full disk, no more open files) keeps its fix.
    if user_error_message(e) is not None or not is_storage_error(e):
      raise
    retried = " after its client's own retries" if '://' in url else ''
    raise DataError(f'{url} cannot be read ({type(e).__name__}: {one_line(e)[:300]}); the '
                    f'storage refused or failed the read{retried}. Fix: {fix}') from e


def check_complete_reads(chunks, starts, ends, path_of) -> None:
  """Raises unless every range read returned the bytes asked for: a file (object) cut
  short since the start-up check of its size reads short, which was a numpy reshape
  error naming no file (`path_of(i)`: the file of read i)."""
  for i, (chunk, start, end) in enumerate(zip(chunks, starts, ends)):
    if len(chunk) != end - start:
      raise DataError(
          f'{path_of(i)}: read {len(chunk):,} of the {end - start:,} bytes at offset '
          f'{start:,}: the file was truncated or replaced since the run started (a copy or '
          'export writing to the same place?). Fix: copy the split again or re-export it, '
          'then rerun the same command: the run resumes from its last checkpoint.')


def gfile_error_text(e) -> str:
  """What a tf.io.gfile error `e` says of a file the text-file reader lists or reads (after
  its path)."""
  if isinstance(e, import_tensorflow().errors.NotFoundError):   # it was listed, or globbed
    return ('does not exist (a missing bucket or folder, a broken symbolic link, or a file '
            'deleted since it was listed). Fix: correct the path, or remove the link')
  return (f'cannot be read ({type(e).__name__}: {" ".join(e.message.split())[:200]}): the '
          'storage did not answer or refused the read (network, credentials, permissions). '
          'Fix: check that this machine can read it')


START_UP_FIX = ('check that this machine can read it (credentials, permissions of the '
                'bucket, network), then rerun the same command.')


def check_max_seq_len(max_seq_len: int) -> int:
  if not 3 <= max_seq_len <= MAX_SEQ_LEN:
    raise DataError(f'max_seq_len={max_seq_len} is outside [3, {MAX_SEQ_LEN}], the block '
                    f'lengths the input pipeline packs and masks (BERT\'s {MAX_SEQ_LEN}). Fix: a '
                    f'max_seq_len in [3, {MAX_SEQ_LEN}], e.g. 128.')
  return max_seq_len


_quiet_imports = False
_tf_min_log_level = None


def quiet_tensorflow_imports(min_log_level: str | None = None) -> None:
  """From now on TF and TF Text are imported with the process's stderr on /dev/null: their
  C++ start-up lines ("failed call to cuInit" at error level on a CPU machine, oneDNN
  notices) print before anything can configure them. Set by metrics_writer.quiet_logs.

  `min_log_level` (None: as the environment has it) is TF_CPP_MIN_LOG_LEVEL for TF's
  libraries alone: each reads it once, as it loads, as jaxlib did at `import jax`, so it
  is set for the import only, and the XLA plugins loaded later keep the process's level.
  """
  global _quiet_imports, _tf_min_log_level
  _quiet_imports, _tf_min_log_level = True, min_log_level


@contextlib.contextmanager
def tensorflow_import_scope():
  """Where TF's (and TF Text's) first import runs: stderr muted after
  `quiet_tensorflow_imports`, as it is."""
  if not _quiet_imports:
    yield
    return
  saved_level = os.environ.get('TF_CPP_MIN_LOG_LEVEL')
  if _tf_min_log_level is not None:
    os.environ['TF_CPP_MIN_LOG_LEVEL'] = _tf_min_log_level
  saved_stderr, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
  sys.stderr.flush()
  os.dup2(devnull, 2)
  try:
    yield
  finally:
    os.dup2(saved_stderr, 2)
    os.close(saved_stderr)
    os.close(devnull)
    if saved_level is None:
      os.environ.pop('TF_CPP_MIN_LOG_LEVEL', None)
    else:
      os.environ['TF_CPP_MIN_LOG_LEVEL'] = saved_level


@functools.cache
def import_tensorflow():
  """`import tensorflow`, hiding the GPUs from it; returns the module.

  TF only feeds the input pipeline. Left alone it would claim the GPUs' memory that JAX
  needs (it finds the CUDA wheels jax[cuda] installs), so every TF path of bert_sym
  imports it through here.
  """
  with tensorflow_import_scope():   # listing the devices is where CUDA says it failed
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    try:
      tf.config.set_visible_devices([], 'GPU')
    except RuntimeError:   # TF's devices were already initialised by the caller: its choice.
      pass
  return tf

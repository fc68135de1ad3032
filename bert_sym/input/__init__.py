"""The MLM input pipeline, one module per stage (README.md's Layout says what each does); a
module imports only those before it: sources, tokenizer, masking, blocks, streaming,
iterator, seqio_tasks, export (corpus -> shards, `python -m bert_sym.shards`).

TensorFlow is imported by `import_tensorflow` (here, with what all stages share), only
where TF runs: the shards and streaming paths never load it.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys

from bert_sym.cli import UserError

MAX_SEQ_LEN = 512  # BERT's; masking packs a position into its sort key below 1024


class DataError(UserError, ValueError):
  """Bad input data or configuration; the message names the file and the problem."""


def check_max_seq_len(max_seq_len: int) -> int:
  if not 3 <= max_seq_len <= MAX_SEQ_LEN:
    raise DataError(f'max_seq_len={max_seq_len} is outside [3, {MAX_SEQ_LEN}], the block '
                    f'lengths the input pipeline packs and masks (BERT\'s {MAX_SEQ_LEN}). Fix: a '
                    f'max_seq_len in [3, {MAX_SEQ_LEN}], e.g. 128.')
  return max_seq_len


_quiet_imports = False


def quiet_tensorflow_imports() -> None:
  """From now on TF and TF Text are imported with the process's stderr on /dev/null: their
  C++ start-up lines ("failed call to cuInit" at error level on a CPU machine, oneDNN
  notices) print before anything can configure them. Set by metrics_writer.quiet_logs."""
  global _quiet_imports
  _quiet_imports = True


@contextlib.contextmanager
def tensorflow_import_scope():
  """Where TF's (and TF Text's) first import runs: stderr muted after
  `quiet_tensorflow_imports`, as it is."""
  if not _quiet_imports:
    yield
    return
  saved_stderr, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
  sys.stderr.flush()
  os.dup2(devnull, 2)
  try:
    yield
  finally:
    os.dup2(saved_stderr, 2)
    os.close(saved_stderr)
    os.close(devnull)


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

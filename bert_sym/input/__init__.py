"""The MLM input pipeline, one module per stage; TensorFlow only at the edge.

  sources      documents: the embedded corpus, text files, the TFDS corpora's names
  tokenizer    the WordPiece vocab file and tokeniser (MLM and GLUE)
  masking      the counter-based hash RNG: BERT masking, epoch permutations (NumPy)
  blocks       packing into [CLS] ... [SEP] blocks, exported shards (read, TF-free), and
               the in-memory blocks of a small corpus
  streaming    exported shards of any size read by byte range (local or gs://)
  iterator     the trainer's iterator: batch k of MLM features is a function of (seed, k)
  masking_tf   the TF twin of `masking` (for the seqio tasks)
  seqio_tasks  the registered seqio tasks and their Vocabulary; imported by none of the above
  export       corpus -> shards (needs the seqio tasks: TF); `python -m bert_sym.streaming`

A module imports only modules listed above it (this package holds only what they all
share). TensorFlow is imported by `import_tensorflow`, only by the functions that run TF
(tokenising, reading text files, packing, exporting); the shards and streaming paths and
the iterator's import never load it.
"""

from __future__ import annotations

import functools
import os
import pathlib
import tempfile

MAX_SEQ_LEN = 512  # the model's max_position_embeddings


class DataError(ValueError):
  """Bad input data or configuration; the message names the file and the problem."""


def check_max_seq_len(max_seq_len: int) -> int:
  if not 3 <= max_seq_len <= MAX_SEQ_LEN:
    raise DataError(f'max_seq_len={max_seq_len} is outside [3, {MAX_SEQ_LEN}]: the model '
                    f'has {MAX_SEQ_LEN} position embeddings (max_position_embeddings).')
  return max_seq_len


@functools.cache
def import_tensorflow():
  """`import tensorflow`, hiding the GPUs from it; returns the module.

  TF only feeds the input pipeline. Left alone it would claim the GPUs' memory that JAX
  needs (it finds the CUDA wheels jax[cuda] installs), so every TF path of bert_sym
  imports it through here.
  """
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  try:
    tf.config.set_visible_devices([], 'GPU')
  except RuntimeError:   # TF's devices were already initialised by the caller: its choice.
    pass
  return tf


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

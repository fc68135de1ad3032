"""The MLM input pipeline, one module per stage (README.md's Layout says what each does); a
module imports only those before it: sources, tokenizer, masking, blocks, streaming,
iterator, seqio_tasks, export (corpus -> shards, `python -m bert_sym.shards`).

TensorFlow is imported by `import_tensorflow` (here, with what all stages share), only
where TF runs: the shards and streaming paths never load it.
"""

from __future__ import annotations

import functools

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

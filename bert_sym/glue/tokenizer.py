"""GLUE's tokeniser: the pre-training WordPiece (TF Text).

Kept apart from glue/data.py so that moving it to bert_sym/input/tokenizer.py (the input
package) changes one import line there and deletes this file.
"""

import numpy as np


class WordPiece:
  """Sentence -> WordPiece ids with the pre-training tokenizer (`bert_sym.vocab`).

  The same seqio vocabulary (TF Text WordPiece, Hugging Face's uncased normalisation)
  that tokenised the pre-training corpus, so GLUE text is split exactly as the model saw
  text in pre-training. `vocab_path` '' is bert-base-uncased.
  """

  def __init__(self, vocab_path: str = ''):
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    from bert_sym import vocab as vocab_lib  # pylint: disable=g-import-not-at-top
    self._tf = tf
    self._vocabulary = vocab_lib.get_vocabulary(vocab_path)
    self.vocab_file = self._vocabulary.path
    self.vocab_size = self._vocabulary.vocab_size
    special = self._vocabulary.special
    self.pad_id, self.cls_id, self.sep_id = special.pad, special.cls, special.sep

  def encode(self, texts: list[str], chunk: int = 4096) -> list[np.ndarray]:
    """Token ids per text (no special tokens)."""
    out = []
    for start in range(0, len(texts), chunk):
      ragged = self._vocabulary.encode_tf(self._tf.constant(texts[start:start + chunk]))
      flat, splits = ragged.flat_values.numpy(), ragged.row_splits.numpy()
      out.extend(flat[splits[i]:splits[i + 1]].astype(np.int32) for i in range(len(splits) - 1))
    return out

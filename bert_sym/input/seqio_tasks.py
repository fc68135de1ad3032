"""seqio tasks for BERT MLM pre-training; `import bert_sym.input.seqio_tasks` registers them
(README.md's Data section lists them; `register_text_files_task` builds the text-files one).

Every task has 'train' and 'validation' splits and yields the five MLM features of
`masking.FEATURES` at `sequence_length['input_ids']`:

  seqio.get_mixture_or_task('bert_sym_mlm_embedded').get_dataset(
      sequence_length={'input_ids': 128}, split='validation', shuffle=False)

Masking inside a task uses the mask seed given at registration (default 0), the block's
position in the packed stream it reads and the block's ids (a shard read with
get_dataset(shard_info=...) numbers its blocks from 0: the ids keep two shards' k-th
blocks from being masked alike); the trainer's iterator instead masks packed blocks with
its own seed. Also here: the seqio Vocabulary over `tokenizer.WordPiece`.
"""

from __future__ import annotations

import functools

import seqio

from bert_sym.input import MAX_SEQ_LEN, DataError, check_max_seq_len, import_tensorflow
from bert_sym.input import blocks, masking, sources, tokenizer
from bert_sym.input.sources import EMBEDDED_TASK, TEXT_FILES_TASK

tf = import_tensorflow()


class BertWordPieceVocabulary(seqio.Vocabulary):
  """`tokenizer.WordPiece` as a seqio Vocabulary (raw ids, no [CLS]/[SEP], no EOS)."""

  def __init__(self, vocab_path: str = ''):
    self.wordpiece = tokenizer.WordPiece(vocab_path)
    tokenizer.check_uncased(self.wordpiece.tokens, self.wordpiece.vocab_file)
    self.special = self.wordpiece.special
    self.md5 = self.wordpiece.md5
    super().__init__(extra_ids=0)

  @property
  def path(self) -> str:
    return self.wordpiece.vocab_file

  @property
  def tokens(self) -> list[str]:
    return list(self.wordpiece.tokens)

  @property
  def pad_id(self) -> int:
    return self.special.pad

  @property
  def eos_id(self) -> int | None:
    return None  # BERT has no EOS; [SEP] is added by packing, not by seqio.

  @property
  def unk_id(self) -> int:
    return self.special.unk

  @property
  def _base_vocab_size(self) -> int:
    return self.wordpiece.vocab_size

  def _encode_tf(self, s: tf.Tensor) -> tf.Tensor:
    return self.wordpiece.encode_tf(s)

  def _decode_tf(self, ids: tf.Tensor) -> tf.Tensor:
    return self.wordpiece.decode_tf(ids)

  def _encode(self, s: str) -> list[int]:
    return self._encode_tf(tf.constant(s)).numpy().tolist()

  def _decode(self, ids) -> str:
    return self._decode_tf(tf.constant(list(ids), tf.int32)).numpy().decode('utf-8')

  def __eq__(self, other) -> bool:
    return isinstance(other, BertWordPieceVocabulary) and self.md5 == other.md5

  def __hash__(self) -> int:
    return hash(self.md5)


@functools.cache
def get_vocabulary(vocab_path: str = '') -> BertWordPieceVocabulary:
  """The seqio vocabulary for `vocab_path` ('' = bert-base-uncased)."""
  return BertWordPieceVocabulary(vocab_path)


def mask_blocks_tf(blocks: tf.data.Dataset, seed: int, spec: masking.MaskSpec,
                   first_index: int = 0, batch_size: int = 256) -> tf.data.Dataset:
  """Masks the i-th block with example index `first_index + i` by `masking.mask_blocks`
  itself (through tf.numpy_function): the tasks and the trainer's iterator share one
  masking function, hence bit-identical examples. i counts within `blocks`, one shard's
  stream under a ShardInfo; mask_blocks also keys each block by its ids, so same-index
  blocks of different shards are masked independently."""
  dtypes = [tf.float32 if k == 'mlm_weights' else tf.int32 for k in masking.FEATURES]

  def mask(index, block):
    out = masking.mask_blocks(block, index, seed, spec)
    return [out[k] for k in masking.FEATURES]

  def features(index, block):
    values = tf.numpy_function(mask, [index, block], dtypes, stateful=False)
    for value in values:
      value.set_shape(block.shape)
    return dict(zip(masking.FEATURES, values))

  batched = blocks.enumerate(start=first_index).batch(batch_size)   # one Python call a batch
  return batched.map(features, num_parallel_calls=tf.data.AUTOTUNE,
                     deterministic=True).unbatch()


def _max_seq_len(sequence_length: dict[str, int] | None) -> int:
  if not sequence_length or not sequence_length.get('input_ids'):
    raise ValueError("bert_sym MLM tasks need sequence_length={'input_ids': L, ...}")
  lengths = {v for k, v in sequence_length.items() if k in masking.FEATURES and v}
  if len(lengths) != 1:
    raise ValueError(f'all MLM features share one length; got {sequence_length}')
  return check_max_seq_len(lengths.pop())


def tokenize_and_pack(dataset: tf.data.Dataset, sequence_length, output_features
                      ) -> tf.data.Dataset:
  vocabulary = output_features['input_ids'].vocabulary
  return blocks.packed_blocks(dataset, _max_seq_len(sequence_length), vocabulary)


def mask_for_mlm(dataset: tf.data.Dataset, output_features, *, seed: int = 0,
                 mask_rate: float = 0.15, whole_word: bool = False,
                 max_predictions: int | None = None) -> tf.data.Dataset:
  """Packed blocks -> MLM features. `max_predictions=None`: no cap beyond the rate."""
  vocabulary = output_features['input_ids'].vocabulary
  spec = masking.MaskSpec.from_vocab(
      vocabulary.tokens, vocabulary.special.as_dict(), mask_rate=mask_rate,
      whole_word=whole_word, max_predictions=max_predictions or MAX_SEQ_LEN)
  return mask_blocks_tf(dataset, seed, spec)


def output_features(vocabulary: seqio.Vocabulary) -> dict[str, seqio.Feature]:
  ints = dict(vocabulary=vocabulary, add_eos=False, dtype=tf.int32, rank=1)
  return dict(
      input_ids=seqio.Feature(**ints),
      token_type_ids=seqio.Feature(**ints),
      attention_mask=seqio.Feature(**ints),
      mlm_targets=seqio.Feature(**ints),
      mlm_weights=seqio.Feature(vocabulary=seqio.PassThroughVocabulary(1), add_eos=False,
                                dtype=tf.float32, rank=1),
  )


def _register(name: str, source: seqio.DataSource, vocab_path: str = '', *,
              mask_seed: int = 0, mask_rate: float = 0.15, whole_word: bool = False,
              max_predictions: int | None = None) -> seqio.Task:
  if name in seqio.TaskRegistry.names():
    seqio.TaskRegistry.remove(name)  # re-registration (e.g. new globs) replaces the task
  return seqio.TaskRegistry.add(
      name,
      source=source,
      preprocessors=[
          tokenize_and_pack,
          functools.partial(mask_for_mlm, seed=mask_seed, mask_rate=mask_rate,
                            whole_word=whole_word, max_predictions=max_predictions),
      ],
      output_features=output_features(get_vocabulary(vocab_path)),
  )


def documents(task_name: str, split: str, part: int = 0, num_parts: int = 1):
  """The task's {'text'} documents in source order (no shuffle); part `part` of
  `num_parts` is a set of TFDS files, or every num_parts-th document of a function source."""
  task = seqio.get_mixture_or_task(task_name)
  if split not in task.splits:
    raise DataError(f'seqio task {task_name} has no split {split!r}; it has {task.splits}')
  if isinstance(task.source, seqio.TfdsDataSource):
    return task.source.get_dataset(split=split, shuffle=False,
                                   shard_info=seqio.ShardInfo(part, num_parts))
  dataset = task.source.get_dataset(split=split, shuffle=False)   # read whole per part
  return dataset.shard(num_parts, part) if num_parts > 1 else dataset


def packed_blocks(task_name: str, split: str, max_seq_len: int,
                  vocabulary: BertWordPieceVocabulary | None = None, part: int = 0,
                  num_parts: int = 1) -> tf.data.Dataset:
  """`documents`, tokenised and packed, unmasked."""
  vocabulary = (vocabulary or
                seqio.get_mixture_or_task(task_name).output_features['input_ids'].vocabulary)
  return blocks.packed_blocks(documents(task_name, split, part, num_parts), max_seq_len,
                              vocabulary)


def register_text_files_task(name: str, patterns: str | list[str], *, vocab_path: str = '',
                             holdout_every: int = sources.HOLDOUT_EVERY,
                             validation_patterns: str | list[str] = '', **mask_kwargs
                             ) -> seqio.Task:
  """Registers (or replaces) task `name` over text files matching `patterns`.

  `patterns`, `holdout_every`, `validation_patterns`: see `sources.text_files_dataset_fn`;
  `vocab_path`: the output features' vocab.txt ('' = bert-base-uncased); `mask_kwargs`:
  mask_seed, mask_rate, whole_word, max_predictions for get_dataset.
  """
  source = seqio.FunctionDataSource(  # a bad glob fails here, at configuration time
      sources.text_files_dataset_fn(patterns, holdout_every=holdout_every,
                                    validation_patterns=validation_patterns),
      splits=sources.SPLITS)
  return _register(name, source, vocab_path, **mask_kwargs)


def task_documents(data_config, split: str):
  """The documents of config.data's registered seqio task: what the trainer packs for
  source='seqio', so a task registered under any name is read."""
  name = task_for_config(data_config)
  _check_task_vocabulary(name, data_config.vocab_path)
  return documents(name, split)


def _check_task_vocabulary(name: str, vocab_path: str) -> None:
  """The trainer tokenises a task's documents with config.data.vocab_path: a task
  registered with another vocabulary was trained on ids it never meant, without a word."""
  features = seqio.get_mixture_or_task(name).output_features
  if 'input_ids' not in features:   # not one of ours: nothing says which vocabulary it meant
    return
  own = features['input_ids'].vocabulary
  # The default one is no choice (the built-in tasks': their text is read with any vocab.txt).
  if own != get_vocabulary(vocab_path) and own != get_vocabulary(''):
    what = own.path if isinstance(own, BertWordPieceVocabulary) else type(own).__name__
    fix = (f'--config.data.vocab_path={own.path}' if isinstance(own, BertWordPieceVocabulary)
           else 'register the task with a BertWordPieceVocabulary')
    raise DataError(f'seqio task {name} was registered with the vocabulary {what}, but the '
                    'trainer tokenises its documents with config.data.vocab_path '
                    f'({vocab_path or "bert-base-uncased"}). Fix: {fix}.')


def task_for_config(data_config) -> str:
  """The task name for `config.data`, registering the text-files task from its globs."""
  if data_config.task == TEXT_FILES_TASK:
    register_text_files_task(TEXT_FILES_TASK, data_config.text_files,
                             vocab_path=data_config.vocab_path,
                             validation_patterns=data_config.get('validation_files', ''))
  return data_config.task


_register(EMBEDDED_TASK, seqio.FunctionDataSource(sources.embedded_dataset,
                                                  splits=sources.SPLITS))
for _name, (_tfds_name, _splits) in sources.TFDS_SOURCES.items():
  _register(_name, seqio.TfdsDataSource(tfds_name=_tfds_name, splits=_splits))

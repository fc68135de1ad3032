"""seqio tasks for BERT MLM pre-training; `import bert_sym.tasks` registers them.

  bert_sym_mlm_embedded    gensim's shortened English Wikipedia dump (no download)
  bert_sym_mlm_wikipedia   TFDS wikipedia/20230601.en (train only upstream: 1% held out)
  bert_sym_mlm_c4          TFDS c4/en (its own validation split)
  bert_sym_mlm_text_files  built from globs by `register_text_files_task`

Every task has 'train' and 'validation' splits and yields the five MLM features of
`bert_sym.data.FEATURES` at `sequence_length['input_ids']`:

  seqio.get_mixture_or_task('bert_sym_mlm_embedded').get_dataset(
      sequence_length={'input_ids': 128}, split='validation', shuffle=False)

Masking inside a task uses the mask seed given at registration (default 0) and the
block's position in the packed stream; the trainer's iterator (`bert_sym.data`) instead
takes packed blocks from `packed_blocks` and masks them with its own seed.
"""

from __future__ import annotations

import functools

import seqio
import tensorflow as tf

from bert_sym import corpus
from bert_sym import data as data_lib
from bert_sym import preprocessors
from bert_sym import vocab as vocab_lib

WIKIPEDIA_TFDS = 'wikipedia/20230601.en:1.0.0'
C4_TFDS = 'c4/en:3.1.0'
EMBEDDED_TASK = 'bert_sym_mlm_embedded'
TEXT_FILES_TASK = 'bert_sym_mlm_text_files'
# Text files: document i (in sorted-file order) is held out iff i % HOLDOUT_EVERY == 0.
HOLDOUT_EVERY = 100


def _register(name: str, source: seqio.DataSource, vocab_path: str = '', *,
              mask_seed: int = 0, mask_rate: float = 0.15, whole_word: bool = False,
              max_predictions: int | None = None) -> seqio.Task:
  if name in seqio.TaskRegistry.names():
    seqio.TaskRegistry.remove(name)  # re-registration (e.g. new globs) replaces the task
  return seqio.TaskRegistry.add(
      name,
      source=source,
      preprocessors=[
          preprocessors.tokenize_and_pack,
          functools.partial(preprocessors.mask_for_mlm, seed=mask_seed, mask_rate=mask_rate,
                            whole_word=whole_word, max_predictions=max_predictions),
      ],
      output_features=preprocessors.output_features(vocab_lib.get_vocabulary(vocab_path)),
  )


def packed_blocks(task_name: str, split: str, max_seq_len: int,
                  vocabulary: vocab_lib.BertWordPieceVocabulary | None = None
                  ) -> tf.data.Dataset:
  """The task's documents, tokenised and packed, unmasked, in source order (no shuffle)."""
  task = seqio.get_mixture_or_task(task_name)
  if split not in task.splits:
    raise ValueError(f'task {task_name} has no split {split!r}; it has {task.splits}')
  vocabulary = vocabulary or task.output_features['input_ids'].vocabulary
  documents = task.source.get_dataset(split=split, shuffle=False)
  stream = preprocessors.tokenize_documents(documents, vocabulary)
  return preprocessors.pack_blocks(stream, max_seq_len, vocabulary.special)


# ----------------------------------------------------------------------------------------
# Embedded corpus.
# ----------------------------------------------------------------------------------------

def _embedded_dataset(split: str, shuffle_files: bool, seed: int | None = None):
  del shuffle_files, seed  # a handful of articles: order is fixed, blocks are shuffled later
  return tf.data.Dataset.from_tensor_slices({'text': corpus.embedded_documents(split)})


# ----------------------------------------------------------------------------------------
# Text files (local or gs://): one document per line, or blank-line separated documents.
# ----------------------------------------------------------------------------------------

def expand_patterns(patterns: str | list[str]) -> list[str]:
  """Sorted files matching comma-separated globs; a pattern matching nothing is an error."""
  if isinstance(patterns, str):
    patterns = patterns.split(',')
  patterns = [p.strip() for p in patterns if p.strip()]
  if not patterns:
    raise data_lib.DataError('no text file pattern given (config.data.text_files is empty)')
  files = []
  for pattern in patterns:
    matches = sorted(tf.io.gfile.glob(pattern))
    if not matches:
      raise data_lib.DataError(f'{pattern}: no such file (the pattern matches nothing)')
    files.extend(m for m in matches if not tf.io.gfile.isdir(m))
  if sum(tf.io.gfile.stat(f).length for f in files) == 0:
    raise data_lib.DataError(f'{", ".join(files)}: empty corpus (all files are empty)')
  return files


def _documents_of_file(path: tf.Tensor) -> tf.data.Dataset:
  content = tf.io.read_file(path)
  valid = tf.strings.length(
      tf.strings.unicode_transcode(content, 'UTF-8', 'UTF-8', errors='ignore')
  ) == tf.strings.length(content)
  check = tf.debugging.Assert(valid, [path, 'is not valid UTF-8 text'])
  with tf.control_dependencies([check]):
    content = tf.strings.regex_replace(content, '\r\n?', '\n')
  # A file with a blank line holds blank-line separated documents, else one per line.
  has_blank_line = tf.strings.regex_full_match(content, r'(?s).*\n[ \t]*\n.*')
  separated = tf.strings.regex_replace(content, r'\n[ \t]*\n\s*', '\x1e')
  documents = tf.cond(has_blank_line,
                      lambda: tf.strings.split(separated, '\x1e'),
                      lambda: tf.strings.split(content, '\n'))
  documents = tf.boolean_mask(documents, ~tf.strings.regex_full_match(documents, r'\s*'))
  return tf.data.Dataset.from_tensor_slices(documents)


def _text_files_dataset(split: str, shuffle_files: bool, seed: int | None = None, *,
                        patterns: list[str], holdout_every: int,
                        validation_patterns: list[str] | None = None):
  del shuffle_files, seed  # file order defines the held-out documents
  held_out = split == 'validation'
  if validation_patterns:   # separate validation files: each split reads its files whole
    files = expand_patterns(validation_patterns if held_out else patterns)
    documents = tf.data.Dataset.from_tensor_slices(files).flat_map(_documents_of_file)
    return documents.map(lambda text: {'text': text})
  files = expand_patterns(patterns)
  documents = tf.data.Dataset.from_tensor_slices(files).flat_map(_documents_of_file)
  documents = documents.enumerate().filter(
      lambda i, _: tf.equal(i % holdout_every == 0, held_out))
  return documents.map(lambda _, text: {'text': text})


def _pattern_list(patterns: str | list[str]) -> list[str]:
  return patterns.split(',') if isinstance(patterns, str) else list(patterns)


def register_text_files_task(name: str, patterns: str | list[str], *, vocab_path: str = '',
                             holdout_every: int = HOLDOUT_EVERY,
                             validation_patterns: str | list[str] = '', **mask_kwargs
                             ) -> seqio.Task:
  """Registers (or replaces) an MLM task over text files matching `patterns`.

  Args:
    name: the seqio task name.
    patterns: globs, local or gs://, as a list or comma-separated string.
    vocab_path: vocab.txt for the task's output features ('' = bert-base-uncased).
    holdout_every: every N-th document (0, N, 2N, ...) goes to 'validation', unless
      `validation_patterns` names the validation files (e.g. WikiText's wiki.valid.tokens).
    validation_patterns: globs of the validation split ('' = hold out from `patterns`).
    **mask_kwargs: mask_seed, mask_rate, whole_word, max_predictions for get_dataset.
  """
  patterns = _pattern_list(patterns)
  validation_patterns = [p for p in _pattern_list(validation_patterns) if p.strip()]
  expand_patterns(patterns)  # a bad glob fails here, at configuration time
  if validation_patterns:
    expand_patterns(validation_patterns)
  source = seqio.FunctionDataSource(
      functools.partial(_text_files_dataset, patterns=patterns, holdout_every=holdout_every,
                        validation_patterns=validation_patterns),
      splits=('train', 'validation'))
  return _register(name, source, vocab_path, **mask_kwargs)


def task_for_config(data_config) -> str:
  """The task name for `config.data`, registering the text-files task from its globs."""
  if data_config.task == TEXT_FILES_TASK:
    register_text_files_task(TEXT_FILES_TASK, data_config.text_files,
                             vocab_path=data_config.vocab_path,
                             validation_patterns=data_config.get('validation_files', ''))
  return data_config.task


# ----------------------------------------------------------------------------------------
# Registration.
# ----------------------------------------------------------------------------------------

_register(EMBEDDED_TASK, seqio.FunctionDataSource(_embedded_dataset,
                                                  splits=corpus.SPLITS))
_register('bert_sym_mlm_wikipedia', seqio.TfdsDataSource(
    tfds_name=WIKIPEDIA_TFDS, splits={'train': 'train[1%:]', 'validation': 'train[:1%]'}))
_register('bert_sym_mlm_c4', seqio.TfdsDataSource(
    tfds_name=C4_TFDS, splits={'train': 'train', 'validation': 'validation'}))

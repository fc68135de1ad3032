"""GLUE data: task specs, readers (TFDS `glue/*` or a local GLUE directory), tokenisation.

Both sources give the same `Examples`, with TFDS's label ids (e.g. MNLI: entailment=0,
neutral=1, contradiction=2; STS-B a float score in [0, 5]). Local TSVs, in the GLUE
download-script layout, are read with plain tab splitting: their quoting is irregular
(SST-2 and QQP sentences contain bare quotes), so `csv` quoting rules would merge rows.
Pairs are packed BERT style, `[CLS] a [SEP] b [SEP]`, with the pre-training `WordPiece`
(so GLUE text is split exactly as the model saw text in pre-training). This module knows
nothing about models or meshes.
"""

import dataclasses
import logging
import math
from pathlib import Path
import socket

import numpy as np

from bert_sym.input import import_tensorflow
from bert_sym.input.tokenizer import WordPiece  # the pre-training tokeniser (TF Text)


@dataclasses.dataclass(frozen=True)
class DevSet:
  score_name: str     # key in the results (glue_metrics.FULL_SCORES)
  tsv_file: str       # file name in the GLUE directory
  tfds_split: str


@dataclasses.dataclass(frozen=True)
class TaskSpec:
  name: str                          # TFDS config name: glue/<name>
  directory: str                     # folder in the GLUE download-script layout
  tfds_text_keys: tuple[str, ...]    # one (single sentence) or two (pair) feature names
  tsv_text_columns: tuple[str, ...]  # header names of the same fields in train/dev TSVs
  tsv_label_column: str
  label_names: tuple[str, ...] | None  # None: regression (STS-B)
  dev_sets: tuple[DevSet, ...]
  # Files without a header row give the column index of each field instead.
  tsv_no_header_columns: dict[str, int] | None = None

  @property
  def is_regression(self) -> bool:
    return self.label_names is None

  @property
  def num_labels(self) -> int:
    return 1 if self.is_regression else len(self.label_names)


def _dev(name, tsv='dev.tsv', split='validation'):
  return (DevSet(name, tsv, split),)


TASKS: dict[str, TaskSpec] = {t.name: t for t in (
    TaskSpec('cola', 'CoLA', ('sentence',), ('sentence',), 'label',
             ('unacceptable', 'acceptable'), _dev('cola'),
             tsv_no_header_columns={'label': 1, 'sentence': 3}),
    TaskSpec('sst2', 'SST-2', ('sentence',), ('sentence',), 'label',
             ('negative', 'positive'), _dev('sst2')),
    TaskSpec('mrpc', 'MRPC', ('sentence1', 'sentence2'), ('#1 String', '#2 String'), 'Quality',
             ('not_equivalent', 'equivalent'), _dev('mrpc')),
    TaskSpec('stsb', 'STS-B', ('sentence1', 'sentence2'), ('sentence1', 'sentence2'), 'score',
             None, _dev('stsb')),
    TaskSpec('qqp', 'QQP', ('question1', 'question2'), ('question1', 'question2'),
             'is_duplicate', ('not_duplicate', 'duplicate'), _dev('qqp')),
    TaskSpec('mnli', 'MNLI', ('premise', 'hypothesis'), ('sentence1', 'sentence2'),
             'gold_label', ('entailment', 'neutral', 'contradiction'),
             (DevSet('mnli_m', 'dev_matched.tsv', 'validation_matched'),
              DevSet('mnli_mm', 'dev_mismatched.tsv', 'validation_mismatched'))),
    TaskSpec('qnli', 'QNLI', ('question', 'sentence'), ('question', 'sentence'), 'label',
             ('entailment', 'not_entailment'), _dev('qnli')),
    TaskSpec('rte', 'RTE', ('sentence1', 'sentence2'), ('sentence1', 'sentence2'), 'label',
             ('entailment', 'not_entailment'), _dev('rte')),
    TaskSpec('wnli', 'WNLI', ('sentence1', 'sentence2'), ('sentence1', 'sentence2'), 'label',
             ('not_entailment', 'entailment'), _dev('wnli')),
)}


def parse_tasks(tasks) -> list[TaskSpec]:
  """'cola,sst2' or a sequence of names -> specs; unknown names are an error."""
  names = [t.strip().lower() for t in (tasks.split(',') if isinstance(tasks, str) else tasks)]
  names = [n for n in names if n]
  unknown = [n for n in names if n not in TASKS]
  if unknown:
    raise ValueError(f'Unknown GLUE task(s) {unknown}. Valid names (as in TFDS glue/*): '
                     f'{", ".join(TASKS)}.')
  if not names:
    raise ValueError(f'No GLUE task given. Valid names: {", ".join(TASKS)}.')
  return [TASKS[n] for n in dict.fromkeys(names)]


@dataclasses.dataclass
class Examples:
  idx: np.ndarray                 # int64: row number in the file / TFDS `idx`
  texts: tuple[list[str], ...]    # one list per text field
  labels: np.ndarray              # int32 class ids, or float32 scores (STS-B)

  def __len__(self):
    return len(self.idx)

  def head(self, n: int) -> 'Examples':
    """The first n examples (n <= 0: all): deterministic slices for tests and smoke runs."""
    if n <= 0 or n >= len(self):
      return self
    return Examples(self.idx[:n], tuple(t[:n] for t in self.texts), self.labels[:n])


class GlueDataError(ValueError):
  """A GLUE file or directory is missing or not in the expected format."""


def _parse_label(spec: TaskSpec, value: str, where: str):
  value = value.strip()
  if spec.is_regression:
    try:
      score = float(value)
    except ValueError:
      score = math.nan
    if not math.isfinite(score):   # 'nan' parsed: training stopped later on a NaN loss
      raise GlueDataError(f'{where}: STS-B score {value!r} is not a number.')
    # A corrupted row (50 for 5.0) trained a regression onto a scale ten times too wide,
    # with no error: STS-B's scores are similarities from 0 to 5.
    if not 0.0 <= score <= 5.0:
      raise GlueDataError(f'{where}: STS-B score {value!r} is outside 0..5, the range of '
                          'its similarity scores. Fix the row or download the file again.')
    return score
  if value in spec.label_names:
    return spec.label_names.index(value)
  # ASCII digits only: str.isdigit() also takes '²', which int() refuses (no file named).
  if value.isascii() and value.isdigit() and int(value) < spec.num_labels:
    return int(value)
  raise GlueDataError(f'{where}: label {value!r} is not one of {spec.label_names} '
                      f'or 0..{spec.num_labels - 1}.')


def tsv_path(glue_dir, spec: TaskSpec, file_name: str) -> Path:
  task_dir = Path(glue_dir) / spec.directory
  if not Path(glue_dir).is_dir():
    raise GlueDataError(f'--glue_dir {glue_dir} is not a directory. Point it at the output '
                        'of the GLUE download script (CoLA/, SST-2/, MRPC/, ...) or leave it '
                        'empty to read TFDS glue/*.')
  if not task_dir.is_dir():
    dev_file = spec.dev_sets[0].tsv_file
    # No task folder at all: --glue_dir is one level off, not a task to drop.
    level = ('' if any(Path(glue_dir, t.directory).is_dir() for t in TASKS.values()) else
             f' It holds no GLUE task folder: point --glue_dir at the one that holds '
             f'{spec.directory}/ (the GLUE download script\'s output).')
    raise GlueDataError(f'No directory {task_dir} for task {spec.name}: the GLUE layout has '
                        f'{spec.directory}/train.tsv and {spec.directory}/{dev_file}. '
                        f'Drop {spec.name} from --tasks or add the files.{level}')
  path = task_dir / file_name
  if not path.is_file():
    raise GlueDataError(f'Missing {path} (task {spec.name}). Expected files: train.tsv, '
                        f'{", ".join(d.tsv_file for d in spec.dev_sets)}. Fix: drop '
                        f'{spec.name} from --tasks or add the file.')
  return path


def check_tsv(path, spec: TaskSpec) -> None:
  """`read_tsv`'s checks on every row (encoding, layout, each label), the texts dropped: in
  seconds for every task before any trains (MNLI's 393k rows in ~5 s), not when the task's
  turn comes hours later. The first rows alone passed a bad label or byte further down."""
  read_tsv(path, spec, warn=False)   # the load that trains on it says what it skipped


def read_tsv(path, spec: TaskSpec, *, warn: bool = True) -> Examples:
  """One labelled GLUE TSV (train or dev) in the download-script layout."""
  path = Path(path)
  numbered = _numbered_lines(path, spec)
  columns, rows = _columns_and_rows(path, spec, numbered)
  text_columns = [columns[c] for c in spec.tsv_text_columns]
  label_column = columns[spec.tsv_label_column]
  needed = max(columns.values()) + 1
  idx, texts, labels, skipped = [], tuple([] for _ in text_columns), [], 0
  line_numbers = []
  for row_number, (line_number, line) in enumerate(rows):
    fields = line.split('\t')
    if len(fields) < needed or fields[label_column].strip() in ('', '-'):
      skipped += 1   # QQP's malformed rows; NLI rows without a gold label ('-')
      continue
    idx.append(row_number)
    line_numbers.append(line_number)
    for out, column in zip(texts, text_columns):
      out.append(fields[column])
    labels.append(_parse_label(spec, fields[label_column], f'{path}:{line_number}'))
  if skipped and warn:
    logging.warning('%s: skipped %d of %d rows with fewer than %d columns or no label.',
                    path, skipped, len(rows), needed)
  if warn:
    _warn_empty_texts(texts, spec.tsv_text_columns, path, 'line', line_numbers)
  if not idx:
    raise GlueDataError(f'{path}: none of its {len(rows)} rows has the {needed} columns '
                        f'{spec.name} needs.')
  dtype = np.float32 if spec.is_regression else np.int32
  return Examples(np.asarray(idx, np.int64), texts, np.asarray(labels, dtype))


def _warn_empty_texts(texts, names, where, unit: str, positions) -> None:
  """A warning per text field that is empty (or blank) in some examples, with their count
  and the first one's `unit` ('line', 'idx') from `positions`. They are kept, not refused
  (a real file may hold a few, e.g. a question left empty): each packs as nothing between
  its [CLS]/[SEP] marks, trained on and scored as it is, which went unsaid before."""
  for name, column in zip(names, texts):
    empty = [i for i, text in enumerate(column) if not text.strip()]
    if empty:
      logging.warning('%s: %d of %d examples have an empty %s (the first at %s %d): each '
                      'is packed with no tokens for it and kept as it is (trained on, or '
                      'scored in a dev set).', where, len(empty), len(column), name, unit,
                      positions[empty[0]])


def _numbered_lines(path: Path, spec: TaskSpec) -> list[tuple[int, str]]:
  """(line number in the file, line) of every non-blank line."""
  # utf-8-sig drops MRPC's byte-order mark; splitting on '\n' only (not universal newlines)
  # keeps a stray '\r' inside a sentence from cutting a row in two.
  try:
    with open(path, encoding='utf-8-sig', newline='') as f:
      text = f.read()
  except UnicodeDecodeError as e:
    line = e.object[:e.start].count(b'\n') + 1
    raise GlueDataError(f'{path}:{line}: not UTF-8 ({e.reason} at byte {e.start}); GLUE TSVs '
                        'are UTF-8. Re-encode the file (e.g. iconv -f latin1 -t utf-8).') from None
  numbered = [(n, line.rstrip('\r')) for n, line in enumerate(text.split('\n'), 1)]
  # Blank lines are dropped (as csv.DictReader, and so TFDS's idx, does); errors still
  # name the line number in the file.
  numbered = [(n, line) for n, line in numbered if line.strip()]
  if not numbered:
    raise GlueDataError(f'{path} is empty; expected a {spec.name} TSV with a label column.')
  return numbered


def _columns_and_rows(path: Path, spec: TaskSpec, numbered):
  """({field: column index}, the example rows): from the header, or CoLA's fixed layout."""
  first = numbered[0][1]
  if spec.tsv_no_header_columns is not None:
    columns = spec.tsv_no_header_columns
    fields = first.split('\t')
    if len(fields) <= max(columns.values()) or not fields[columns['label']].strip().isdigit():
      raise GlueDataError(f'{path}: expected {spec.name} rows without a header, columns '
                          f'(source, label, original-label, sentence); the first row is '
                          f'{fields[:4]}.')
    return columns, numbered
  header = [h.strip() for h in first.split('\t')]
  wanted = spec.tsv_text_columns + (spec.tsv_label_column,)
  missing = [c for c in wanted if c not in header]
  if missing:
    raise GlueDataError(f'{path}: header has columns {header}, but {spec.name} needs '
                        f'{list(wanted)} (missing {missing}). Is this the right file, '
                        'with labels (test.tsv has none)?')
  if len(numbered) == 1:
    raise GlueDataError(f'{path} has a header but no examples.')
  # MNLI's gold_label is the last column, after a varying number of annotator labels:
  # look every column up by name, never by position.
  return {c: header.index(c) for c in wanted}, numbered[1:]


# Where TFDS downloads glue/* from. Probed before `tfds.load` when the task is not prepared,
# so that an offline machine fails in seconds instead of minutes of TFDS's retries. None
# skips the probe (tests on TFDS's mock data).
TFDS_DOWNLOAD_HOST: tuple[str, int] | None = ('dl.fbaipublicfiles.com', 443)
_PROBE_TIMEOUT_S = 5.0


def check_tfds_can_load(spec: TaskSpec, data_dir: str | None = None) -> None:
  """Raises GlueDataError when glue/<task> is neither prepared in `data_dir` nor
  downloadable (its host unreachable)."""
  import_tensorflow()   # first, so that TF (under TFDS) leaves the GPUs to JAX
  import tensorflow_datasets as tfds   # pylint: disable=g-import-not-at-top
  builder = tfds.builder(f'glue/{spec.name}', data_dir=data_dir or None)
  if TFDS_DOWNLOAD_HOST is None or builder.is_prepared():
    return
  try:
    socket.create_connection(TFDS_DOWNLOAD_HOST, timeout=_PROBE_TIMEOUT_S).close()
  except OSError as e:
    host, port = TFDS_DOWNLOAD_HOST
    raise GlueDataError(
        f'TFDS glue/{spec.name} is not prepared in {builder.data_dir} and its download host '
        f'{host}:{port} is unreachable ({e}). Fix: prepare it where there is internet (tfds '
        'build glue --data_dir=DIR) and pass --config.tfds_data_dir=DIR, or use a local copy '
        'in the GLUE download-script layout with --glue_dir=DIR.') from None


def load_tfds(spec: TaskSpec, split: str, data_dir: str | None = None) -> Examples:
  """`tfds.load(f'glue/{name}', split=split)` as Examples (downloads when not prepared)."""
  check_tfds_can_load(spec, data_dir)
  import tensorflow_datasets as tfds   # pylint: disable=g-import-not-at-top
  dataset = tfds.load(f'glue/{spec.name}', split=split, data_dir=data_dir or None,
                      shuffle_files=False)
  idx, texts, labels = [], tuple([] for _ in spec.tfds_text_keys), []
  for example in tfds.as_numpy(dataset):
    idx.append(int(example['idx']))
    for out, key in zip(texts, spec.tfds_text_keys):
      out.append(example[key].decode('utf-8'))
    labels.append(example['label'])
  _warn_empty_texts(texts, spec.tfds_text_keys, f'TFDS glue/{spec.name} {split}', 'idx', idx)
  dtype = np.float32 if spec.is_regression else np.int32
  return Examples(np.asarray(idx, np.int64), texts, np.asarray(labels, dtype))


def load_split(spec: TaskSpec, split: str, *, glue_dir: str = '',
               tfds_data_dir: str = '') -> Examples:
  """split: 'train' or a dev score name (e.g. 'mnli_mm'); local TSVs when glue_dir is set."""
  if split == 'train':
    tsv_file, tfds_split = 'train.tsv', 'train'
  else:
    dev = {d.score_name: d for d in spec.dev_sets}[split]
    tsv_file, tfds_split = dev.tsv_file, dev.tfds_split
  if glue_dir:
    return read_tsv(tsv_path(glue_dir, spec, tsv_file), spec)
  return load_tfds(spec, tfds_split, tfds_data_dir)


def truncate_longest_first(len_a: int, len_b: int, budget: int,
                           rule: str = 'hf') -> tuple[int, int]:
  """'hf': Hugging Face's truncation='longest_first' (the paper's GLUE runs used its
  tokenizers): the longer side is cut to what the shorter leaves; where both must be cut,
  each keeps half and the longer (on a tie, the second) the odd token. 'bert': Google
  BERT's _truncate_seq_pair, one token at a time from the longer (ties: the second), which
  gives that token to the first: 8 + 10 in 9 is 4 + 5 by 'hf', 5 + 4 by 'bert'."""
  if len_a + len_b <= budget:
    return len_a, len_b
  shorter = min(len_a, len_b, budget // 2)
  longer = budget - shorter
  if rule == 'bert' and min(len_a, len_b) > budget // 2 and budget % 2:   # both cut, odd
    return longer, shorter
  return (longer, shorter) if len_a > len_b else (shorter, longer)


@dataclasses.dataclass
class Encoded:
  """Packed, unpadded sequences of one split (padding happens per batch)."""
  input_ids: list[np.ndarray]
  token_type_ids: list[np.ndarray]
  labels: np.ndarray
  idx: np.ndarray

  def __len__(self):
    return len(self.input_ids)

  @property
  def lengths(self) -> np.ndarray:
    return np.fromiter((len(x) for x in self.input_ids), np.int64, len(self.input_ids))


def encode_examples(examples: Examples, tokenizer: WordPiece, max_seq_len: int,
                    pair_truncation: str = 'hf') -> Encoded:
  if max_seq_len < 4:
    raise ValueError(f'max_seq_len={max_seq_len} leaves no room for [CLS] a [SEP] b [SEP].')
  pieces = [tokenizer.encode(t) for t in examples.texts]
  cls, sep = np.int32(tokenizer.cls_id), np.int32(tokenizer.sep_id)
  input_ids, token_types = [], []
  for i in range(len(examples)):
    a = pieces[0][i]
    if len(pieces) == 1:
      a = a[:max_seq_len - 2]
      ids = np.concatenate([[cls], a, [sep]]).astype(np.int32)
      types = np.zeros(len(ids), np.int32)
    else:
      b = pieces[1][i]
      len_a, len_b = truncate_longest_first(len(a), len(b), max_seq_len - 3, pair_truncation)
      ids = np.concatenate([[cls], a[:len_a], [sep], b[:len_b], [sep]]).astype(np.int32)
      types = np.concatenate([np.zeros(len_a + 2, np.int32), np.ones(len_b + 1, np.int32)])
    input_ids.append(ids)
    token_types.append(types)
  return Encoded(input_ids, token_types, examples.labels, examples.idx)


def bucket_length(longest: int, max_seq_len: int, min_length: int = 16) -> int:
  """Pad a batch to the next power of two (>= min_length, <= max_seq_len).

  A handful of shapes keeps jit recompilation bounded while short-sentence tasks (SST-2,
  CoLA) avoid computing on 128 - 15 padding tokens; padded keys get exactly zero attention,
  so results do not depend on the padded length.
  """
  length = min_length
  while length < longest:
    length *= 2
  return min(length, max_seq_len)


def pad_batch(encoded: Encoded, indices: np.ndarray, batch_size: int, max_seq_len: int,
              pad_id: int, bucket: bool = True) -> dict[str, np.ndarray]:
  """Rows `indices` as a [batch_size, length] batch; missing rows get weight 0."""
  longest = max((len(encoded.input_ids[i]) for i in indices), default=1)
  length = bucket_length(longest, max_seq_len) if bucket else max_seq_len
  ids = np.full((batch_size, length), pad_id, np.int32)
  types = np.zeros((batch_size, length), np.int32)
  mask = np.zeros((batch_size, length), np.int32)
  labels = np.zeros((batch_size,), encoded.labels.dtype)
  weights = np.zeros((batch_size,), np.float32)
  for row, i in enumerate(indices):
    n = len(encoded.input_ids[i])
    ids[row, :n] = encoded.input_ids[i]
    types[row, :n] = encoded.token_type_ids[i]
    mask[row, :n] = 1
    labels[row] = encoded.labels[i]
    weights[row] = 1.0
  return {'input_ids': ids, 'token_type_ids': types, 'attention_mask': mask,
          'labels': labels, 'weights': weights}

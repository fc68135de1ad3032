"""Documents: the embedded corpus (`embedded`) and text files as tf.data sources; the TFDS
corpora.

Every reader yields {'text': document} in a fixed order (the held-out split is part of
the source, so it never moves). Text files are read with tf.io.gfile (local or gs://);
the TFDS corpora (`TFDS_SOURCES`) are read by seqio's TfdsDataSource (`seqio_tasks`).
"""

from __future__ import annotations

import codecs
import concurrent.futures
import functools
import hashlib
import os

from absl import logging

from bert_sym.input import DataError, gfile_error_text, import_tensorflow
from bert_sym.input.embedded import (  # noqa: F401  (re-exported: one place to import from)
    EMBEDDED_DUMP, SPLITS, VALIDATION_EVERY, embedded_articles, embedded_dataset,
    embedded_documents, is_validation_title, wiki_to_text)

EMBEDDED_TASK = 'bert_sym_mlm_embedded'
TEXT_FILES_TASK = 'bert_sym_mlm_text_files'
# Text files: document i (in sorted-file order) is held out iff i % HOLDOUT_EVERY == 0.
HOLDOUT_EVERY = 100
# TFDS corpora (read through seqio.TfdsDataSource by the seqio tasks): name, splits.
TFDS_SOURCES = {
    'bert_sym_mlm_wikipedia': ('wikipedia/20230601.en:1.0.0',   # train only upstream
                               {'train': 'train[1%:]', 'validation': 'train[:1%]'}),
    'bert_sym_mlm_c4': ('c4/en:3.1.0', {'train': 'train', 'validation': 'validation'}),
}


def _pattern_list(patterns: str | list[str]) -> list[str]:
  if isinstance(patterns, str):
    patterns = patterns.split(',')
  return [p.strip() for p in patterns if p.strip()]


def absolute_patterns(patterns: str | list[str]) -> list[str]:
  """Comma-separated globs made absolute (URLs as they are): two spellings of the same
  files then compare equal, and a recorded pattern means the same from any directory."""
  return [p if '://' in p else os.path.abspath(os.path.expanduser(p))
          for p in _pattern_list(patterns)]


def check_exported_files(metadata: dict, data_config, where: str) -> None:
  """Shards of the text-files task record the files they were exported from. The task name
  is the same for every such corpus, so a config naming other files would otherwise train
  on a corpus it does not name, without a word. An export that recorded relative patterns
  (older versions) cannot be resolved and is not checked; nor is a config naming none."""
  if (data_config is None or data_config.task != TEXT_FILES_TASK
      or not data_config.get('text_files', '')):
    return
  for key in ('text_files', 'validation_files'):
    recorded = _pattern_list(metadata.get(key, ''))
    if any('://' not in p and not os.path.isabs(p) for p in recorded):
      return
    configured = absolute_patterns(data_config.get(key, ''))
    if sorted(map(os.path.normpath, recorded)) != sorted(map(os.path.normpath, configured)):
      raise DataError(
          f'{where} was exported from --{key}={",".join(recorded)!r}, the config names '
          f'config.data.{key}={",".join(configured)!r}: these shards hold another corpus. '
          f'Fix: --config.data.shards_dir=<the shards exported from those files>, or '
          f'--config.data.{key}={",".join(recorded)!r} if these shards are the ones you '
          'mean.')


def _gfile(call, path: str):
  """`call(path)` through tf.io.gfile; a storage error (gs:// unreachable, no credentials
  or permission) is a DataError naming the path, not TF's traceback."""
  tf = import_tensorflow()
  try:
    return call(path)
  except tf.errors.UnimplementedError:   # s3://, hf://: no credentials would help
    raise DataError(f'{path}: tf.io.gfile, which reads text files, has no file system for '
                    f'{path.split("://")[0]}://. Fix: copy the files to a local path or '
                    'gs://.') from None
  except tf.errors.OpError as e:
    raise DataError(f'{path}: {gfile_error_text(e)}.') from None


# gs:// answers one stat per request, ~50 ms each: a corpus of thousands of files took
# minutes to list on every host and export worker, one file after another.
_STAT_THREADS = 32


def _stat_each(paths: list[str]) -> list:
  """tf.io.gfile.stat of each path, concurrently; the first error (in path order) raises."""
  tf = import_tensorflow()
  if len(paths) < 2:
    return [_gfile(tf.io.gfile.stat, p) for p in paths]
  with concurrent.futures.ThreadPoolExecutor(min(_STAT_THREADS, len(paths))) as pool:
    return list(pool.map(lambda p: _gfile(tf.io.gfile.stat, p), paths))


def _files_and_sizes(patterns: str | list[str]) -> list[tuple[str, int]]:
  """Sorted files matching comma-separated globs, each once, with their sizes in bytes; a
  pattern matching nothing is an error."""
  tf = import_tensorflow()
  patterns = _pattern_list(patterns)
  if not patterns:
    raise DataError('no text file pattern given (config.data.text_files is empty)')
  files, seen = [], set()
  for pattern in patterns:
    if '**' in pattern:   # tf.io.gfile.glob reads it as '*': one level, the rest left out
      raise DataError(
          f"{pattern}: '**' does not recurse here (tf.io.gfile.glob matches it as '*', one "
          'directory level), so files at other depths would be left out. Fix: one glob '
          "per level, comma-separated, e.g. '/data/*.txt,/data/*/*.txt'.")
    matches = sorted(_gfile(tf.io.gfile.glob, pattern))
    if not matches:
      raise DataError(f'{pattern}: no such file (the pattern matches nothing). Fix: correct '
                      'the path or glob (config.data.text_files / validation_files, or the '
                      "export's --text_files / --validation_files).")
    stats = _stat_each(matches)
    pattern_files = [(m, s.length) for m, s in zip(matches, stats) if not s.is_directory]
    if not pattern_files:   # else the corpus would be empty, and the pattern unnamed
      what = ('is a directory' if len(matches) == 1 else
              f'matches only directories ({", ".join(matches[:3])}'
              f'{", ..." if len(matches) > 3 else ""})')
      raise DataError(f'{pattern} {what}, not text files. Fix: a glob of the files, such '
                      f"as '{matches[0].rstrip('/')}/*.txt'.")
    # Globs that overlap (/data/*.txt,/data/wiki*.txt) name a file once: read twice, its
    # documents were trained on twice, and one copy could be held out for validation.
    files.extend(f for f in pattern_files if f[0] not in seen)
    seen.update(f for f, _ in pattern_files)
  if sum(size for _, size in files) == 0:
    raise DataError(f'{", ".join(f for f, _ in files)}: empty corpus (all files are empty)')
  return files


def expand_patterns(patterns: str | list[str]) -> list[str]:
  """Sorted files matching comma-separated globs, each once; a pattern matching nothing is
  an error."""
  return [f for f, _ in _files_and_sizes(patterns)]


def files_fingerprint(patterns: str | list[str]) -> str:
  """The files the globs match now, and their sizes, in a few words: an export rerun keeps
  the parts already there, which must not hold an older state of a growing corpus."""
  listed = _files_and_sizes(patterns)
  digest = hashlib.md5(''.join(f'{f}\0{n}\n' for f, n in listed).encode()).hexdigest()
  return f'{len(listed)} files, {sum(n for _, n in listed):,} bytes, md5 {digest[:12]}'


# Magic bytes of the compressed files a corpus comes in: the format and its command line.
_COMPRESSED = {b'\x1f\x8b': ('gzip', 'gunzip'), b'BZh': ('bzip2', 'bunzip2'),
               b'\xfd7zXZ\x00': ('xz', 'unxz'), b'\x28\xb5\x2f\xfd': ('zstd', 'unzstd')}
# Byte-order marks of the Unicode encodings that are not UTF-8 (Windows' 'Unicode': UTF-16).
_BOMS = {'UTF-32': (b'\xff\xfe\x00\x00', b'\x00\x00\xfe\xff'), 'UTF-16': (b'\xff\xfe', b'\xfe\xff')}
# Read in chunks: a file read whole (and its copies through the string ops) took ~7x its
# size in memory before its first document, so a multi-GB corpus file did not fit.
_READ_CHUNK = 1 << 20
_STRIP = ' \t\n\v\f\r'   # tf.strings.strip's (ASCII) whitespace
_RE2_SPACE = ' \t\n\f\r'   # RE2's \s: not \v


class _ReadFailed(Exception):
  """A file that cannot be read as text; its message is the reason (after the path)."""


def _lines(path: bytes):
  r"""The file's lines ('\r\n' and a lone '\r' end one too), checked to be UTF-8."""
  tf = import_tensorflow()
  decoder = codecs.getincrementaldecoder('utf-8')()
  try:
    with tf.io.gfile.GFile(path, 'rb') as f:
      chunk = f.read(_READ_CHUNK)
      # Compressed or UTF-16 text is not UTF-8 either, but latin-1 would make it valid garbage.
      reason = next((f'is {kind} text, not UTF-8. Fix: iconv -f {kind.lower()} -t utf-8 FILE > '
                     'FILE.utf8' for kind, marks in _BOMS.items() if chunk.startswith(marks)),
                    'is not valid UTF-8 text')
      for magic, (kind, tool) in _COMPRESSED.items():
        if chunk.startswith(magic):
          reason = (f'is {kind}-compressed, not text. Fix: decompress it ({tool} -k FILE) '
                    'and name the decompressed file')
      line, cr = [], False   # the pieces of the current line; a '\r' held back
      while chunk:
        try:
          text = '\r' * cr + decoder.decode(chunk)
        except UnicodeDecodeError:
          raise _ReadFailed(reason) from None
        chunk = f.read(_READ_CHUNK)
        cr = bool(chunk) and text.endswith('\r')   # perhaps the first half of a '\r\n'
        text = text[:len(text) - cr].replace('\r\n', '\n').replace('\r', '\n')
        *lines, last = text.split('\n')
        if lines:
          yield ''.join(line) + lines[0]
          yield from lines[1:]
          line = []
        line.append(last)
      try:
        decoder.decode(b'', final=True)
      except UnicodeDecodeError:
        raise _ReadFailed(reason) from None
      yield ''.join(line)
  except tf.errors.OpError as e:
    # No brackets, which end the assertion's fields (numpy_blocks).
    raise _ReadFailed(gfile_error_text(e).translate({ord('['): '(', ord(']'): ')'})) from None


def _stripped_lines(path: bytes):
  """The lines of the file's text stripped of leading and trailing whitespace."""
  held, pending = None, []   # the last line with text; the whitespace lines after it
  for line in _lines(path):
    if not line.strip(_STRIP):
      if held is not None and pending and pending[-1][0] == line:
        pending[-1][1] += 1   # run-length: a file can hold millions of blank lines
      elif held is not None:
        pending.append([line, 1])
      continue
    if held is None:
      held = line.lstrip(_STRIP)
    else:
      yield held
      for blank, count in pending:
        yield from (blank for _ in range(count))
      held, pending = line, []
  if held is not None:
    yield held.rstrip(_STRIP)


def _documents(path: bytes):
  """The documents of a text file (see `_documents_of_file`)."""
  # A file with a blank line between two lines of text holds blank-line separated documents,
  # else one per line. Stripped first: a blank line at the end (`echo >> file`) made a
  # file of one document per line a single document.
  if not any(not line.strip(' \t') for line in _stripped_lines(path)):
    yield from (line for line in _stripped_lines(path) if line.strip(_RE2_SPACE))
    return
  # '\n[ \t]*\n\s*' separates documents: a blank line, and the whitespace after it.
  def split(lines):   # '\x1e' (what separators were replaced by) in the text splits too
    return (d for d in '\n'.join(lines).split('\x1e') if d.strip(_RE2_SPACE))

  document, after_blank, lines, gaps = [], False, 0, 0
  for line in _stripped_lines(path):
    lines += 1
    if after_blank:
      line = line.lstrip(' \t\f')
      if not line:
        continue
      after_blank = False
    elif not line.strip(' \t'):
      yield from split(document)
      document, after_blank, gaps = [], True, gaps + 1
      continue
    document.append(line)
  yield from split(document)
  if lines > _LINES_PER_DOCUMENT_TO_WARN * (gaps + 1) and path not in _WARNED:
    _WARNED.add(path)   # once per file, not per read (each split and epoch reads it)
    logging.warning(
        '%s is read as documents separated by blank lines, but its %d blank-line gap(s) in %d '
        'lines make documents of %d lines on average. If it holds one document per line, '
        'remove the blank lines: a stray one makes a few huge documents, and one held out '
        'for validation (every 100th across the files, unless validation_files are named) '
        'can take a large share of the text.', os.fsdecode(path), gaps, lines,
        lines // (gaps + 1))


# Above this, blank lines look stray (BERT's sentence-per-line documents are far shorter;
# a book is not, and its warning is a false alarm).
_LINES_PER_DOCUMENT_TO_WARN = 200
_WARNED = set()


def _checked_documents(path: bytes):
  """Lists of the file's documents, each with b'' or (at the end of a file that failed) the
  reason. Lists of ~1 MiB: a call into Python per document took 5x the time of the read."""
  batch, size = [], 0
  try:
    for document in _documents(path):
      batch.append(document.encode('utf-8'))
      size += len(batch[-1])
      if size >= _READ_CHUNK:
        yield batch, b''
        batch, size = [], 0
  except _ReadFailed as e:
    yield batch, str(e).encode('utf-8')
    return
  yield batch, b''


def _documents_of_file(path):
  """The file's documents, read as a stream: memory bounded by its longest document."""
  tf = import_tensorflow()
  batches = tf.data.Dataset.from_generator(
      _checked_documents, args=(path,), output_signature=(
          tf.TensorSpec([None], tf.string), tf.TensorSpec((), tf.string)))

  def checked(documents, reason):
    # Raised in the generator, the error would reach the user as a Python traceback.
    check = tf.debugging.Assert(tf.equal(reason, ''), [path, reason])
    with tf.control_dependencies([check]):
      return tf.identity(documents)

  return batches.map(checked).unbatch()


def _text_files_dataset(split: str, shuffle_files: bool, seed: int | None = None, *,
                        patterns: list[str], holdout_every: int,
                        validation_patterns: list[str] | None = None):
  del shuffle_files, seed  # file order defines the held-out documents
  tf = import_tensorflow()
  held_out = split == 'validation'
  # Separate validation files: each split reads its files whole.
  files = expand_patterns(validation_patterns if held_out and validation_patterns else patterns)
  documents = tf.data.Dataset.from_tensor_slices(files).flat_map(_documents_of_file)
  if not validation_patterns:
    documents = documents.enumerate().filter(
        lambda i, _: tf.equal(i % holdout_every == 0, held_out)).map(lambda _, text: text)
  return documents.map(lambda text: {'text': text})


def text_files_dataset_fn(patterns: str | list[str], *, holdout_every: int = HOLDOUT_EVERY,
                          validation_patterns: str | list[str] = ''):
  """fn(split, shuffle_files, seed=None) -> the documents of text files, as {'text'}.

  Args:
    patterns: globs, local or gs://, as a list or comma-separated string.
    holdout_every: every N-th document (0, N, 2N, ...) goes to 'validation', unless
      `validation_patterns` names the validation files (e.g. WikiText's wiki.valid.tokens).
    validation_patterns: globs of the validation split ('' = hold out from `patterns`).
  The globs are checked here, so a bad one fails at configuration time.
  """
  patterns, validation_patterns = _pattern_list(patterns), _pattern_list(validation_patterns)
  train_files = expand_patterns(patterns)
  if validation_patterns:
    # A glob such as wiki.*.tokens also matches the validation file: the validation loss
    # would then be measured on text the model trained on.
    both = sorted(set(train_files) & set(expand_patterns(validation_patterns)))
    if both:
      raise DataError(
          f'{", ".join(both[:3])}{", ..." if len(both) > 3 else ""}: in both the training '
          f'files ({",".join(patterns)}) and the validation files '
          f'({",".join(validation_patterns)}). Fix: narrow the training glob (e.g. '
          "wiki.train.tokens, not wiki.*.tokens).")
  return functools.partial(_text_files_dataset, patterns=patterns, holdout_every=holdout_every,
                           validation_patterns=validation_patterns)


def config_documents(data_config, split: str):
  """The documents of `split` of config.data's task (embedded or text files), {'text'}."""
  if split not in SPLITS:
    raise DataError(f'task {data_config.task} has no split {split!r}; it has {SPLITS}')
  if data_config.task == EMBEDDED_TASK:
    return embedded_dataset(split)
  if data_config.task == TEXT_FILES_TASK:
    dataset_fn = text_files_dataset_fn(
        data_config.text_files, validation_patterns=data_config.get('validation_files', ''))
    return dataset_fn(split, shuffle_files=False)
  raise DataError(f"config.data.source='seqio' packs {EMBEDDED_TASK} or {TEXT_FILES_TASK} "
                  f'in memory, not {data_config.task!r}: export it (python -m '
                  'bert_sym.shards export) and read the shards instead.')

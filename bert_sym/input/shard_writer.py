"""Export: a corpus tokenised, packed and written as shards (TF needed here only).

A split is cut into `num_parts` deterministic parts (default: one per TFDS source file),
each written on its own as `part-PPPPP-KKKKK.npy` shards and recorded by `part-PPPPP.json`,
so the output never depends on how many workers converted it. Files are written under a
temporary name and renamed (object stores publish an object only once fully uploaded);
`metadata.json` is written by whichever worker finishes the last part (or by `finalize`).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from absl import logging
import numpy as np

from bert_sym.files import remove_leftover_temporaries, write_atomically
from bert_sym.input import DataError, check_max_seq_len, sources, tokenizer
from bert_sym.input import blocks
from bert_sym.input.shard_reader import METADATA_FILE, SHARD_FORMAT_VERSION, VOCAB_FILE
from bert_sym.input.shard_reader import exists, filesystem, join_url, read_bytes


def _write_json(url: str, value) -> None:
  write_atomically(url, lambda f: f.write(json.dumps(value, indent=1).encode()))


def part_manifest_name(part: int) -> str:
  return f'part-{part:05d}.json'


class PartWriter:
  """Writes one part's blocks as shards of `blocks_per_shard`, then its manifest.

  Memory: one shard buffer. Used by `export` and by tests writing synthetic corpora.
  """

  def __init__(self, split_url: str, part: int, num_parts: int, *, max_seq_len: int,
               dtype, pad_id: int, blocks_per_shard: int = 1 << 16):
    self.split_url, self.part, self.num_parts = split_url, part, num_parts
    self.max_seq_len, self.pad_id = max_seq_len, pad_id
    self._buffer = np.empty((blocks_per_shard, max_seq_len), dtype)
    self._filled = 0
    self.shards: list[dict[str, Any]] = []
    self.num_tokens = 0

  def add(self, blocks: np.ndarray) -> None:
    blocks = np.asarray(blocks).reshape(-1, self.max_seq_len)
    while len(blocks):
      n = min(len(blocks), len(self._buffer) - self._filled)
      self._buffer[self._filled:self._filled + n] = blocks[:n]
      self.num_tokens += int(np.count_nonzero(blocks[:n] != self.pad_id))
      self._filled += n
      blocks = blocks[n:]
      if self._filled == len(self._buffer):
        self._flush()

  def _flush(self) -> None:
    name = f'part-{self.part:05d}-{len(self.shards):05d}.npy'
    array = self._buffer[:self._filled]
    write_atomically(join_url(self.split_url, name),
                     lambda f: np.lib.format.write_array(f, array, version=(1, 0)))
    self.shards.append({'file': name, 'num_blocks': int(self._filled)})
    self._filled = 0

  def close(self, **info) -> dict[str, Any]:
    if self._filled:
      self._flush()
    manifest = dict(part=self.part, num_parts=self.num_parts, shards=self.shards,
                    num_blocks=sum(s['num_blocks'] for s in self.shards),
                    num_tokens=self.num_tokens, max_seq_len=self.max_seq_len,
                    dtype=self._buffer.dtype.name, **info)
    _write_json(join_url(self.split_url, part_manifest_name(self.part)), manifest)
    return manifest


# Written by a worker whose export raised, removed when it starts again: finalize on the
# other workers (the launcher waits there for all the parts) stops instead of waiting.
_FAILED_MARKER = 'worker-{}.failed'


def write_vocab(split_url: str, vocab_bytes: bytes) -> None:
  write_atomically(join_url(split_url, VOCAB_FILE), lambda f: f.write(vocab_bytes))


def finalize(out_dir: str, split: str, stalled_after_minutes: float = 0) -> dict[str, Any] | None:
  """Merges the part manifests into metadata.json; None while parts are missing.

  Idempotent and safe to run concurrently (every writer writes the same bytes).
  `stalled_after_minutes` > 0: parts missing and no file of the split newer than that is
  an error (a worker killed without a word leaves no failure marker; waiting for its parts
  would never end).
  """
  split_url = join_url(out_dir, split)
  fs, path = filesystem(split_url)
  fs.invalidate_cache(path)   # other workers wrote parts since this process listed it
  names = sorted(os.path.basename(p) for p in fs.glob(f'{path}/part-?????.json'))
  if not names:
    if not exists(join_url(split_url, VOCAB_FILE)):   # every worker's export writes it first
      raise DataError(f'{split_url}: nothing exported there. Fix: check --out_dir, or run '
                      '`python -m bert_sym.shards export` first.')
    return _check_progress(fs, path, split_url, [], None, stalled_after_minutes)
  manifests = [json.loads(read_bytes(join_url(split_url, n))) for n in names]
  first = manifests[0]
  for key in ('num_parts', 'max_seq_len', 'dtype', 'vocab_md5', 'task', 'split',
              'source_files'):
    # A part written before manifests recorded the files is not compared; the others are,
    # with the first that has them.
    compared = [m for m in manifests if key != 'source_files' or key in m]
    for m in compared:
      if m.get(key) != compared[0].get(key):
        raise DataError(f'{split_url}: part {m["part"]} has {key}={m.get(key)!r}, part '
                        f'{compared[0]["part"]} has {compared[0].get(key)!r}; the parts come '
                        'from different exports: remove the directory and re-export.')
  if len(manifests) < first['num_parts']:
    return _check_progress(fs, path, split_url, [m['part'] for m in manifests],
                           first['num_parts'], stalled_after_minutes)
  shards = [s for m in manifests for s in m['shards']]
  if not shards:
    held_out = ('; with text files and no --validation_files, every 100th document (the '
                'first included) is held out for validation, so a file of one document '
                'leaves training nothing' if first.get('text_files') and split == 'train'
                and not first.get('validation_files') else '')
    raise DataError(f'{split_url}: empty corpus: no part holds a token{held_out}. Fix: more '
                    f'text, then remove {split_url} (its empty parts count as exported) and '
                    'export again.')
  metadata = dict(
      format_version=SHARD_FORMAT_VERSION, task=first['task'], split=split,
      max_seq_len=first['max_seq_len'], num_blocks=sum(s['num_blocks'] for s in shards),
      num_tokens=sum(m['num_tokens'] for m in manifests), dtype=first['dtype'],
      shards=shards, vocab_md5=first['vocab_md5'], vocab_size=first['vocab_size'],
      special_ids=first['special_ids'], text_files=first.get('text_files', ''),
      validation_files=first.get('validation_files', ''),
      num_parts=first['num_parts'])
  _write_json(join_url(split_url, METADATA_FILE), metadata)
  return metadata


def _check_progress(fs, path, split_url, done, num_parts, stalled_after_minutes) -> None:
  """Parts are missing: None (wait) unless a worker's failure marker says they will not
  come, or no file of the split (a shard, a manifest, vocab.txt) is newer than
  `stalled_after_minutes` (a worker killed without a marker). Markers of a worker whose
  parts were all written after all (rerun with another --num_workers) do not count."""
  failed = sorted(fs.glob(f'{path}/{_FAILED_MARKER.format("*")}'))
  if failed:   # its parts will not come: waiting for them would never end
    name = os.path.basename(failed[0])
    more = f'; {len(failed) - 1} more worker(s) failed too' if len(failed) > 1 else ''
    raise DataError(
        f'{split_url}: the export of worker {int(name.split("-")[1].split(".")[0])} failed '
        f'({read_bytes(join_url(split_url, name)).decode()[:300]}){more}, so its parts will '
        'not come. Fix that, then rerun the export on that worker (the parts already '
        'exported are kept).')
  if stalled_after_minutes <= 0:
    return None
  try:
    newest = max(fs.modified(p).timestamp() for p in fs.glob(f'{path}/*'))
  except (NotImplementedError, ValueError):   # a filesystem without times: wait as before
    return None
  idle = (time.time() - newest) / 60
  if idle <= stalled_after_minutes:
    return None
  missing = sorted(set(range(num_parts or 0)) - set(done))
  what = (f'parts {", ".join(map(str, missing[:8]))}{" ..." if len(missing) > 8 else ""} '
          f'of {num_parts}' if missing else 'every part')
  raise DataError(
      f'{split_url}: {what} still missing, and nothing was written there for {idle:.0f} '
      f'minutes (--stalled_after_minutes={stalled_after_minutes:g}): the workers exporting '
      'them (part p: worker p mod the number of workers) stopped without a failure marker '
      '(killed? preempted?). Fix: rerun the export on those workers (the parts already '
      'exported are kept).')


def check_export_args(task: str, max_seq_len: int, num_workers: int, worker_index: int,
                      num_parts: int, blocks_per_shard: int, text_files: str,
                      validation_files: str = '') -> None:
  """The command line's values, checked before TF is imported or anything is written."""
  check_max_seq_len(max_seq_len)
  if num_workers < 1 or not 0 <= worker_index < num_workers:
    raise DataError(f'--worker_index={worker_index} is not in [0, --num_workers='
                    f'{num_workers}). Fix: --num_workers=N (>= 1) and --worker_index in '
                    '0..N-1.')
  if num_parts < 0 or blocks_per_shard < 1:
    raise DataError(f'--num_parts={num_parts} must be >= 0 (0 = one per source file) and '
                    f'--blocks_per_shard={blocks_per_shard} >= 1.')
  if task == sources.TEXT_FILES_TASK and not text_files:
    raise DataError(f"--task={task} needs --text_files='/data/*.txt' (comma-separated "
                    'globs, local or gs://).')
  if task != sources.TEXT_FILES_TASK and (text_files or validation_files):
    # They were ignored: another corpus exported in their place (the trainer refuses it).
    flag = '--text_files' if text_files else '--validation_files'
    raise DataError(f'{flag} is set but --task={task}, which does not read it. Fix: '
                    f'--task={sources.TEXT_FILES_TASK}, or drop {flag}.')
  known = (sources.EMBEDDED_TASK, sources.TEXT_FILES_TASK, *sources.TFDS_SOURCES)
  if task not in known:
    raise DataError(f'--task={task!r} is not a bert_sym corpus. Fix: --task= one of '
                    f'{", ".join(known)}.')


def check_splits(split_arg: str) -> list[str]:
  """--split as the splits to export or finalize, each checked now: a name no task has (a
  typo, a trailing comma) failed only once the splits before it were done, hours into an
  export of C4's train split."""
  splits = [s.strip() for s in split_arg.split(',')]
  unknown = [s for s in splits if s not in sources.SPLITS]
  if unknown:
    raise DataError(f'--split={split_arg} names {", ".join(map(repr, unknown))}, not a split '
                    f'(every task has {", ".join(sources.SPLITS)}). Fix: '
                    f'--split={",".join(sources.SPLITS)} (or one of them).')
  return list(dict.fromkeys(splits))


def default_num_parts(task_name: str, split: str) -> int:
  """One part per TFDS source file (a natural, fixed unit of work); 1 otherwise."""
  import seqio  # pylint: disable=import-outside-toplevel
  source = seqio.get_mixture_or_task(task_name).source
  if not isinstance(source, seqio.TfdsDataSource):
    return 1
  try:
    return len(source.list_shards(split))
  except Exception as e:  # pylint: disable=broad-except
    # e.g. KeyError "Trying to access splits['train'] but splits is empty": TFDS found no
    # prepared copy of the dataset in its data dir.
    name = source.tfds_dataset.name
    raise DataError(
        f'TFDS has no prepared {name} split {split!r} ({type(e).__name__}: '
        f'{" ".join(str(e).split())[:160]}). Fix: prepare it once where there is internet, '
        f'`tfds build {name.split(":")[0]} --data_dir=DIR` (or use a prepared copy), and '
        'pass --tfds_data_dir=DIR.') from None


def _check_existing_parts(split_url: str, wanted: dict, source_files: str = '',
                          read_files: str = '') -> None:
  """A rerun skips the parts already there, so they must be parts of this export: another
  length, vocabulary or corpus would be mixed in (and its vocab.txt overwritten)."""
  fs, path = filesystem(split_url)
  if not fs.exists(path):
    return
  names = sorted(os.path.basename(p) for p in fs.glob(f'{path}/part-?????.json'))
  if not names:
    return
  found = json.loads(read_bytes(join_url(split_url, names[0])))
  for key, value in wanted.items():
    if found.get(key, '') != value:
      raise DataError(
          f'{split_url} holds an export with {key}={found.get(key)!r}, not {value!r} as '
          'asked; a rerun keeps the parts already there, so the two would be mixed. Fix: '
          f'export to a new --out_dir, or remove {split_url} to export it again.')
  # (Parts written before manifests recorded the files are not checked.)
  if found.get('source_files', source_files) != source_files:
    raise DataError(
        f'{split_url} was exported from {found["source_files"]}; {read_files} now '
        f'matches {source_files}. A rerun keeps the parts already there, so the files '
        'added or changed since would be left out. Fix: export to a new --out_dir, or '
        f'remove {split_url} to export it again.')


def export(task: str, split: str, max_seq_len: int, out_dir: str, *, num_parts: int = 0,
           num_workers: int = 1, worker_index: int = 0, vocab_path: str = '',
           text_files: str = '', validation_files: str = '', tfds_data_dir: str = '',
           blocks_per_shard: int = 1 << 16) -> dict[str, Any] | None:
  """Converts this worker's parts of `task`/`split`; returns the metadata once complete.

  `validation_files`: for the text-files task, the files of its validation split, as
  config.data.validation_files ('' = every 100th document of `text_files` held out), so
  that the shards hold the same text the seqio route reads.
  """
  from bert_sym.input import seqio_tasks  # pylint: disable=import-outside-toplevel
  check_max_seq_len(max_seq_len)
  if not 0 <= worker_index < num_workers:
    raise DataError(f'--worker_index={worker_index} is not in [0, {num_workers})')
  split_url = join_url(out_dir, split)
  marker = join_url(split_url, _FAILED_MARKER.format(f'{worker_index:05d}'))
  fs, marker_path = filesystem(marker)
  if fs.exists(marker_path):
    fs.rm(marker_path)
  if tfds_data_dir:
    import seqio  # pylint: disable=import-outside-toplevel
    seqio.set_tfds_data_dir_override(tfds_data_dir)
  if task == sources.TEXT_FILES_TASK:
    seqio_tasks.register_text_files_task(task, text_files, vocab_path=vocab_path,
                                         validation_patterns=validation_files)
  vocabulary = seqio_tasks.get_vocabulary(vocab_path)
  num_parts = num_parts or default_num_parts(task, split)
  read = validation_files if split == 'validation' and validation_files else text_files
  source_files = sources.files_fingerprint(read) if task == sources.TEXT_FILES_TASK else ''
  _check_existing_parts(split_url, dict(
      task=task, split=split, max_seq_len=max_seq_len, num_parts=num_parts,
      vocab_md5=vocabulary.md5, text_files=text_files, validation_files=validation_files),
      source_files, read)
  # A failure before this point (files, TFDS, arguments, an export there of another kind)
  # is every worker's, given the same command, and leaves nothing behind; one from here on
  # leaves the marker.
  info = dict(task=task, split=split, vocab_md5=vocabulary.md5,
              vocab_size=vocabulary.vocab_size, special_ids=vocabulary.special.as_dict(),
              text_files=text_files, validation_files=validation_files,
              source_files=source_files)
  try:
    _write_parts(split_url, range(worker_index, num_parts, num_workers), num_parts,
                 vocabulary, info, max_seq_len, blocks_per_shard)
  except Exception as e:
    try:
      write_atomically(marker, f'{type(e).__name__}: {" ".join(str(e).split())}')
    except Exception:  # pylint: disable=broad-except
      pass   # out_dir itself fails (permissions, quota): the error below says so
    raise
  return finalize(out_dir, split)


def _write_parts(split_url, parts, num_parts, vocabulary, info, max_seq_len,
                 blocks_per_shard) -> None:
  from bert_sym.input import seqio_tasks  # pylint: disable=import-outside-toplevel
  task, split = info['task'], info['split']
  write_vocab(split_url, tokenizer.read_vocab_bytes(vocabulary.path))
  for part in parts:
    if exists(join_url(split_url, part_manifest_name(part))):
      logging.info('%s: part %d already exported, skipped', split_url, part)
      continue
    # The temporaries of this part's files that a kill mid-write left (a shard each, up to
    # its full size, never removed): only this worker writes this part.
    for name in (f'part-{part:05d}-*.npy', part_manifest_name(part)):
      remove_leftover_temporaries(join_url(split_url, name))
    writer = PartWriter(split_url, part, num_parts, max_seq_len=max_seq_len,
                        dtype=blocks.token_dtype(vocabulary.vocab_size),
                        pad_id=vocabulary.special.pad, blocks_per_shard=blocks_per_shard)
    dataset = seqio_tasks.packed_blocks(task, split, max_seq_len, vocabulary, part, num_parts)
    description = f'task {task} split {split} part {part}/{num_parts}'
    unk = 0
    for batch in blocks.numpy_blocks(dataset.batch(256), description):
      writer.add(batch)
      unk += int(np.count_nonzero(batch == vocabulary.special.unk))
    manifest = writer.close(**info)
    warning = blocks.unk_warning(f'{split_url} part {part}', unk, manifest['num_tokens'])
    if warning:
      print(f'WARNING: {warning}', flush=True)
    print(f'{split_url}: part {part}/{num_parts}: {manifest["num_blocks"]} blocks, '
          f'{manifest["num_tokens"]} tokens', flush=True)

"""Checkpoints: an orbax `CheckpointManager` under `{workdir}/checkpoints`, plus config.json.

Layout of one step directory `{workdir}/checkpoints/{step}/` (plain orbax, no project code
needed to read it; see `load_pretrained` and the README):

  state/       StandardSave of {'params', 'opt_state', 'step', 'rng'}  (rng = raw key data)
  data_iter/   JsonSave of {'process_count': N, 'states': [iterator.get_state() per process]}

How orbax marks a step complete depends on the filesystem:

  local / POSIX   the step is written into `{step}.orbax-checkpoint-tmp-<ts>/` and renamed
                  to `{step}/` once every item is complete;
  gs://           there is no atomic directory rename, so orbax writes straight into
                  `{step}/` and drops a `commit_success.txt` file in it when complete.

So on GCS an unfinished step *does* look like `checkpoints/{step}/state/`. Every reader
must therefore go through `finished_steps` (orbax's own finalization check), never a plain
directory listing. Unfinished steps are ignored, and the trainer's manager cleans up
local temporary directories at the next start.
"""

import json
import os
import sys
import time
import traceback
from typing import Any

from absl import logging
from etils import epath
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from bert_sym import files

STATE = 'state'
DATA_ITER = 'data_iter'
CONFIG_FILE = 'config.json'


# ----------------------------------------------------------------------------------------
# config.json: the fully resolved config, so that a run can be reproduced and a
# checkpoint interpreted without the command line that made it.
# ----------------------------------------------------------------------------------------

def write_config(workdir, config: ml_collections.ConfigDict) -> epath.Path:
  path = epath.Path(workdir) / CONFIG_FILE
  files.write_atomically(path, config.to_json(indent=2, sort_keys=True) + '\n')
  return path


def read_config(workdir) -> ml_collections.ConfigDict:
  path = epath.Path(workdir) / CONFIG_FILE
  if not path.exists():
    raise FileNotFoundError(
        f'{path} does not exist: {workdir} is not a bert_sym training workdir (the trainer '
        f'writes {CONFIG_FILE} there before the first step).')
  return ml_collections.ConfigDict(json.loads(path.read_text()))


def flat_config(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """{'model.attention': 'pairwise', ...}: every leaf by its dotted key, as in JSON."""
  def flatten(tree, prefix=''):
    for key, value in tree.items():
      if isinstance(value, dict):
        yield from flatten(value, f'{prefix}{key}.')
      else:
        yield f'{prefix}{key}', value
  return dict(flatten(json.loads(config.to_json())))


def config_differences(a: ml_collections.ConfigDict, b: ml_collections.ConfigDict) -> list[str]:
  a, b = flat_config(a), flat_config(b)
  return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


# ---- The manager and the save/restore calls the trainer makes ----

def absolute(path) -> epath.Path:
  """Orbax refuses relative paths, and users type `--workdir=runs/x`: resolve local ones."""
  path = epath.Path(path)
  return path if '://' in str(path) else epath.Path(os.path.abspath(path))


def checkpoint_dir(workdir) -> epath.Path:
  return absolute(workdir) / 'checkpoints'


def make_manager(workdir, ckpt_config=None, *, read_only=False) -> ocp.CheckpointManager:
  """keep_last N most recent steps, plus every keep_every-th step forever (0 = off)."""
  ckpt_config = ckpt_config or ml_collections.ConfigDict(
      dict(keep_last=None, keep_every=0, async_save=False))
  options = ocp.CheckpointManagerOptions(
      max_to_keep=ckpt_config.keep_last or None,
      keep_period=ckpt_config.keep_every or None,
      enable_async_checkpointing=bool(ckpt_config.async_save),
      read_only=read_only,
      create=not read_only,
      cleanup_tmp_directories=not read_only)
  return ocp.CheckpointManager(
      checkpoint_dir(workdir), options=options, item_names=(STATE, DATA_ITER))


def allgather_json(obj) -> list:
  """Every process's `obj` (JSON-serialisable), in process order, on every process.

  Each host reads its own slice of the data; the checkpoint keeps every iterator's state
  (orbax's JsonSave writes from the primary host only), which also records the process
  count they were written with.
  """
  if jax.process_count() == 1:
    return [obj]
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  data = np.frombuffer(json.dumps(obj).encode(), np.uint8)
  lengths = multihost_utils.process_allgather(np.array([data.size], np.int32))
  padded = np.zeros(int(lengths.max()), np.uint8)
  padded[:data.size] = data
  gathered = multihost_utils.process_allgather(padded)
  return [json.loads(bytes(row[:int(n)]).decode())
          for row, n in zip(gathered, lengths.reshape(-1))]


def save(manager: ocp.CheckpointManager, step: int, state: dict, data_state: Any, *,
         force: bool = False) -> bool:
  """Saves (asynchronously if configured) and returns whether a save was started.

  Must be called by every process. Arrays are copied off the devices before this
  returns, so the caller may donate `state` to the next update step right away.
  """
  data_item = {'process_count': jax.process_count(), 'states': allgather_json(data_state)}
  return manager.save(step, force=force, args=ocp.args.Composite(**{
      STATE: ocp.args.StandardSave(state),
      DATA_ITER: ocp.args.JsonSave(data_item)}))


def _path_str(path) -> str:
  return '/'.join(str(getattr(p, 'key', getattr(p, 'idx', getattr(p, 'name', p))))
                  for p in path)


def saved_state_metadata(manager: ocp.CheckpointManager, step: int):
  """The tree of ArrayMetadata (shape, dtype) of the `state` item, read without loading."""
  path = manager.directory / str(step) / STATE
  metadata = ocp.PyTreeCheckpointer().metadata(path)
  if metadata is None or metadata.item_metadata is None:
    raise FileNotFoundError(f'{path}: no readable array metadata (_METADATA or '
                            'manifest.ocdbt missing or damaged)')
  return metadata.item_metadata.tree


def check_compatible(manager: ocp.CheckpointManager, step: int, abstract_params) -> None:
  """Raises a readable error if the checkpoint's parameters differ from the config's.

  Restoring mismatched shapes fails deep inside tensorstore; comparing first lets us say
  which parameter differs and what to do about it.
  """
  saved = saved_state_metadata(manager, step)['params']
  saved_shapes = {_path_str(p): tuple(m.shape)
                  for p, m in jax.tree_util.tree_leaves_with_path(saved)}
  wanted_shapes = {_path_str(p): tuple(a.shape)
                   for p, a in jax.tree_util.tree_leaves_with_path(abstract_params)}
  where = manager.directory / str(step)
  problems = []
  for name in sorted(set(saved_shapes) | set(wanted_shapes)):
    s, w = saved_shapes.get(name), wanted_shapes.get(name)
    if s != w:
      problems.append(f'  params/{name}: checkpoint {s if s else "(absent)"}, '
                      f'config {w if w else "(absent)"}')
  if problems:
    hint = ''
    scanned = lambda names: any('/layers/' in f'/{n}' for n in names)
    if scanned(saved_shapes) != scanned(wanted_shapes):
      hint = ('\nThe checkpoint and the config differ in model.scan_layers (stacked '
              "'layers' vs per-layer 'layer_{i}' parameters): rerun with "
              f'--config.model.scan_layers={scanned(saved_shapes)}, the layout it was '
              'written in (bert_sym.model.stack_layers / unstack_layers convert exactly).')
    raise IncompatibleCheckpoint(
        f'The checkpoint {where} was written by a different model than the current config '
        f'builds ({len(problems)} parameter(s) differ):\n' + '\n'.join(problems[:10]) +
        '\nThis workdir belongs to another config: use a fresh --workdir, or rerun with '
        'the config saved in its config.json.' + hint)


def restore(manager: ocp.CheckpointManager, step: int, abstract_state) -> tuple[dict, Any]:
  """Restores `state` onto the shardings in `abstract_state` (any mesh) + this host's data.

  `abstract_state` holds jax.ShapeDtypeStruct leaves with `.sharding` set: orbax reads
  each shard straight onto its device, whatever mesh the checkpoint was written from.
  """
  restored = manager.restore(step, args=ocp.args.Composite(**{
      STATE: ocp.args.StandardRestore(abstract_state),
      DATA_ITER: ocp.args.JsonRestore()}))
  data_item = restored[DATA_ITER]
  states = data_item['states']
  if data_item['process_count'] != jax.process_count():
    # The iterator state is a position in the global batch sequence, the same on every
    # process, and MLMIterator.set_state accepts another process count as long as the
    # global batch (batch_size x process_count) is unchanged; it raises otherwise.
    logging.info('Checkpoint written by %d processes, resuming on %d: every process '
                 'resumes from the saved global input position.',
                 data_item['process_count'], jax.process_count())
    return restored[STATE], states[0]
  return restored[STATE], states[jax.process_index()]


class IncompatibleCheckpoint(ValueError):
  """The checkpoint is readable but holds another model: falling back would not help."""


DAMAGED_DIR = 'damaged_checkpoints'


def _quarantine(manager: ocp.CheckpointManager, step: int) -> epath.Path:
  """Moves a damaged step out of `checkpoints/`, so that the step can be saved again."""
  src = manager.directory / str(step)
  dst = manager.directory.parent / DAMAGED_DIR / f'{step}-{int(time.time())}'
  if jax.process_index() == 0:
    dst.parent.mkdir(parents=True, exist_ok=True)
    src.rename(dst)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(f'bert_sym_quarantine_{step}')
  return dst


def _is_echo_of_failed_read(unraisable) -> bool:
  """The echoes of one failed orbax read: cancelled sibling reads ("Exception ignored in:
  <coroutine ...>") and TensorStore callbacks that land after orbax closed its event loop
  ("RuntimeError: Event loop is closed"), possibly well after the restore returned."""
  error = unraisable.exc_value
  if isinstance(error, RuntimeError) and 'Event loop is closed' in str(error):
    return True
  filenames = ''.join(frame.filename for frame in traceback.extract_tb(unraisable.exc_traceback))
  return 'orbax' in repr(unraisable.object) or 'orbax' in filenames


def _mute_echoes_of_failed_reads() -> None:
  """Installed for restores: after a damaged checkpoint, hundreds of lines of those echoes
  would bury the one warning that matters (restore_latest's). Anything else still prints."""
  previous = sys.unraisablehook
  if getattr(previous, 'bert_sym_mutes_failed_reads', False):
    return

  def hook(unraisable):
    if not _is_echo_of_failed_read(unraisable):
      previous(unraisable)
  hook.bert_sym_mutes_failed_reads = True
  sys.unraisablehook = hook


def restore_latest(workdir, ckpt_config, abstract_state, abstract_params, *, log=print
                   ) -> tuple[ocp.CheckpointManager, int | None, dict | None, Any]:
  """(manager, step, state, data state) of the newest step that restores, else Nones.

  t5x and MaxText trust the newest checkpoint only as far as it reads: a step whose files
  were truncated or lost (a disk filled up, a bucket lifecycle rule, a hand-made copy) is
  skipped with a warning that says why, moved to `{workdir}/damaged_checkpoints/`, and
  the next newest is tried. A readable checkpoint of another model is an error instead.
  """
  manager = make_manager(workdir, ckpt_config)
  skipped = False
  _mute_echoes_of_failed_reads()
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      check_compatible(manager, step, abstract_params)
      state, data_state = restore(manager, step, abstract_state)
    except IncompatibleCheckpoint:
      raise
    except Exception as e:  # pylint: disable=broad-except
      # TensorStore appends its whole JSON spec to the message: keep the sentence.
      reason = ' '.join(str(e).split('. See full TensorStore')[0].split())[:240]
      reason = f'{type(e).__name__}: {reason}' if reason else type(e).__name__
      manager.close()
      moved = _quarantine(manager, step)
      log(f'WARNING: checkpoint step {step} cannot be restored ({reason}); skipped it and '
          f'moved it to {moved}. Trying the previous step.')
      manager = make_manager(workdir, ckpt_config)
      skipped = True
      continue
    return manager, step, state, data_state
  if skipped:
    log('WARNING: no checkpoint could be restored; starting from scratch.')
  return manager, None, None, None


# ---- Reading a pre-trained model back (GLUE fine-tuning, export, notebooks) ----

def _is_step_dir(path: epath.Path) -> bool:
  return (path / STATE).is_dir()


def _is_finished_step_dir(path: epath.Path) -> bool:
  # orbax picks the check from the path: no tmp suffix locally, commit_success.txt on gs://.
  return _is_step_dir(path) and ocp.path.step.is_path_finalized(path)


def _checkpoints_root(path) -> epath.Path:
  path = absolute(path)
  return path if path.name == 'checkpoints' else checkpoint_dir(path)


def finished_steps(workdir) -> list[int]:
  """Sorted steps under `{workdir}/checkpoints` that orbax has finalized (any filesystem).

  `workdir` may also be the `checkpoints/` folder itself. A step whose save is still
  running or was killed (a tmp-suffixed directory locally, a directory without
  `commit_success.txt` on gs://) is never listed, so it is never read. Read-only: nothing
  is created or cleaned up, so it is safe beside a running trainer.
  """
  root = _checkpoints_root(workdir)
  if not root.is_dir():
    return []
  return sorted(int(p.name) for p in root.iterdir()
                if p.name.isdigit() and _is_finished_step_dir(p))


def resolve_step_dir(path) -> epath.Path:
  """`path` is a workdir, its `checkpoints/` folder, or one finished step directory."""
  path = absolute(path)
  if not path.exists():
    raise FileNotFoundError(f'{path} does not exist.')
  if _is_step_dir(path):
    if not ocp.path.step.is_path_finalized(path):
      raise FileNotFoundError(
          f'{path} is a checkpoint that orbax has not finalized (its save is still running '
          f'or was interrupted); pick a finished step or the workdir.')
    return path
  ckpt_root = _checkpoints_root(path)
  steps = finished_steps(ckpt_root)
  if not steps:
    raise FileNotFoundError(
        f'No finished checkpoint under {path}: expected a training workdir with '
        f'checkpoints/<step>/{STATE}/, or a step directory such as '
        f'<workdir>/checkpoints/1000.')
  return ckpt_root / str(max(steps))


def load_params(step_dir) -> dict:
  """The model parameters of one step as host numpy arrays (opt_state is not read)."""
  step_dir = absolute(step_dir)
  checkpointer = ocp.PyTreeCheckpointer()
  tree = checkpointer.metadata(step_dir / STATE).item_metadata.tree
  wanted = {'params': tree['params']}
  restored = checkpointer.restore(step_dir / STATE, args=ocp.args.PyTreeRestore(
      item=wanted,
      # numpy targets: no sharding needed, so any device count can read any checkpoint.
      restore_args=jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), wanted),
      partial_restore=True))
  return restored['params']


def load_pretrained(path) -> tuple[ml_collections.ConfigDict, dict]:
  """(training config, BertForMaskedLM params) from a workdir or a step directory.

  A workdir gives its latest finished step. `params['encoder']` is the encoder that
  `BertForSequenceClassification` expects under `['bert']['encoder']`. Arrays are host
  numpy, unboxed (no logical-axis metadata).
  """
  step_dir = resolve_step_dir(path)
  workdir = step_dir.parent.parent
  config = read_config(workdir)
  params = load_params(step_dir)
  logging.info('Loaded pre-trained params from %s', step_dir)
  return config, params


def with_pretrained_encoder(params: dict, encoder: dict, source='the checkpoint') -> dict:
  """A classifier's params (BertForSequenceClassification: {'bert': {'encoder', 'pooler'},
  'classifier'}) with the encoder replaced by a pre-trained one (`load_pretrained`'s
  params['encoder'], host numpy), as float32; pooler and classifier stay as given (fresh).

  The one place where pre-training's tree meets fine-tuning's. Raises a readable error when
  the encoder's parameters differ from the ones the classifier expects.
  """
  fresh = params['bert']['encoder']
  want = {jax.tree_util.keystr(p): tuple(x.shape)
          for p, x in jax.tree_util.tree_leaves_with_path(fresh)}
  have = {jax.tree_util.keystr(p): tuple(np.shape(x))
          for p, x in jax.tree_util.tree_leaves_with_path(encoder)}
  if want != have:
    diff = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))
    raise ValueError(f'The encoder in {source} does not match the model its config.json '
                     f'describes ({len(diff)} parameters differ, e.g. {diff[:3]}).')
  out = dict(params)
  out['bert'] = dict(params['bert'])
  out['bert']['encoder'] = jax.tree.map(lambda x: np.asarray(x, np.float32), encoder)
  return out

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

import contextlib
import errno
import gc
import json
import logging as std_logging
import os
import re
import socket
import sys
import time
import traceback
import warnings
import weakref
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


class IncompatibleCheckpoint(ValueError):
  """The checkpoint is readable but holds another model: falling back would not help."""


class DamagedCheckpoint(ValueError):
  """Recognised corruption of one step: files missing, truncated or not parsable."""


class CheckpointReadError(ValueError):
  """A checkpoint could not be read, and the checkpoint itself is not to blame."""


class CheckpointSaveError(RuntimeError):
  """A save failed (disk full, permission, quota): the run must stop at once."""


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


# ---- One trainer per workdir ----

LOCK_FILE = 'trainer.lock'


class WorkdirBusy(ValueError):
  """Another live trainer holds the workdir."""


@contextlib.contextmanager
def workdir_lock(workdir, log=print):
  """Held by process 0 for the whole run: a second trainer on the same workdir stops at
  once instead of deleting the first one's saves and interleaving its metrics.

  The lock file holds the holder's host and pid and is created atomically (O_EXCL). A lock
  left by a dead process on this host is taken over with a warning. Object stores (gs://)
  have no O_EXCL: there the lock is not taken (one trainer per gs:// workdir is the user's
  job, as with any orbax run).
  """
  path = os.path.join(str(absolute(workdir)), LOCK_FILE)
  local = '://' not in str(workdir)
  problem = None
  if local and jax.process_index() == 0:
    try:
      _take_lock(path, log)
    except WorkdirBusy as e:
      problem = str(e)
  problem = allgather_json(problem)[0]
  if problem:
    raise WorkdirBusy(problem)
  try:
    yield
  finally:
    if local and jax.process_index() == 0 and _lock_holder(path).get('pid') == os.getpid():
      os.unlink(path)


def _lock_holder(path) -> dict:
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return {}


def _is_stale(path, holder: dict) -> bool:
  if not holder:   # unparsable: stale unless it is being written right now
    return time.time() - os.path.getmtime(path) > 30
  if holder.get('host') != socket.gethostname():
    return False   # cannot tell whether a process on another host is alive
  try:
    os.kill(int(holder['pid']), 0)
  except ProcessLookupError:
    return True
  except (PermissionError, ValueError, KeyError, TypeError):
    return False
  return False


def _take_lock(path, log) -> None:
  me = {'host': socket.gethostname(), 'pid': os.getpid(),
        'started': time.strftime('%Y-%m-%d %H:%M:%S %Z')}
  for _ in range(3):
    try:
      fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      holder = _lock_holder(path)
      if not _is_stale(path, holder):
        raise WorkdirBusy(
            f'{os.path.dirname(path)} is in use by another trainer (pid '
            f'{holder.get("pid", "?")} on {holder.get("host", "?")}, since '
            f'{holder.get("started", "?")}; lock file {path}). Wait for it to finish or use '
            'another --workdir; if that process is gone, delete the lock file.') from None
      log(f'WARNING: taking over {path}: its holder (pid {holder.get("pid", "?")} on this '
          'host) is no longer running.')
      with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
      continue
    with os.fdopen(fd, 'w') as f:
      json.dump(me, f)
    return
  raise WorkdirBusy(f'Could not take the workdir lock {path}; another trainer keeps taking it.')


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
  returns, so the caller may donate `state` to the next update step right away. A
  failure, here or in the previous background save, raises CheckpointSaveError.
  """
  data_item = {'process_count': jax.process_count(), 'states': allgather_json(data_state)}
  check_saves(manager)
  try:
    # orbax first waits for the previous (background) save: its failure surfaces here.
    started = manager.save(step, force=force, args=ocp.args.Composite(**{
        STATE: ocp.args.StandardSave(state),
        DATA_ITER: ocp.args.JsonSave(data_item)}))
  except Exception as e:  # pylint: disable=broad-except
    raise _save_failed(manager, _failed_step(manager, step), e) from None
  _LAST_STARTED[manager] = step
  return started


# The step of each manager's latest started save: a background failure belongs to it.
_LAST_STARTED = weakref.WeakKeyDictionary()


def _failed_step(manager, current: int | None = None) -> int | None:
  previous = _LAST_STARTED.get(manager)
  if previous is not None and previous != current and previous not in manager.all_steps():
    return previous
  return current if current is not None else previous


def check_saves(manager: ocp.CheckpointManager) -> None:
  """Raises CheckpointSaveError if a background save has failed (cheap: call every step)."""
  try:
    manager.check_for_errors()
  except Exception as e:  # pylint: disable=broad-except
    raise _save_failed(manager, _failed_step(manager), e) from None


def finish_saves(manager: ocp.CheckpointManager) -> None:
  """Waits for the in-flight save; raises CheckpointSaveError if it failed."""
  try:
    manager.wait_until_finished()
  except Exception as e:  # pylint: disable=broad-except
    raise _save_failed(manager, _failed_step(manager), e) from None


_SAVE_CAUSES = ((errno.ENOSPC, 'the disk is full (ENOSPC)'),
                (errno.EDQUOT, 'the disk quota is exceeded (EDQUOT)'),
                (errno.EACCES, 'permission denied (EACCES)'),
                (errno.EROFS, 'the filesystem is read-only (EROFS)'))


def _mute_closed_loop_echoes() -> None:
  """After a failed save, TensorStore keeps calling back into orbax's closed event loop
  (dozens of "RuntimeError: Event loop is closed" tracebacks). The run is over by then."""
  previous_unraisable, previous_except = sys.unraisablehook, sys.excepthook
  sys.unraisablehook = lambda u: (None if _is_closed_loop(u.exc_value)
                                  else previous_unraisable(u))
  sys.excepthook = lambda t, v, tb: None if _is_closed_loop(v) else previous_except(t, v, tb)


def _save_failed(manager, step, error) -> CheckpointSaveError:
  """One line naming step, path and cause; the unfinished step's temporary files removed."""
  # The run ends here: orbax's abandoned write coroutines would each print a warning when
  # collected at exit, after the one line that says what happened.
  warnings.filterwarnings('ignore', 'coroutine .* was never awaited', RuntimeWarning)
  _mute_closed_loop_echoes()
  text = describe_error(error)
  for chained in (error, error.__cause__, error.__context__):
    if isinstance(chained, OSError) and chained.errno is not None:
      text = describe_error(chained)
      break
  cause = next((why for number, why in _SAVE_CAUSES
                if os.strerror(number) in text or f'errno {number}' in text.lower()), text)
  if 'RESOURCE_EXHAUSTED' in text:   # TensorStore's word for ENOSPC / EDQUOT
    cause = 'the disk is full or over quota (ENOSPC / EDQUOT)'
  elif 'PERMISSION_DENIED' in text:
    cause = 'permission denied (EACCES)'
  for tmp in manager.directory.glob('*.orbax-checkpoint-tmp*') if jax.process_index() == 0 else []:
    tmp.rmtree(missing_ok=True)
  kept = [s for s in finished_steps(manager.directory) if s != step]
  previous = (f'the previous checkpoint (step {kept[-1]}) is intact' if kept
              else 'no earlier checkpoint exists')
  where = manager.directory / str(step) if step is not None else manager.directory
  return CheckpointSaveError(
      f'Saving checkpoint step {step} to {where} failed: {cause}. The run stops here; '
      f'{previous}. Free space or fix the permissions, then rerun the same command to '
      'resume.')


def _path_str(path) -> str:
  return '/'.join(str(getattr(p, 'key', getattr(p, 'idx', getattr(p, 'name', p))))
                  for p in path)


# ---- Restore: corruption is set aside, everything else is said and left in place ----
#
#   recognised corruption (a missing or truncated array file, a missing or unreadable
#   _METADATA / manifest, a JSON item that does not parse)
#       -> the step moves to {workdir}/damaged_checkpoints/ and the previous one is tried;
#   a readable checkpoint of another model or optimizer
#       -> IncompatibleCheckpoint naming the differing arrays and the likely config keys;
#   anything else (I/O, timeout, out of memory, permission)
#       -> transient storage errors are retried with back-off, then CheckpointReadError
#          (one line); nothing is moved.
# Every process reads, and all act on the worst outcome any of them saw (process 0's
# wording first), so hosts never disagree about which step they resumed from.

DAMAGED_DIR = 'damaged_checkpoints'
DIVERGED_SUFFIX = '-diverged'   # set aside by a non-finite stop, not for corruption
READ_ATTEMPTS = 4
BACKOFF_SECONDS = 2.0           # 2, 4, 8 s between attempts


# TensorStore's messages start with an absl status code.
_CORRUPTION_CODES = ('NOT_FOUND:', 'OUT_OF_RANGE:', 'DATA_LOSS:')
_TRANSIENT_CODES = ('UNAVAILABLE:', 'DEADLINE_EXCEEDED:', 'ABORTED:')


def failure_kind(error: BaseException) -> str:
  """'damaged', 'transient' or 'fatal': what a failed read says about the step."""
  text = str(error)
  if isinstance(error, (DamagedCheckpoint, FileNotFoundError, json.JSONDecodeError)):
    return 'damaged'
  if isinstance(error, ValueError) and any(code in text for code in _CORRUPTION_CODES):
    return 'damaged'
  if isinstance(error, (PermissionError, MemoryError)) or 'PERMISSION_DENIED' in text:
    return 'fatal'
  if isinstance(error, OSError) or any(code in text for code in _TRANSIENT_CODES):
    return 'transient'   # a generic I/O error, a timeout, a dropped connection
  return 'fatal'


def describe_error(error: BaseException) -> str:
  """One line: the exception's type and sentence, without TensorStore's JSON spec."""
  lines = [line for line in str(error).splitlines() if line.strip()]
  text = lines[-1] if lines and lines[0].startswith('Traceback') else ' '.join(lines)
  text = re.split(r'\. See full TensorStore|\s*\[tensorstore_spec', text)[0]
  text = ' '.join(text.split())[:240]
  return f'{type(error).__name__}: {text}' if text else type(error).__name__


def read_state_metadata(step_dir) -> Any:
  """The tree of ArrayMetadata (shape, dtype) of `step_dir`'s state, read without arrays.

  Raises the storage's own error (FileNotFoundError for a missing _METADATA, TensorStore's
  NOT_FOUND / OUT_OF_RANGE for a lost or short file) so that `failure_kind` can tell.
  """
  handler = ocp.PyTreeCheckpointHandler()
  try:
    metadata = handler.metadata(epath.Path(step_dir) / STATE)
  finally:
    handler.close()
  tree = getattr(metadata, 'tree', None)
  if tree is None:
    raise DamagedCheckpoint(f'{step_dir}/{STATE} has no readable array metadata')
  return tree


def read_json_item(step_dir) -> dict:
  """The data_iter item, parsed (a missing or unparsable file is corruption)."""
  return json.loads((epath.Path(step_dir) / DATA_ITER / 'metadata').read_text())


def _shapes(tree) -> dict[str, tuple]:
  return {_path_str(p): (tuple(x.shape), str(np.dtype(x.dtype)))
          for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def check_compatible(saved_tree, abstract_state, where, hint: str = '') -> None:
  """Raises IncompatibleCheckpoint unless the saved state (params, opt_state, step, rng:
  structure, shapes, dtypes) is what the config builds. Restoring mismatched trees fails
  deep inside orbax or TensorStore; comparing first says which arrays differ and why."""
  saved, wanted = _shapes(saved_tree), _shapes(abstract_state)
  differing = sorted(k for k in set(saved) | set(wanted) if saved.get(k) != wanted.get(k))
  if not differing:
    return
  show = lambda x: f'{x[0]} {x[1]}' if x else '(absent)'
  problems = [f'  {k}: checkpoint {show(saved.get(k))}, config {show(wanted.get(k))}'
              for k in differing[:10]]
  more = f'\n  ... and {len(differing) - 10} more' if len(differing) > 10 else ''
  raise IncompatibleCheckpoint(
      f'The checkpoint {where} was written by a different model or optimizer than the '
      f'current config builds ({len(differing)} array(s) differ):\n' + '\n'.join(problems) +
      more + '\n' + _likely_causes(differing, saved, wanted, hint) +
      'This workdir belongs to another config: use a fresh --workdir, or rerun with the '
      'config saved in its config.json. Nothing was moved.')


def _likely_causes(differing, saved, wanted, hint) -> str:
  """The config keys most likely responsible, from where the trees differ."""
  causes = []
  if any(k.startswith('params/') for k in differing):
    scanned = lambda names: any('/layers/' in f'/{n}' for n in names)
    if scanned(saved) != scanned(wanted):
      causes.append(
          f'model.scan_layers (stacked \'layers\' vs per-layer \'layer_{{i}}\' parameters): '
          f'rerun with --config.model.scan_layers={scanned(saved)}, the layout it was '
          'written in (bert_sym.model.stack_layers / unstack_layers convert exactly)')
    else:
      causes.append('model.* (sizes, attention variant, dtypes)')
  if 'rng' in differing:   # threefry keys are 2 uint32 words, rbg and unsafe_rbg keys 4
    causes.append('prng_impl (the dropout key data differs in shape between threefry and '
                  'rbg/unsafe_rbg): rerun with the prng_impl this run was written with')
  if any(k.startswith('opt_state/') for k in differing):
    causes.append('optimizer.grad_clip_norm (0 and non-zero build different optimizer '
                  'states), another optimizer recipe, or another optax version')
  text = 'Likely config keys: ' + '; '.join(causes) + '.\n' if causes else ''
  return text + (f'{hint}\n' if hint else '')


def config_hint(workdir, config) -> str:
  """The keys in which `config` differs from the workdir's config.json ('' if unknown)."""
  if config is None or not (epath.Path(workdir) / CONFIG_FILE).exists():
    return ''
  try:
    changed = config_differences(read_config(workdir), config)
  except ValueError:
    return ''
  relevant = [k for k in changed if k.startswith(('model.', 'optimizer.', 'prng_impl'))]
  return f'Changed since config.json: {", ".join(relevant)}.' if relevant else ''


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


def _read_step(manager, step, abstract_state, hint):
  """Checks the step's metadata and JSON item, compares trees, then reads the arrays."""
  step_dir = manager.directory / str(step)
  saved_tree = read_state_metadata(step_dir)
  read_json_item(step_dir)
  check_compatible(saved_tree, abstract_state, step_dir, hint)
  return restore(manager, step, abstract_state)


_SEVERITY = ('ok', 'damaged', 'transient', 'fatal', 'incompatible')


def _agreed(outcome: dict) -> dict:
  """The worst outcome any process saw, the same on every process."""
  return max(allgather_json(outcome), key=lambda o: _SEVERITY.index(o['kind']))


def _restore_step(manager, step, abstract_state, hint):
  """((state, data state), None) if `step` restores, (None, reason) if it is damaged;
  raises IncompatibleCheckpoint or CheckpointReadError otherwise."""
  for attempt in range(READ_ATTEMPTS):
    result, outcome = None, {'kind': 'ok', 'reason': ''}
    try:
      result = _read_step(manager, step, abstract_state, hint)
    except IncompatibleCheckpoint as e:
      outcome = {'kind': 'incompatible', 'reason': str(e)}
    except Exception as e:  # pylint: disable=broad-except
      outcome = {'kind': failure_kind(e), 'reason': describe_error(e)}
    agreed = _agreed(outcome)
    if agreed['kind'] == 'ok':
      return result, None
    if agreed['kind'] == 'damaged':
      return None, agreed['reason']
    if agreed['kind'] == 'incompatible':
      raise IncompatibleCheckpoint(agreed['reason'])
    if agreed['kind'] == 'transient' and attempt + 1 < READ_ATTEMPTS:
      delay = BACKOFF_SECONDS * 2 ** attempt
      logging.warning('Reading checkpoint step %d failed (%s); retrying in %.0f s.',
                      step, agreed['reason'], delay)
      time.sleep(delay)
      continue
    raise CheckpointReadError(_read_failure_line(manager.directory / str(step), agreed, attempt))
  raise AssertionError('unreachable')


def _read_failure_line(step_dir, outcome, attempt) -> str:
  tries = f' after {attempt + 1} attempts' if outcome['kind'] == 'transient' else ''
  return (f'Could not read checkpoint {step_dir}{tries} ({outcome["reason"]}). The '
          'checkpoint does not look damaged, so nothing was moved and nothing was started: '
          'fix the cause (storage reachable, permissions, memory) and rerun the same '
          'command to resume.')


def _set_aside(ckpt_dir: epath.Path, step: int, suffix: str = '') -> epath.Path:
  """Moves a step out of `checkpoints/` (process 0 renames, every process waits)."""
  src = ckpt_dir / str(step)
  dst = ckpt_dir.parent / DAMAGED_DIR / f'{step}-{int(time.time())}{suffix}'
  if jax.process_index() == 0:
    dst.parent.mkdir(parents=True, exist_ok=True)
    src.rename(dst)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(f'bert_sym_set_aside_{step}')
  return dst


def set_aside_diverged(workdir, steps, onset: int, log=print) -> None:
  """Moves checkpoints written while a run was diverging beside the damaged ones."""
  for step in sorted(steps):
    if (checkpoint_dir(workdir) / str(step)).exists():
      moved = _set_aside(checkpoint_dir(workdir), step, DIVERGED_SUFFIX)
      log(f'Set aside checkpoint step {step} to {moved}: the run was diverging there (its '
          f'loss was unhealthy from step {onset} on), so resuming from it would diverge '
          'again.')


def damaged_steps_found(workdir) -> list[str]:
  """Entries of damaged_checkpoints/ set aside for corruption (not for divergence)."""
  root = absolute(workdir) / DAMAGED_DIR
  if not root.is_dir():
    return []
  return sorted(p.name for p in root.iterdir() if not p.name.endswith(DIVERGED_SUFFIX))


class NothingRestored(CheckpointReadError):
  """A workdir with checkpoints, none of which restores, and no --start_over."""


def _refuse_silent_restart(workdir, moved_now, start_over: bool, log) -> None:
  found = damaged_steps_found(workdir)
  if not moved_now and not found:
    return   # a fresh workdir (or only diverged steps set aside): start from step 0
  where = absolute(workdir) / DAMAGED_DIR
  if start_over:
    log(f'WARNING: no checkpoint restores (damaged ones are in {where}); starting over '
        'from step 0 as --start_over asks.')
    return
  raise NothingRestored(
      f'No checkpoint in {checkpoint_dir(workdir)} restores: every step was damaged and '
      f'is now in {where} ({", ".join(found)}). Nothing was started, so no progress is '
      'thrown away silently. Repair or copy back a step, or rerun with --start_over to '
      'train from step 0 (metrics.jsonl keeps its rows).')


@contextlib.contextmanager
def quiet_orbax_echoes():
  """While restoring (and saving): the echoes of a failed orbax read (cancelled sibling reads, "Task
  exception was never retrieved", TensorStore callbacks after the loop closed) would bury
  the one warning that matters; they are dropped, anything else still prints. The
  previous hook is back when the restore is over."""
  previous, previous_except = sys.unraisablehook, sys.excepthook

  def hook(unraisable):
    if not _is_echo_of_failed_read(unraisable):
      previous(unraisable)

  def excepthook(kind, value, tb):   # TensorStore's callbacks into a closed loop
    if not _is_closed_loop(value):
      previous_except(kind, value, tb)
  asyncio_filter = _AsyncioEchoFilter()
  sys.unraisablehook, sys.excepthook = hook, excepthook
  std_logging.getLogger('asyncio').addFilter(asyncio_filter)
  try:
    yield
  finally:
    gc.collect()   # cancelled reads are reported when collected: here, not later
    sys.unraisablehook, sys.excepthook = previous, previous_except
    std_logging.getLogger('asyncio').removeFilter(asyncio_filter)


def _is_closed_loop(error) -> bool:
  return isinstance(error, RuntimeError) and 'Event loop is closed' in str(error)


class _AsyncioEchoFilter(std_logging.Filter):
  def filter(self, record):
    return 'exception was never retrieved' not in record.getMessage()


def _is_echo_of_failed_read(unraisable) -> bool:
  error = unraisable.exc_value
  if isinstance(error, RuntimeError) and 'Event loop is closed' in str(error):
    return True
  filenames = ''.join(frame.filename for frame in traceback.extract_tb(unraisable.exc_traceback))
  return 'orbax' in repr(unraisable.object) or 'orbax' in filenames


def _steps_newest_first(manager) -> list[int]:
  """Process 0's listing, on every process (a running save could differ between hosts)."""
  return allgather_json(sorted(manager.all_steps(), reverse=True))[0]


def restore_latest(workdir, ckpt_config, abstract_state, abstract_params=None, *,
                   log=print, config=None, start_over: bool = False
                   ) -> tuple[ocp.CheckpointManager, int | None, dict | None, Any]:
  """(manager, step, state, data state) of the newest step that restores, else Nones.

  `abstract_params` is accepted for older callers; the whole `abstract_state` is compared.
  See the table above for what each failure does. A workdir whose checkpoints were all
  damaged raises NothingRestored unless `start_over`.
  """
  del abstract_params
  hint = config_hint(workdir, config)
  manager = make_manager(workdir, ckpt_config)
  moved = []
  with quiet_orbax_echoes():
    for step in _steps_newest_first(manager):
      restored, reason = _restore_step(manager, step, abstract_state, hint)
      if restored is not None:
        return (manager, step) + tuple(restored)
      manager.close()
      destination = _set_aside(manager.directory, step)
      log(f'WARNING: checkpoint step {step} cannot be restored ({reason}); skipped it and '
          f'moved it to {destination}. Trying the previous step.')
      manager = make_manager(workdir, ckpt_config)
      moved.append(step)
  _refuse_silent_restart(workdir, moved, start_over, log)
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


def _warn(message: str) -> None:
  print(message, file=sys.stderr, flush=True)


def _candidate_step_dirs(path) -> list[epath.Path]:
  """[path] for a finished step directory; a workdir's finished steps, newest first."""
  path = absolute(path)
  if not path.exists():
    raise FileNotFoundError(f'{path} does not exist.')
  if _is_step_dir(path):
    if not ocp.path.step.is_path_finalized(path):
      raise FileNotFoundError(
          f'{path} is a checkpoint that orbax has not finalized (its save is still running '
          f'or was interrupted); pick a finished step or the workdir.')
    return [path]
  ckpt_root = _checkpoints_root(path)
  steps = finished_steps(ckpt_root)
  if not steps:
    raise FileNotFoundError(
        f'No finished checkpoint under {path}: expected a training workdir with '
        f'checkpoints/<step>/{STATE}/, or a step directory such as '
        f'<workdir>/checkpoints/1000.')
  return [ckpt_root / str(step) for step in reversed(steps)]


def _retrying(read, what):
  """read(), retried with back-off while the storage fails transiently."""
  for attempt in range(READ_ATTEMPTS):
    try:
      return read()
    except Exception as e:  # pylint: disable=broad-except
      if failure_kind(e) != 'transient' or attempt + 1 == READ_ATTEMPTS:
        raise
      delay = BACKOFF_SECONDS * 2 ** attempt
      logging.warning('Reading %s failed (%s); retrying in %.0f s.', what, describe_error(e),
                      delay)
      time.sleep(delay)
  raise AssertionError('unreachable')


def _first_readable(path, read, log):
  """(step_dir, read(step_dir)) of the newest step of `path` that is not damaged.

  The trainer's rules, read-only: a damaged step is skipped with the trainer's warning
  but never moved (a reader may run beside the trainer); any other failure is one line.
  """
  candidates = _candidate_step_dirs(path)
  with quiet_orbax_echoes():
    for step_dir in candidates:
      try:
        return step_dir, _retrying(lambda d=step_dir: read(d), step_dir)
      except Exception as e:  # pylint: disable=broad-except
        reason, kind = describe_error(e), failure_kind(e)
        if kind != 'damaged':
          raise CheckpointReadError(
              f'Could not read checkpoint {step_dir} ({reason}); it does not look damaged, '
              'so it was not skipped. Fix the cause and rerun.') from None
        if len(candidates) > 1:
          log(f'WARNING: checkpoint step {step_dir.name} cannot be restored ({reason}); '
              'skipped it. Trying the previous step.')
        last_reason = reason
  raise DamagedCheckpoint(
      f'No checkpoint under {path} can be read: ' + (
          f'{candidates[0]} is damaged ({last_reason}).' if len(candidates) == 1 else
          f'all {len(candidates)} finished steps are damaged.'))


def resolve_step_dir(path, log=_warn) -> epath.Path:
  """`path` is a workdir, its `checkpoints/` folder, or one finished step directory; a
  workdir gives its newest step whose metadata and JSON item read (damaged ones skipped)."""
  return _first_readable(path, lambda d: (read_state_metadata(d), read_json_item(d)), log)[0]


def load_params(step_dir) -> dict:
  """The model parameters of one step as host numpy arrays (opt_state is not read)."""
  step_dir = absolute(step_dir)
  wanted = {'params': read_state_metadata(step_dir)['params']}
  checkpointer = ocp.PyTreeCheckpointer()
  restored = checkpointer.restore(step_dir / STATE, args=ocp.args.PyTreeRestore(
      item=wanted,
      # numpy targets: no sharding needed, so any device count can read any checkpoint.
      restore_args=jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), wanted),
      partial_restore=True))
  return restored['params']


def load_pretrained(path, log=_warn) -> tuple[ml_collections.ConfigDict, dict]:
  """(training config, BertForMaskedLM params) from a workdir or a step directory.

  A workdir gives its newest step that reads (a damaged one is skipped with a warning, as
  the trainer does). `params['encoder']` is the encoder that
  `BertForSequenceClassification` expects under `['bert']['encoder']`. Arrays are host
  numpy, unboxed (no logical-axis metadata).
  """
  step_dir, params = _first_readable(
      path, lambda d: (read_json_item(d), load_params(d))[1], log)
  config = read_config(step_dir.parent.parent)
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

"""The trainer's restore: the newest step that reads; corruption is set aside, everything
else is said and left in place (the README's restore table)."""

import json
import re
import time
from typing import Any

from absl import logging
from etils import epath
import jax
import numpy as np
import orbax.checkpoint as ocp

from bert_sym.checkpoint import echoes
from bert_sym.checkpoint.core import CONFIG_FILE, CheckpointReadError, DATA_ITER, DamagedCheckpoint, IncompatibleCheckpoint, STATE, absolute, allgather_json, checkpoint_dir, config_hint, describe_error, key_path_str, make_manager, read_config, read_json_item, restore_on_every_host


# ---- Restore: corruption is set aside, everything else is said and left in place ----
#
#   recognised corruption (a missing or truncated array file, a missing or unreadable
#   _METADATA / manifest, a JSON item that does not parse or is not even text)
#       -> the step moves to {workdir}/damaged_checkpoints/ and the previous one is tried;
#   a readable checkpoint of another model or optimizer
#       -> IncompatibleCheckpoint naming the differing arrays and the likely config keys;
#   a step that some hosts read and others do not (their views differ), and anything
#   else (I/O, timeout, out of memory, permission)
#       -> transient storage errors are retried with back-off, then CheckpointReadError
#          (one line); nothing is moved.
# Every process reads, and all act on the worst outcome any of them saw (process 0's
# wording first), so hosts never disagree about which step they resumed from.

DAMAGED_DIR = 'damaged_checkpoints'
DIVERGED_SUFFIX = '-diverged'   # set aside by a non-finite stop, not for corruption
# A damaged step that a --start_over run has acknowledged: kept, but it no longer stops a
# later rerun of that workdir (e.g. a requeue before the new run's first save).
STARTED_OVER_SUFFIX = '-started-over'
READ_ATTEMPTS = 4
BACKOFF_SECONDS = 2.0           # 2, 4, 8 s between attempts


# TensorStore's messages start with an absl status code.
_CORRUPTION_CODES = ('NOT_FOUND:', 'OUT_OF_RANGE:', 'DATA_LOSS:')
_TRANSIENT_CODES = ('UNAVAILABLE:', 'DEADLINE_EXCEEDED:', 'ABORTED:')
# TensorStore's FAILED_PRECONDITION for bytes that do not decode (a data file gone from its
# OCDBT manifest: "Truncated Zstd-compressed stream"; a cut _sharding: "Invalid JSON").
_UNDECODABLE = re.compile(r'FAILED_PRECONDITION:.*(Truncated|Invalid JSON|[Cc]orrupt|'
                          r'Error decoding|Unexpected end)', re.S)


def failure_kind(error: BaseException) -> str:
  """'damaged', 'transient' or 'fatal': what a failed read says about the step. Read down
  the chain of causes: orbax wraps an array read's TensorStore error (a short or missing
  data file: OUT_OF_RANGE, NOT_FOUND) in a bare Exception, which alone says nothing. The
  first error in the chain that says something decides."""
  echoes.count_failed_read()   # its echoes are collected (echoes.quiet_orbax_echoes)
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    kind = _own_kind(error)
    if kind:
      return kind
    error = error.__cause__ or error.__context__
  return 'fatal'


def _own_kind(error: BaseException) -> str | None:
  text = str(error)
  # A metadata file of bytes that are not text (UnicodeDecodeError) is as damaged as one
  # whose text is not JSON.
  if isinstance(error, (DamagedCheckpoint, FileNotFoundError, json.JSONDecodeError,
                        UnicodeDecodeError)):
    return 'damaged'
  if isinstance(error, ValueError) and (any(code in text for code in _CORRUPTION_CODES)
                                        or _UNDECODABLE.search(text)):
    return 'damaged'
  if isinstance(error, (PermissionError, MemoryError)) or 'PERMISSION_DENIED' in text:
    return 'fatal'
  if isinstance(error, OSError) or any(code in text for code in _TRANSIENT_CODES):
    return 'transient'   # a generic I/O error, a timeout, a dropped connection
  return None if type(error) is Exception else 'fatal'   # a bare wrapper says nothing


def read_state_metadata(step_dir) -> Any:
  """The tree of ArrayMetadata (shape, dtype) of `step_dir`'s state, read without arrays;
  raises the storage's own error (FileNotFoundError for a missing _METADATA, TensorStore's
  NOT_FOUND / OUT_OF_RANGE for a lost or short file) so that `failure_kind` can tell."""
  handler = ocp.PyTreeCheckpointHandler()
  try:
    metadata = handler.metadata(epath.Path(step_dir) / STATE)
  finally:
    handler.close()
  tree = getattr(metadata, 'tree', None)
  if tree is None:
    raise DamagedCheckpoint(f'{step_dir}/{STATE} has no readable array metadata')
  return tree


def _shapes(tree) -> dict[str, tuple]:
  return {key_path_str(p): (tuple(x.shape), str(np.dtype(x.dtype)))
          for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def check_compatible(saved_tree, abstract_state, where, hint: str = '') -> None:
  """Raises IncompatibleCheckpoint unless the saved state (params, opt_state, step, rng:
  structure, shapes, dtypes) is what the config builds. Restoring mismatched trees fails
  deep inside orbax or TensorStore; comparing first says which arrays differ and why.
  `hint` (config_hint): the config keys changed since the workdir's config.json, which
  then lead the message, with the flags that resume it."""
  saved, wanted = _shapes(saved_tree), _shapes(abstract_state)
  differing = sorted(k for k in set(saved) | set(wanted) if saved.get(k) != wanted.get(k))
  if not differing:
    return
  show = lambda x: f'{x[0]} {x[1]}' if x else '(absent)'
  problems = [f'  {k}: checkpoint {show(saved.get(k))}, config {show(wanted.get(k))}'
              for k in differing[:10]]
  more = f'\n  ... and {len(differing) - 10} more' if len(differing) > 10 else ''
  arrays = f'({len(differing)} array(s) differ):\n' + '\n'.join(problems) + more
  if hint:   # the cause is known: said first, the arrays after
    raise IncompatibleCheckpoint(
        f'The checkpoint {where} was written with another config: {hint} That checkpoint '
        f'was left where it is. The arrays {arrays}')
  raise IncompatibleCheckpoint(
      f'The checkpoint {where} was written by a different model or optimizer than the '
      f'current config builds {arrays}\n' + _likely_causes(differing, saved, wanted) +
      'This workdir belongs to another config: use a fresh --workdir, or rerun with the '
      'config saved in its config.json. That checkpoint was left where it is.')


def _likely_causes(differing, saved, wanted) -> str:
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
  return 'Likely config keys: ' + '; '.join(causes) + '.\n' if causes else ''


def restore(manager: ocp.CheckpointManager, step: int, abstract_state
            ) -> tuple[dict, Any, dict]:
  """Restores `state` onto the shardings of `abstract_state`'s leaves (orbax reads each
  shard onto its device, from any mesh), this host's data state, and the run's own record:
  {'meter', 'lineage'} (None where a step saved none)."""
  restored = restore_on_every_host(manager, step, ocp.args.Composite(**{
      STATE: ocp.args.StandardRestore(abstract_state),
      DATA_ITER: ocp.args.JsonRestore()}))
  data_item = restored[DATA_ITER]
  states, record = data_item['states'], {k: data_item.get(k) for k in ('meter', 'lineage')}
  if data_item['process_count'] != jax.process_count():
    # The iterator state is a position in the global batch sequence, the same on every
    # process, and MLMIterator.set_state accepts another process count as long as the
    # global batch (batch_size x process_count) is unchanged; it raises otherwise.
    logging.info('Checkpoint written by %d processes, resuming on %d: every process '
                 'resumes from the saved global input position.',
                 data_item['process_count'], jax.process_count())
    return restored[STATE], states[0], record
  return restored[STATE], states[jax.process_index()], record


def _check_step(manager, step, abstract_state, hint) -> None:
  """Reads the step's metadata and JSON item and compares trees (no collective inside)."""
  step_dir = manager.directory / str(step)
  saved_tree = read_state_metadata(step_dir)
  read_json_item(step_dir)
  check_compatible(saved_tree, abstract_state, step_dir, hint)


_SEVERITY = ('ok', 'damaged', 'transient', 'fatal', 'incompatible')


def agreed_outcome(outcome: dict, same_files: bool = False) -> dict:
  """The worst outcome any process saw, the same on every process."""
  everyone = allgather_json(outcome)
  worst = max(everyone, key=lambda o: _SEVERITY.index(o['kind']))
  if same_files and worst['kind'] == 'damaged' and any(o['kind'] == 'ok' for o in everyone):
    # Every host read the same files (the checks; the arrays' shards differ by host): not
    # damage but the hosts' views differing (a stale NFS cache, a node-local copy), and
    # setting the step aside would lose a good checkpoint. Retried, then said, not moved.
    failed = [i for i, o in enumerate(everyone) if o['kind'] == 'damaged']
    return {'kind': 'transient', 'reason': f'process(es) {failed} cannot read it '
            f'({worst["reason"]}) where the others can: the hosts see different files'}
  return worst


def _outcome_of(read) -> tuple[Any, dict]:
  try:
    return read(), {'kind': 'ok', 'reason': ''}
  except IncompatibleCheckpoint as e:
    return None, {'kind': 'incompatible', 'reason': str(e)}
  except Exception as e:  # pylint: disable=broad-except
    return None, {'kind': failure_kind(e), 'reason': describe_error(e)}


def _restore_step(manager, step, abstract_state, hint):
  """(`restore`'s three, None) if `step` restores, (None, reason) if it is damaged;
  raises IncompatibleCheckpoint or CheckpointReadError otherwise. Two rounds, each ending
  in an agreement: the checks, then orbax's restore, whose collectives a host enters only
  when every host passed the checks (one host in it and another in the agreement
  deadlocks or aborts the run)."""
  for attempt in range(READ_ATTEMPTS):
    _, agreed = _outcome_of(lambda: _check_step(manager, step, abstract_state, hint))
    agreed = agreed_outcome(agreed, same_files=True)
    if agreed['kind'] == 'ok':
      result, outcome = _outcome_of(lambda: restore(manager, step, abstract_state))
      agreed = agreed_outcome(outcome)
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
  stamp = int(time.time())   # and a number where a set-aside of this step and second is
  dst = next(d for d in (ckpt_dir.parent / DAMAGED_DIR / f'{step}-{stamp}{f"-{n}" if n else ""}'
                         f'{suffix}' for n in range(1000)) if not d.exists())   # (gs://: merged)
  if jax.process_index() == 0:
    dst.parent.mkdir(parents=True, exist_ok=True)
    src.rename(dst)
  _wait_for_every_process(f'bert_sym_set_aside_{step}')
  return dst


def _wait_for_every_process(name: str) -> None:
  """A barrier after process 0's renames: no host reads the directory before they are done."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


def set_aside_diverged(workdir, steps, onset: int, log=print) -> None:
  """Moves checkpoints written while a run was diverging beside the damaged ones.

  Process 0's list is everyone's: each `_set_aside` waits for every process, so a host
  whose own listing differed (or that looked after process 0's rename) would leave the
  others waiting forever."""
  present = [step for step in sorted(steps) if (checkpoint_dir(workdir) / str(step)).exists()]
  for step in allgather_json(present)[0]:
    moved = _set_aside(checkpoint_dir(workdir), step, DIVERGED_SUFFIX)
    log(f'Set aside checkpoint step {step} to {moved}: the run was diverging there (its '
        f'loss was unhealthy from step {onset} on), so resuming from it would diverge '
        'again.')


def damaged_steps_found(workdir) -> list[str]:
  """Entries of damaged_checkpoints/ set aside for corruption (not for divergence), that
  no --start_over has acknowledged yet."""
  root = absolute(workdir) / DAMAGED_DIR
  if not root.is_dir():
    return []
  return sorted(p.name for p in root.iterdir()
                if not p.name.endswith((DIVERGED_SUFFIX, STARTED_OVER_SUFFIX)))


def _acknowledge(workdir, names) -> None:
  """Renames `names` (process 0's listing) to <name>-started-over; every process waits."""
  root = absolute(workdir) / DAMAGED_DIR
  if jax.process_index() == 0:
    for name in names:
      (root / name).rename(root / f'{name}{STARTED_OVER_SUFFIX}')
  _wait_for_every_process('bert_sym_acknowledge_damaged')


class NothingRestored(CheckpointReadError):
  """A workdir with checkpoints, none of which restores, and no --start_over."""


def _refuse_silent_restart(workdir, moved_now, start_over: bool, log) -> None:
  found = allgather_json(damaged_steps_found(workdir))[0]   # one verdict for every host
  if not moved_now and not found:
    return   # a fresh workdir (or only diverged or acknowledged steps set aside): step 0
  where = absolute(workdir) / DAMAGED_DIR
  if start_over:
    log(f'WARNING: no checkpoint restores (damaged ones are in {where}, kept with the '
        f'suffix {STARTED_OVER_SUFFIX}); starting over from step 0.')
    _acknowledge(workdir, found)
    return
  raise NothingRestored(
      f'No checkpoint in {checkpoint_dir(workdir)} restores: the steps that could not be '
      f'read are in {where} ({", ".join(found)}). Nothing was started, so no progress is '
      'thrown away silently. Repair or copy back a step, or rerun with --start_over to '
      'train from step 0 (the earlier rows are kept, in metrics.jsonl.<time>.old).')


def _steps_newest_first(manager) -> list[int]:
  """Process 0's listing, on every process (a running save could differ between hosts)."""
  return allgather_json(sorted(manager.all_steps(), reverse=True))[0]


def restore_latest(workdir, ckpt_config, abstract_state, *,
                   log=print, config=None, start_over: bool = False, keep_good=None
                   ) -> tuple[ocp.CheckpointManager, int | None, dict | None, Any, Any]:
  """(manager, step, `restore`'s three) of the newest step that restores, else Nones. See
  the table above; all steps damaged raise NothingRestored unless `start_over`. `keep_good`
  (a checkpoint.KeepNewestGood) goes to the manager the run then saves with."""
  hint = config_hint(workdir, config)
  manager = make_manager(workdir, ckpt_config, keep_good=keep_good)
  moved = []
  try:
    with echoes.quiet_orbax_echoes():
      for step in _steps_newest_first(manager):
        restored, reason = _restore_step(manager, step, abstract_state, hint)
        if restored is not None:
          return (manager, step) + tuple(restored)
        manager.close()
        destination = _set_aside(manager.directory, step)
        log(f'WARNING: checkpoint step {step} cannot be restored ({reason}); skipped it '
            f'and moved it to {destination}. Trying the previous step.')
        manager = make_manager(workdir, ckpt_config, keep_good=keep_good)
        moved.append(step)
    _refuse_silent_restart(workdir, moved, start_over, log)
  except BaseException:
    manager.close()
    raise
  return manager, None, None, None, None


def check_same_prng_impl(workdir, config) -> None:
  """rbg and unsafe_rbg keys have the same shape, so the shape check of the restore does
  not tell them apart: config.json (written by the run being resumed) does. threefry's
  keys have another shape: the restore passed, so the checkpoint's key is the one this
  config builds, and a config.json naming another was edited (trusting it refused the
  command that wrote the run, and its advice then failed on the key's shape)."""
  path = epath.Path(workdir) / CONFIG_FILE
  if not path.exists():
    return
  saved = read_config(workdir).get('prng_impl', 'threefry')
  wanted = config.get('prng_impl', 'threefry')
  if saved != wanted and {saved, wanted} <= {'rbg', 'unsafe_rbg'}:
    raise IncompatibleCheckpoint(
        f'{workdir} was trained with prng_impl={saved!r} and this run asks for {wanted!r}: '
        f'its saved dropout key is {saved} key data. Rerun with --config.prng_impl={saved}, '
        'or use a fresh --workdir.')

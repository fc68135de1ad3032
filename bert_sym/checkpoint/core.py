"""The checkpoint format: its names and errors, config.json, the orbax manager every reader
and writer opens, and which steps orbax has finished."""

import json
import os
import re
import uuid
from typing import Any

from etils import epath
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from bert_sym import cli
from bert_sym import files
from bert_sym.checkpoint.rotation import KeepNewestGood, ROTATED_OUT, remove_rotated_out


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



def write_config(workdir, config: ml_collections.ConfigDict) -> epath.Path:
  path = epath.Path(workdir) / CONFIG_FILE
  files.write_atomically(path, config.to_json(indent=2, sort_keys=True) + '\n')
  return path


def read_config(workdir) -> ml_collections.ConfigDict:
  path = epath.Path(workdir) / CONFIG_FILE
  if not path.exists() and checkpoint_dir(workdir).exists():   # a run's, but deleted
    raise FileNotFoundError(
        f'{path} does not exist, though {workdir} holds checkpoints: it held the run\'s '
        'config. Fix: put back a copy of it, or rerun the training command that made the '
        'workdir (the trainer writes it again).')
  if not path.exists():
    raise FileNotFoundError(
        f'{path} does not exist: {workdir} is not a bert_sym training workdir (the trainer '
        f'writes {CONFIG_FILE} there before the first step).')
  fix = ('it holds the run\'s config. Fix: put back a copy of it, or remove it and rerun '
         'the training command that made the workdir (the trainer writes it again).')
  try:
    written = json.loads(path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f'{path} is not valid JSON ({e}); {fix}') from e
  if not isinstance(written, dict):   # a hand edit: ConfigDict([]) fails with AttributeError
    raise ValueError(f'{path} holds a JSON {type(written).__name__}, not an object; {fix}')
  return ml_collections.ConfigDict(written)


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


def config_hint(workdir, config, prefixes=('model.', 'optimizer.', 'prng_impl')) -> str:
  """The keys under `prefixes` (default: model, optimizer, PRNG) in which `config` differs
  from the workdir's config.json, with the flags that resume it ('' if none or unknown)."""
  if config is None or not (epath.Path(workdir) / CONFIG_FILE).exists():
    return ''
  try:
    written = read_config(workdir)
    changed = config_differences(written, config)
  except ValueError:
    return ''
  relevant = [k for k in changed if k.startswith(prefixes)]
  if not relevant:
    return ''
  written, now = flat_config(written), flat_config(config)
  said = ', '.join(f'{k}={written.get(k)!r} in its config.json, {now.get(k)!r} now'
                   for k in relevant)
  flags = ' '.join(f'--config.{k}={written[k]}' for k in relevant if k in written)
  # Another config file differs in more than these (data.*, batch_size, ...), which the
  # next start would refuse in turn: the run's own config resumes it in one step.
  whole = (f' (or --config=configs/from_json.py:{workdir}, its own config)'
           if len(relevant) > 2 or len(changed) > len(relevant) else '')
  resume = f'rerun with {flags}{whole} to resume it, or ' if flags else ''
  return f'{said}. Fix: {resume}use a fresh --workdir for this config.'


# The keys the input position depends on (corpus, vocabulary, order, global batch); not
# the masking keys (mask_rate, ...), whose flags resume nothing the iterator refused.
_POSITION_KEYS = tuple(f'data.{k}' for k in (
    'source', 'task', 'text_files', 'validation_files', 'shards_dir', 'vocab_path',
    'max_seq_len', 'shuffle')) + ('seed', 'batch_size')


def data_config_hint(workdir, config) -> str:
  """config_hint for the keys the input position depends on (corpus, vocabulary, order)."""
  return config_hint(workdir, config, prefixes=_POSITION_KEYS)


def absolute(path) -> epath.Path:
  """Orbax refuses relative paths, and users type `--workdir=runs/x`: resolve local ones
  (`~` too: the shell leaves `--workdir=~/x` as typed)."""
  path = epath.Path(path)
  return path if '://' in str(path) else epath.Path(os.path.abspath(os.path.expanduser(path)))


def checkpoint_dir(workdir) -> epath.Path:
  return absolute(workdir) / 'checkpoints'


def make_manager(workdir, ckpt_config=None, *, read_only=False,
                 keep_good: KeepNewestGood | None = None) -> ocp.CheckpointManager:
  """keep_last N most recent steps (0 = all), plus every keep_every-th step forever (0 =
  off), plus the newest good one when the trainer passes `keep_good`. A writer's manager
  first removes what a killed run's rotation left (rotation.ROTATED_OUT)."""
  ckpt_config = ckpt_config or ml_collections.ConfigDict(
      dict(keep_last=None, keep_every=0, async_save=False))
  policies = getattr(ocp, 'checkpoint_managers', None)
  if not hasattr(policies, 'AnyPreservationPolicy'):
    raise ImportError(
        f'orbax-checkpoint {getattr(ocp, "__version__", "(unknown version)")} has no '
        'preservation policies, which checkpoint rotation needs: pip install '
        '"orbax-checkpoint>=0.11.26,<0.13" (requirements.txt).')
  keep = [policies.LatestN(n=ckpt_config.keep_last or None)]
  if ckpt_config.keep_every:
    keep.append(policies.EveryNSteps(interval_steps=ckpt_config.keep_every))
  if keep_good is not None:
    keep.append(keep_good)
  options = ocp.CheckpointManagerOptions(
      preservation_policy=policies.AnyPreservationPolicy(keep),
      enable_async_checkpointing=bool(ckpt_config.async_save),
      async_options=ocp.AsyncOptions(
          timeout_secs=int(getattr(ckpt_config, 'save_timeout_s', 600))),
      read_only=read_only,
      create=not read_only,
      cleanup_tmp_directories=not read_only,
      todelete_subdir=None if read_only else ROTATED_OUT)
  if not read_only:
    remove_rotated_out(checkpoint_dir(workdir))
  manager = ocp.CheckpointManager(
      checkpoint_dir(workdir), options=options, item_names=(STATE, DATA_ITER))
  # orbax removes unfinished steps in a thread of its own, awaited only by the first save:
  # a second manager (the fall-back past a damaged step) removed the same files beside it,
  # and the first save failed on the other's FileNotFoundError. A private method: orbax
  # 0.11 has none, and removes them before its constructor returns.
  getattr(manager, '_maybe_await_cleanup_tmp_directory', lambda: None)()
  return manager


def restore_on_every_host(manager: ocp.CheckpointManager, step: int, args):
  """manager.restore, which on success ends in a barrier of orbax's (a collective). A host
  whose read failed skipped it, so the hosts' next collectives differed (one in the
  barrier, the other agreeing on the outcome: gloo aborted both processes). That host
  joins the barrier before raising; unless the error says another process has gone."""
  try:
    return manager.restore(step, args=args)
  except Exception as e:  # pylint: disable=broad-except
    if jax.process_count() > 1 and not cli.another_process_stopped(describe_error(e)):
      _join_orbax_restore_barrier(manager)
    raise


def _join_orbax_restore_barrier(manager) -> None:
  """The barrier orbax's Checkpointer.restore ends with (orbax 0.11: its name and
  processes); nothing for another orbax layout."""
  from orbax.checkpoint._src.multihost import multihost  # pylint: disable=g-import-not-at-top
  checkpointer = manager._checkpointer  # pylint: disable=protected-access
  try:
    key = multihost.unique_barrier_key('Checkpointer:restore',
                                       prefix=checkpointer._barrier_sync_key_prefix)  # pylint: disable=protected-access
    processes = checkpointer._active_processes  # pylint: disable=protected-access
  except AttributeError:
    return
  multihost.sync_global_processes(key, processes=processes)


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


def key_path_str(path) -> str:
  return '/'.join(str(getattr(p, 'key', getattr(p, 'idx', getattr(p, 'name', p))))
                  for p in path)


def describe_error(error: BaseException) -> str:
  """One line: the exception's type and sentence, without TensorStore's JSON spec."""
  lines = [line for line in str(error).splitlines() if line.strip()]
  text = lines[-1] if lines and lines[0].startswith('Traceback') else ' '.join(lines)
  text = re.split(r'\. See full TensorStore|\s*\[tensorstore_spec', text)[0]
  text = ' '.join(text.split())
  if len(text) > 240:   # TensorStore's messages can run to pages; say where it was cut
    text = text[:237].rstrip() + '...'
  return f'{type(error).__name__}: {text}' if text else type(error).__name__


def is_closed_loop_error(error) -> bool:
  return isinstance(error, RuntimeError) and 'Event loop is closed' in str(error)



def is_step_dir(path: epath.Path) -> bool:
  return (path / STATE).is_dir()


def _is_finished_step_dir(path: epath.Path) -> bool:
  # orbax picks the check from the path: no tmp suffix locally, commit_success.txt on gs://.
  return is_step_dir(path) and ocp.path.step.is_path_finalized(path)


def checkpoints_root(path) -> epath.Path:
  """`{path}/checkpoints`, or `path` itself when it is the `checkpoints/` folder. A workdir
  that is itself named `checkpoints` (--workdir=~/checkpoints) has its own `checkpoints/`."""
  path = absolute(path)
  if path.name == 'checkpoints' and not checkpoint_dir(path).is_dir():
    return path
  return checkpoint_dir(path)


# etils.epath's writable schemes that work here: once TensorFlow is installed (always, with
# requirements.txt) epath and so orbax go through TensorFlow's gfile, which has no s3:// or
# az:// (an UnimplementedError at the first check, worded as no network).
WORKDIR_URL_SCHEMES = ('gs://',)


def workdir_problem(path) -> str | None:
  """Why `path` cannot be a trainer's --workdir, in one line with the fix, else None."""
  scheme = str(path).split('://')[0] + '://' if '://' in str(path) else None
  if scheme and scheme not in WORKDIR_URL_SCHEMES:   # was a KeyError traceback from epath
    local = f' (--workdir={str(path)[7:]})' if scheme == 'file://' else ''
    return (f'--workdir={path}: {scheme} is not a storage the trainer writes to. Fix: a local '
            f'directory{local}, or one of {", ".join(WORKDIR_URL_SCHEMES)}.')
  try:
    return workdir_misplaced(path) or workdir_blocked(path)
  except Exception as e:  # pylint: disable=broad-except
    if not files.is_storage_client_error(e):
      raise
    # Was a traceback from TensorFlow's gfile: a bucket unreachable from this machine, or
    # one its credentials cannot read (the usual first mistake on a TPU VM).
    return (f'--workdir={path} cannot be read ({describe_error(e)}). Fix: '
            f'{files.UNREACHABLE_FIX}, or pass another --workdir.')


def workdir_misplaced(path) -> str | None:
  """Why `path`, given as a trainer's --workdir, is a part of a training workdir and not
  one (its checkpoints/ folder, one of its steps), else None. A trainer there found no
  checkpoint, trained from step 0 and wrote its own checkpoints/, config.json and metrics
  inside the old run's folder, or inside a finished step."""
  path = absolute(path)
  if not path.is_dir():
    return None
  if is_step_dir(path):
    what, workdir = 'a checkpoint step directory', path.parent.parent
  elif checkpoint_dir(path).is_dir() or not any(
      p.name.isdigit() and is_step_dir(p) for p in path.iterdir()):
    return None
  else:
    what, workdir = 'a checkpoints/ folder (it holds checkpoint steps)', path.parent
  return (f'--workdir={path} is {what}, not a training workdir: a run there would start '
          f'from step 0 inside it. Fix: pass the workdir that holds config.json and '
          f'checkpoints/ (--workdir={workdir} to resume it), or a fresh directory.')


def workdir_blocked(path) -> str | None:
  """Why the trainer cannot write its own entries in workdir `path`, else None: a file
  where its checkpoints/ or tensorboard/ folder goes (the run trained until its first save
  and then said "free space or fix the permissions"; a traceback for tensorboard), a
  folder where config.json or metrics.jsonl goes, or another program's config.json (a
  Hugging Face export's, which the run would overwrite)."""
  path = absolute(path)
  for name, folder in (('checkpoints', True), ('tensorboard', True), (CONFIG_FILE, False),
                       ('metrics.jsonl', False)):
    entry = path / name
    if entry.exists() and entry.is_dir() != folder:
      return (f'{entry} is {"a file" if folder else "a directory"}, where the trainer keeps '
              f'its {name}{"/ folder" if folder else " file"}. Fix: move it out of the '
              f'workdir, or pass another --workdir.')
  try:   # another program's config.json (a Hugging Face export's) was overwritten by ours
    written = json.loads((path / CONFIG_FILE).read_text())
  except (OSError, ValueError):   # none, or not JSON: read_config says what to do
    return None
  if isinstance(written, dict) and 'model' not in written:
    whose = "a Hugging Face model's" if 'model_type' in written else 'not a trainer\'s'
    return (f'{path / CONFIG_FILE} is {whose} config.json: a run in {path} would overwrite '
            f'it. Fix: pass another --workdir.')
  return None


def finished_steps(workdir) -> list[int]:
  """Sorted steps under `{workdir}/checkpoints` that orbax has finalized (any filesystem).

  `workdir` may also be the `checkpoints/` folder itself. A step whose save is still
  running or was killed (a tmp-suffixed directory locally, a directory without
  `commit_success.txt` on gs://) is never listed, so it is never read. Read-only: nothing
  is created or cleaned up, so it is safe beside a running trainer.
  """
  root = checkpoints_root(workdir)
  if not root.is_dir():
    return []
  return sorted(int(p.name) for p in root.iterdir()
                if p.name.isdigit() and _is_finished_step_dir(p))


def written_at(step_dir) -> int | None:
  """When orbax committed `step_dir` (ns), from its _CHECKPOINT_METADATA: with the path, what
  tells a step apart from another written later at the same path (a rebuilt workdir, a
  diverged step set aside and trained again). None when orbax recorded no time."""
  try:
    metadata = json.loads((epath.Path(step_dir) / '_CHECKPOINT_METADATA').read_text())
  except (OSError, ValueError):
    return None
  return metadata.get('commit_timestamp_nsecs') or metadata.get('init_timestamp_nsecs')


# ---- Which training run wrote a step ----
# The data_iter item's 'lineage': [[run id, step it started from], ...], one entry per start
# of the trainer along this step's history (-1: a fresh start), the newest last. A step
# written by entry i lies after that entry's start and at or before the next entry's. A
# step of the same number written by any other start (a diverged or damaged step set aside
# and trained again, a workdir deleted and rebuilt) has another run id: GLUE's sweep keeps a
# scored step whose checkpoint is gone only if the lineage now in the workdir holds it.

def read_json_item(step_dir) -> dict:
  """The data_iter item, parsed and checked: a missing or unparsable file is corruption,
  and so is JSON of another shape (orbax writes the file whole, so only damage or a
  hand edit leaves one that parses without {'process_count': N, 'states': [N dicts]})."""
  path = epath.Path(step_dir) / DATA_ITER / 'metadata'
  item = json.loads(path.read_text())
  count = item.get('process_count') if isinstance(item, dict) else None
  states = item.get('states') if isinstance(item, dict) else None
  if not (isinstance(count, int) and count >= 1 and isinstance(states, list)
          and len(states) == count and all(isinstance(s, dict) for s in states)):
    raise DamagedCheckpoint(
        f'{path} does not hold the input position bert_sym saves ({{"process_count": N, '
        f'"states": [N objects]}}); it was damaged or edited')
  return item


def lineage_of(step_dir) -> list | None:
  """The step's lineage; None where it recorded none (written before bert_sym kept one)
  or its JSON item does not read."""
  try:
    return read_json_item(step_dir).get('lineage') or None
  except (OSError, ValueError, AttributeError):
    return None


def run_id_of(step_dir) -> str | None:
  """The id of the start of the trainer that wrote the step (the newest in its lineage)."""
  return (lineage_of(step_dir) or [[None]])[-1][0]


def extend_lineage(lineage: list | None, started_from: int | None) -> list:
  """The lineage this start of the trainer saves: the restored step's (None when it
  recorded none) and a new run id, the same on every process (a collective)."""
  run_id = allgather_json(uuid.uuid4().hex)[0]
  if started_from is None:
    return [[run_id, -1]]
  return [*(lineage or []), [run_id, started_from]]


def written_by(lineage: list, step: int) -> str | None:
  """The run id of the start in `lineage` that wrote `step` (None: none of them)."""
  ends = [start for _, start in lineage[1:]] + [float('inf')]
  for (run_id, start), end in zip(lineage, ends):
    if start < step <= end:
      return run_id
  return None

"""Reading a pre-trained model back (GLUE fine-tuning, export, notebooks), by the same
rules as the trainer's restore: a damaged newest step falls back to the previous one."""

import sys
import time

from absl import logging
from etils import epath
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from bert_sym.checkpoint.core import CheckpointReadError, DamagedCheckpoint, STATE, absolute, checkpoints_root, describe_error, finished_steps, is_step_dir, read_config
from bert_sym.checkpoint import echoes, restoring


def _warn(message: str) -> None:
  print(message, file=sys.stderr, flush=True)


def candidate_step_dirs(path) -> list[epath.Path]:
  """[path] for a finished step directory; a workdir's finished steps, newest first."""
  path = absolute(path)
  if not path.exists():
    raise FileNotFoundError(f'{path} does not exist. Fix: pass a training workdir (the '
                            '--workdir of bert_sym.train) or one of its checkpoints/<step> '
                            'directories.')
  if is_step_dir(path):
    if not ocp.path.step.is_path_finalized(path):
      raise FileNotFoundError(
          f'{path} is a checkpoint that orbax has not finalized (its save is still running '
          f'or was interrupted); pick a finished step or the workdir.')
    return [path]
  ckpt_root = checkpoints_root(path)
  steps = finished_steps(ckpt_root)
  if not steps:
    raise FileNotFoundError(
        f'No finished checkpoint under {path}: expected a training workdir with '
        f'checkpoints/<step>/{STATE}/, or a step directory such as '
        f'<workdir>/checkpoints/1000.')
  return [ckpt_root / str(step) for step in reversed(steps)]


def _retrying(read, what):
  """read(), retried with back-off while the storage fails transiently."""
  for attempt in range(restoring.READ_ATTEMPTS):
    try:
      return read()
    except Exception as e:  # pylint: disable=broad-except
      if restoring.failure_kind(e) != 'transient' or attempt + 1 == restoring.READ_ATTEMPTS:
        raise
      delay = restoring.BACKOFF_SECONDS * 2 ** attempt
      logging.warning('Reading %s failed (%s); retrying in %.0f s.', what, describe_error(e),
                      delay)
      time.sleep(delay)
  raise AssertionError('unreachable')


def _first_readable(path, read, log, step_dirs=None):
  """(step_dir, read(step_dir)) of the newest step of `path` that is not damaged.

  The trainer's rules, read-only: a damaged step is skipped with the trainer's warning
  but never moved (a reader may run beside the trainer); any other failure is one line.
  `step_dirs`: the candidates, newest first, when the caller listed them (on several
  hosts, process 0's listing: a running trainer can add a step between two listings).
  Every process must call this: orbax's restore is collective, so every host reads each
  candidate and they agree (a step damaged on every host is skipped by all; one that
  some hosts read and others do not is an error: skipping it would read an older step).
  """
  candidates = ([epath.Path(d) for d in step_dirs] if step_dirs is not None
                else candidate_step_dirs(path))
  with echoes.quiet_orbax_echoes():
    for step_dir in candidates:
      try:
        value, outcome = _retrying(lambda d=step_dir: read(d), step_dir), {'kind': 'ok'}
      except Exception as e:  # pylint: disable=broad-except
        value, outcome = None, {'kind': restoring.failure_kind(e), 'reason': describe_error(e)}
      # Each host reads every file of the step: the trainer's rule for its checks round.
      agreed = restoring.agreed_outcome(outcome, same_files=True)
      if agreed['kind'] == 'ok':
        return step_dir, value
      reason = agreed['reason']
      if agreed['kind'] != 'damaged':
        raise CheckpointReadError(
            f'Could not read checkpoint {step_dir} ({reason}); it does not look damaged, '
            'so it was not skipped. Fix the cause and rerun.')
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
  return _first_readable(path, lambda d: (restoring.read_state_metadata(d), restoring.read_json_item(d)), log)[0]


def load_params(step_dir) -> dict:
  """The model parameters of one step as host numpy arrays (opt_state is not read)."""
  step_dir = absolute(step_dir)
  wanted = {'params': restoring.read_state_metadata(step_dir)['params']}
  # This host's read alone: orbax's restore ends in a barrier of every process, which a
  # host whose read failed never reached (it went on to `_first_readable`'s agreement,
  # the others' barrier met it there: gloo aborted both, "collective mismatch").
  alone = ocp.options.MultiprocessingOptions(primary_host=jax.process_index(),
                                             active_processes={jax.process_index()})
  checkpointer = ocp.Checkpointer(ocp.PyTreeCheckpointHandler(multiprocessing_options=alone),
                                  multiprocessing_options=alone)
  restored = checkpointer.restore(step_dir / STATE, args=ocp.args.PyTreeRestore(
      item=wanted,
      # numpy targets: no sharding needed, so any device count can read any checkpoint.
      restore_args=jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), wanted),
      partial_restore=True))
  return restored['params']


def load_pretrained_step(path, log=_warn, step_dirs=None) -> tuple[
    epath.Path, ml_collections.ConfigDict, dict]:
  """(step directory read, training config, BertForMaskedLM params) from a workdir or a
  step directory: export's and GLUE's one way in.

  A workdir gives its newest step whose params restore whole, not only its metadata: a
  step with a truncated array file is skipped with a warning, as the trainer does.
  `params['encoder']` is the encoder that `BertForSequenceClassification` expects under
  `['bert']['encoder']`. Arrays are host numpy, unboxed (no logical-axis metadata).
  On several hosts every process calls it, with process 0's `step_dirs` (`_first_readable`).
  """
  step_dir, params = _first_readable(
      path, lambda d: (restoring.read_json_item(d), load_params(d))[1], log, step_dirs)
  _check_finite(step_dir, params)
  config = read_config(step_dir.parent.parent)
  logging.info('Loaded pre-trained params from %s', step_dir)
  return step_dir, config, params


def _check_finite(step_dir, params) -> None:
  """A DamagedCheckpoint (a sweep's gap) unless every parameter is finite. NaN weights
  fine-tuned with on_nonfinite=skip gave NaN logits, whose argmax scored as a constant
  prediction (a GLUE table of made-up scores); with 'stop', GLUE's error blamed its own
  learning rate; export wrote them as a model."""
  bad = [jax.tree_util.keystr(p) for p, x in jax.tree_util.tree_leaves_with_path(params)
         if not np.all(np.isfinite(x))]
  if not bad:
    return
  earlier = [s for s in finished_steps(step_dir.parent)
             if step_dir.name.isdigit() and s < int(step_dir.name)]
  raise DamagedCheckpoint(
      f'The parameters in {step_dir} are not finite ({len(bad)} arrays hold NaN or '
      f'infinity, e.g. {", ".join(bad[:3])}): that model diverged, and results from it '
      'would be meaningless. Fix: ' + (
          f'--checkpoint={step_dir.parent / str(earlier[-1])} (the newest step before it), '
          'or another step from before the divergence.' if earlier else
          'pass a checkpoint from before the divergence (none is left beside this one).'))


def load_pretrained(path, log=_warn) -> tuple[ml_collections.ConfigDict, dict]:
  """(training config, BertForMaskedLM params): `load_pretrained_step` without the step."""
  _, config, params = load_pretrained_step(path, log)
  return config, params


def with_pretrained_encoder(params: dict, encoder: dict, source='the checkpoint') -> dict:
  """A classifier's params (BertForSequenceClassification: {'bert': {'encoder', 'pooler'},
  'classifier'}) with the encoder replaced by a pre-trained one (`load_pretrained`'s
  params['encoder'], host numpy), as float32; pooler and classifier stay as given (fresh).

  The one place where pre-training's tree meets fine-tuning's. Raises a readable error when
  the encoder's parameters differ from the ones the classifier expects.
  """
  check_encoder(params['bert']['encoder'], encoder, source)
  out = dict(params)
  out['bert'] = dict(params['bert'])
  out['bert']['encoder'] = jax.tree.map(lambda x: np.asarray(x, np.float32), encoder)
  return out


def check_encoder(fresh, encoder: dict, source='the checkpoint') -> None:
  """Raises a readable ValueError unless the pre-trained `encoder` has the parameters
  (paths and shapes) of `fresh`, the encoder its config.json describes (arrays or
  ShapeDtypeStructs: GLUE checks before any output is touched)."""
  want = {jax.tree_util.keystr(p): tuple(x.shape)
          for p, x in jax.tree_util.tree_leaves_with_path(fresh)}
  have = {jax.tree_util.keystr(p): tuple(np.shape(x))
          for p, x in jax.tree_util.tree_leaves_with_path(encoder)}
  if want != have:
    diff = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))
    raise ValueError(f'The encoder in {source} does not match the model its config.json '
                     f'describes ({len(diff)} parameters differ, e.g. {diff[:3]}). Fix: '
                     'pass the workdir this checkpoint was trained in, with the '
                     'config.json it was trained with.')


def check_trained_vocab(step_dir, vocab_file: str, md5: str, fix: str) -> None:
  """Raises ValueError unless `vocab_file` (its md5) is the vocabulary `step_dir` was
  trained on, as the step's input state recorded it: a vocabulary of the same size but
  another order would feed the model ids of other rows, and nothing would fail. A step
  that recorded none (written by an older bert_sym) is not checked."""
  try:
    states = restoring.read_json_item(step_dir).get('states') or [{}]
  except (OSError, ValueError):   # no input state: the restore itself says what is wrong
    return
  trained = states[0].get('vocab_md5') if isinstance(states[0], dict) else None
  if trained and trained != md5:
    raise ValueError(
        f'{vocab_file} (md5 {md5}) is not the vocabulary {step_dir} was trained on (md5 '
        f'{trained}): its ids would index other rows of the embedding table. Fix: {fix}')

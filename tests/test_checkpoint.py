"""bert_sym.checkpoint: config.json round trip, load_pretrained, shape checks, atomic finalize."""

import dataclasses
import errno
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from bert_sym import checkpoint
from bert_sym.checkpoint import locking
from bert_sym.checkpoint import restoring
from bert_sym.checkpoint import saving
from bert_sym import loop
from bert_sym import model as model_lib
from bert_sym import optim
from bert_sym import sharding
from bert_sym import steps
from bert_sym import train
from tests import train_fixtures


def _write_run(workdir, config, step=7):
  """A workdir as the trainer leaves it: config.json + one finished checkpoint."""
  workdir.mkdir(parents=True, exist_ok=True)
  checkpoint.write_config(workdir, config)
  module = model_lib.BertForMaskedLM(config.model)
  params = nn.meta.unbox(module.init(jax.random.key(1), *model_lib.dummy_inputs())['params'])
  state = {'params': params, 'opt_state': optax.adamw(1e-3).init(params),
           'step': np.int32(step), 'rng': jax.random.key_data(jax.random.key(0))}
  manager = checkpoint.make_manager(workdir, config.checkpoint)
  checkpoint.save(manager, step, state, {'index': step}, force=True)
  manager.wait_until_finished()
  manager.close()
  return params


def test_config_json_round_trip(tmp_path):
  config = train_fixtures.tiny_config()
  checkpoint.write_config(tmp_path, config)
  assert checkpoint.read_config(tmp_path).to_dict() == json.loads(config.to_json())
  assert not [p for p in tmp_path.iterdir() if p.name != 'config.json']   # no temp left


_CONFIG_ON_A_FULL_DISK_SCRIPT = """
import resource, signal, sys
import ml_collections
from bert_sym import checkpoint
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # a write past the limit fails (EFBIG)
resource.setrlimit(resource.RLIMIT_FSIZE, (500, resource.RLIM_INFINITY))
try:
  checkpoint.write_config(sys.argv[1], ml_collections.ConfigDict({'seed': 1, 'x': 'y' * 1000}))
except OSError as e:
  print('stopped', e)
"""


def test_a_full_disk_while_config_json_is_rewritten_keeps_the_old_one(tmp_path):
  """Every start rewrites config.json; a disk that fills then (here a 500-byte file size
  limit) must leave the old one, not a cut one the next resume refuses as not JSON."""
  config = train_fixtures.tiny_config()
  checkpoint.write_config(tmp_path, config)
  result = subprocess.run([sys.executable, '-c', _CONFIG_ON_A_FULL_DISK_SCRIPT, str(tmp_path)],
                          capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=os.getcwd()))
  assert 'stopped' in result.stdout, result.stderr[-3000:]
  assert checkpoint.read_config(tmp_path).to_dict() == json.loads(config.to_json())


def test_load_pretrained_from_workdir_and_step_dir(tmp_path):
  config = train_fixtures.tiny_config()
  params = _write_run(tmp_path / 'run', config, step=7)
  for path in (tmp_path / 'run', tmp_path / 'run' / 'checkpoints' / '7'):
    loaded_config, loaded = checkpoint.load_pretrained(str(path))
    assert loaded_config.model.hidden_size == config.model.hidden_size
    assert jax.tree.structure(loaded) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(params)):
      assert isinstance(a, np.ndarray)
      np.testing.assert_array_equal(a, np.asarray(b))
  # The encoder is what GLUE transplants into BertForSequenceClassification.
  glue = model_lib.abstract_params(model_lib.BertForSequenceClassification(config.model, 2))
  assert (jax.tree.map(np.shape, loaded['encoder'])
          == jax.tree.map(lambda a: a.shape, glue['bert']['encoder']))


def test_a_workdir_named_checkpoints_is_read_and_set_aside_like_any_other(tmp_path):
  """--workdir=~/checkpoints: the trainer saves under ~/checkpoints/checkpoints/<step>. The
  readers took the workdir for the checkpoints folder, found no step, and a divergence set
  nothing aside (the rerun resumed the diverged step: a trapped workdir)."""
  from bert_sym import pretrain_loop  # pylint: disable=g-import-not-at-top
  config = train_fixtures.tiny_config()
  workdir = tmp_path / 'checkpoints'
  params = _write_run(workdir, config, step=4)
  _write_run(workdir, config, step=8)
  manager = checkpoint.make_manager(workdir, config.checkpoint)
  assert checkpoint.finished_steps(workdir) == manager.all_steps() == [4, 8]
  assert checkpoint.resolve_step_dir(workdir) == workdir / 'checkpoints' / '8'
  assert checkpoint.finished_steps(workdir / 'checkpoints') == [4, 8]   # the folder itself
  run = types.SimpleNamespace(console=lambda *a: None, last_saved=8, workdir=workdir)
  error = pretrain_loop.set_aside_divergence(
      loop.NonFiniteError('Non-finite loss at step 7.', onset=6), workdir, manager, None, run)
  manager.close()
  assert checkpoint.finished_steps(workdir) == [4] and run.last_saved == 4
  assert 'before the divergence is step 4' in str(error)
  _, loaded = checkpoint.load_pretrained(str(workdir))
  for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, np.asarray(b))


def test_a_workdir_that_is_part_of_another_is_refused_before_anything_is_written(tmp_path):
  """--workdir=<run>/checkpoints or <run>/checkpoints/8: the trainer found no checkpoint
  there, trained from step 0, and wrote its checkpoints/, config.json, metrics.jsonl and
  tensorboard/ inside the old run's folder (or inside a finished step)."""
  config = train_fixtures.tiny_config()
  workdir = tmp_path / 'run'
  _write_run(workdir, config, step=8)
  ckpts = workdir / 'checkpoints'
  for wrong, right in ((ckpts, workdir), (ckpts / '8', workdir)):
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob('*'))
    with pytest.raises(train.RunError, match=rf'^--workdir={wrong} is a .* not a training '
                       rf'workdir.* Fix: .*--workdir={right} to resume it'):
      train._prepare_workdir(str(wrong))  # pylint: disable=protected-access
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob('*')) == before
  # Workdirs stay workdirs: this one, a fresh one, and one named checkpoints.
  for fine in (workdir, tmp_path / 'fresh', tmp_path / 'checkpoints'):
    assert train._prepare_workdir(str(fine)) == fine  # pylint: disable=protected-access
  _write_run(tmp_path / 'checkpoints', config, step=4)
  assert checkpoint.workdir_misplaced(tmp_path / 'checkpoints') is None


@pytest.mark.parametrize('name,folder', [('checkpoints', False), ('tensorboard', False),
                                         ('metrics.jsonl', True), ('config.json', True)])
def test_a_workdir_whose_own_entries_are_blocked_is_refused_at_once(tmp_path, name, folder):
  """A file named checkpoints in the workdir: the run trained to its first save, then
  stopped with "free space or fix the permissions" (a file named tensorboard: a traceback)."""
  blocker = tmp_path / 'run' / name
  if folder:
    blocker.mkdir(parents=True)
  else:
    blocker.parent.mkdir()
    blocker.write_text('not the trainer\'s')
  with pytest.raises(train.RunError, match=rf'^{blocker} is a (file|directory), where the '
                     r'trainer keeps its .* Fix: move it out of the workdir, or pass another'):
    train._prepare_workdir(str(tmp_path / 'run'))  # pylint: disable=protected-access


def test_a_hugging_face_export_as_workdir_is_refused_before_its_config_is_overwritten(
    tmp_path):
  """--workdir=<an hf_export --out_dir>: the trainer wrote its own config.json over the
  export's, which transformers could no longer load (hf_export refuses the other way)."""
  export = tmp_path / 'hf'
  export.mkdir()
  hf_config = '{"architectures": ["BertForMaskedLM"], "model_type": "bert"}\n'
  (export / 'config.json').write_text(hf_config)
  before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob('*'))
  with pytest.raises(train.RunError) as error:
    train._prepare_workdir(str(export))  # pylint: disable=protected-access
  assert str(error.value) == (f"{export / 'config.json'} is a Hugging Face model's "
                              f'config.json: a run in {export} would overwrite it. Fix: pass '
                              'another --workdir.')
  assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob('*')) == before
  assert (export / 'config.json').read_text() == hf_config
  run = tmp_path / 'run'
  _write_run(run, train_fixtures.tiny_config(), step=4)   # a trainer's workdir resumes
  assert train._prepare_workdir(str(run)) == run  # pylint: disable=protected-access


def test_params_that_turn_nonfinite_at_a_save_keep_the_checkpoint_before(tmp_path):
  """The update of step 6 overflows the params while its loss was finite: step 6 is not
  saved, and step 5 (whose params gave that finite loss) is good and stays. Before, the
  divergence was dated step 6, and the checkpoints from step 5 on were set aside."""
  from bert_sym import pretrain_loop  # pylint: disable=g-import-not-at-top
  config = train_fixtures.tiny_config()
  for step in (4, 5):
    params = _write_run(tmp_path, config, step=step)
  manager = checkpoint.make_manager(tmp_path, config.checkpoint)
  run = types.SimpleNamespace(console=lambda *a: None, last_saved=5, workdir=tmp_path,
                              writer=None)
  meter = pretrain_loop.make_meter(config, latest=5)
  hooks = pretrain_loop.make_hooks(config, run, manager, None, meter, lambda: {})
  overflowed = jax.tree.map(lambda x: np.full_like(x, np.inf), params)
  with pytest.raises(loop.NonFiniteError) as raised:
    hooks.save({'params': overflowed}, 6)
  error = pretrain_loop.set_aside_divergence(raised.value, tmp_path, manager, None, run)
  manager.close()
  assert checkpoint.finished_steps(tmp_path) == [4, 5] and run.last_saved == 5
  assert 'before the divergence is step 5' in str(error)


def test_load_pretrained_clear_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match='does not exist'):
    checkpoint.load_pretrained(str(tmp_path / 'nope'))
  with pytest.raises(FileNotFoundError, match='No finished checkpoint'):
    checkpoint.load_pretrained(str(tmp_path))
  config = train_fixtures.tiny_config()
  _write_run(tmp_path / 'run', config)
  (tmp_path / 'run' / 'config.json').unlink()
  with pytest.raises(FileNotFoundError, match='config.json'):
    checkpoint.load_pretrained(str(tmp_path / 'run'))


def test_glue_and_export_refuse_params_that_are_not_finite_and_name_the_step_before(tmp_path):
  """A checkpoint holding NaN (written by orbax itself here): GLUE with on_nonfinite=skip
  presented a constant prediction's scores as results, export wrote the NaN model."""
  config = train_fixtures.tiny_config()
  workdir = tmp_path / 'run'
  params = _write_run(workdir, config, step=4)
  _write_run(workdir, config, step=8)
  state_dir = workdir / 'checkpoints' / '8' / checkpoint.STATE
  train_fixtures.make_params_nonfinite(state_dir.parent)
  for path in (workdir, state_dir.parent):
    with pytest.raises(checkpoint.DamagedCheckpoint,
                       match=rf'checkpoints/8 are not finite .* Fix: --checkpoint=\S*'
                             rf'checkpoints/4 \(the newest step before it\)'):
      checkpoint.load_pretrained(str(path))
  _, loaded = checkpoint.load_pretrained(str(workdir / 'checkpoints' / '4'))
  for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, np.asarray(b))


def test_plain_orbax_reads_a_checkpoint(tmp_path, caplog):
  """The README snippet: no project code, numpy restore (any device count), and the one
  warning of orbax's the README explains."""
  params = _write_run(tmp_path, train_fixtures.tiny_config(), step=3)
  path = tmp_path / 'checkpoints' / '3' / 'state'
  ckptr = ocp.PyTreeCheckpointer()
  with caplog.at_level(logging.WARNING):
    tree = ckptr.metadata(path).item_metadata.tree
    state = ckptr.restore(path, args=ocp.args.PyTreeRestore(
        restore_args=jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)))
  assert {r.getMessage().split(':')[0] for r in caplog.records
          if r.levelno >= logging.WARNING} == {'Metadata file does not exist'}
  assert int(state['step']) == 3
  np.testing.assert_array_equal(state['params']['encoder']['embeddings']['word_embeddings']
                                ['embedding'], params['encoder']['embeddings']
                                ['word_embeddings']['embedding'])
  # The data iterator position is a JSON file.
  data = json.loads((tmp_path / 'checkpoints' / '3' / 'data_iter' / 'metadata').read_text())
  assert data == {'process_count': 1, 'states': [{'index': 3}]}


def test_shape_mismatch_names_the_parameter(tmp_path):
  _write_run(tmp_path, train_fixtures.tiny_config())
  other = train_fixtures.tiny_config(model__mlp_dim=48)
  abstract = model_lib.abstract_params(model_lib.BertForMaskedLM(other.model))
  saved = checkpoint.read_state_metadata(tmp_path / 'checkpoints' / '7')
  with pytest.raises(checkpoint.IncompatibleCheckpoint,
                     match=r'(?s)intermediate/kernel.*model\.\*.*another config'):
    checkpoint.check_compatible({'params': saved['params']}, {'params': abstract}, tmp_path)


def test_unfinished_save_is_invisible(tmp_path):
  """A save killed before orbax's finalize leaves only a tmp dir, which is ignored."""
  config = train_fixtures.tiny_config()
  _write_run(tmp_path, config, step=4)
  tmp = tmp_path / 'checkpoints' / '8.orbax-checkpoint-tmp-1234'
  (tmp / 'state').mkdir(parents=True)
  (tmp / 'state' / 'garbage').write_text('half a write')
  assert checkpoint.resolve_step_dir(tmp_path).name == '4'
  manager = checkpoint.make_manager(tmp_path, config.checkpoint)
  assert manager.latest_step() == 4
  manager.close()


def test_a_writers_manager_has_removed_unfinished_steps_when_it_returns(tmp_path, monkeypatch):
  """orbax's start-up removal of temporary steps ran in a thread of its own: the trainer's
  fall-back past a damaged step opened a second manager while the first one's removal ran,
  and both removing the same files failed the run's first save (FileNotFoundError)."""
  from orbax.checkpoint._src.path import async_path  # pylint: disable=g-import-not-at-top
  unfinished = checkpoint.checkpoint_dir(tmp_path) / '8.orbax-checkpoint-tmp-1234'
  (unfinished / 'state').mkdir(parents=True)
  rmtree = async_path.rmtree

  async def slow_rmtree(*args, **kwargs):   # a removal that takes a while (a slow disk)
    time.sleep(0.5)
    return await rmtree(*args, **kwargs)
  monkeypatch.setattr(async_path, 'rmtree', slow_rmtree)
  manager = checkpoint.make_manager(tmp_path)
  assert not unfinished.exists()
  manager.close()


def test_finished_steps_ignores_unfinalized_steps(tmp_path, monkeypatch):
  """Local: a tmp-suffixed step is skipped. gs://-style: a step without commit_success.txt."""
  config = train_fixtures.tiny_config()
  _write_run(tmp_path, config, step=4)
  assert checkpoint.finished_steps(tmp_path) == [4]
  assert checkpoint.finished_steps(tmp_path / 'checkpoints') == [4]
  assert checkpoint.finished_steps(tmp_path / 'nowhere') == []
  # Local: an interrupted save keeps its tmp suffix (and is not a digit name).
  (tmp_path / 'checkpoints' / '8.orbax-checkpoint-tmp-1234' / 'state').mkdir(parents=True)
  assert checkpoint.finished_steps(tmp_path) == [4]

  # gs://: orbax writes straight into checkpoints/<step>/ and finalizes with a commit file.
  # Make orbax treat this local dir as GCS so its CommitFileTemporaryPath check applies.
  from orbax.checkpoint._src.path import gcs_utils  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(gcs_utils, 'is_gcs_path', lambda _: True)
  (tmp_path / 'checkpoints' / '4' / 'commit_success.txt').write_text('done')
  unfinished = tmp_path / 'checkpoints' / '12'
  (unfinished / 'state').mkdir(parents=True)
  (unfinished / 'state' / 'garbage').write_text('half a write')
  assert checkpoint.finished_steps(tmp_path) == [4]
  assert checkpoint.resolve_step_dir(tmp_path).name == '4'
  with pytest.raises(FileNotFoundError, match='not finalized'):
    checkpoint.resolve_step_dir(unfinished)
  (unfinished / 'commit_success.txt').write_text('done')
  assert checkpoint.finished_steps(tmp_path) == [4, 12]


def test_echoes_of_a_failed_orbax_read_are_muted_only_around_restores(monkeypatch):
  """After a damaged checkpoint, orbax's cancelled reads print as "Exception ignored"
  (sys.unraisablehook); inside a restore those are dropped, anything else still reaches
  the old hook, and the old hook is back afterwards: as it was after a restore without
  a failed read; after one, still dropping the TensorStore callbacks into the closed loop
  (they landed in a later test of a loaded CI run: a warning)."""
  seen = []
  monkeypatch.setattr(sys, 'unraisablehook', seen.append)
  with checkpoint.quiet_orbax_echoes():
    pass
  assert sys.unraisablehook == seen.append
  unraisable = lambda obj, error: types.SimpleNamespace(
      object=obj, exc_value=error, exc_traceback=None, exc_type=type(error), err_msg=None)
  orbax_echo = unraisable('<coroutine object orbax.checkpoint._src.read>', ValueError('x'))
  closed_loop = unraisable(None, RuntimeError('Event loop is closed'))
  other = unraisable('<function mine>', ValueError('a real problem'))
  with checkpoint.quiet_orbax_echoes():
    for item in (orbax_echo, closed_loop, other):
      sys.unraisablehook(item)
    assert seen == [other]
    try:   # a traceback through an orbax file counts too
      exec(compile('raise ValueError("in orbax")', '/site-packages/orbax/x.py', 'exec'))
    except ValueError as e:
      through_orbax = unraisable(None, e)
      through_orbax.exc_traceback = e.__traceback__
    sys.unraisablehook(through_orbax)
    assert seen == [other]
  for item in (orbax_echo, closed_loop, other):
    sys.unraisablehook(item)
  assert seen == [other, orbax_echo, other]


def test_only_a_failure_pays_for_the_collection_of_its_echoes(tmp_path, monkeypatch):
  """The echoes are cancelled reads, found by a full gc.collect: 0.1-0.7 s in a process
  that imported TF, once per checkpoint GLUE or export reads. A clean read leaves none
  and collects nothing; a failed read (classified by failure_kind) or an error leaving the
  block still collects."""
  from bert_sym.checkpoint import echoes  # pylint: disable=g-import-not-at-top
  collected = []
  monkeypatch.setattr(echoes.gc, 'collect', lambda: collected.append(1))
  manager = checkpoint.make_manager(tmp_path)
  checkpoint.save(manager, 4, {'x': np.arange(4, dtype=np.float32)}, {'index': 4}, force=True)
  manager.wait_until_finished()
  manager.close()
  assert checkpoint.resolve_step_dir(tmp_path).name == '4'
  assert not collected
  (tmp_path / 'checkpoints' / '4' / 'state' / '_METADATA').unlink()
  with pytest.raises(checkpoint.DamagedCheckpoint):
    checkpoint.resolve_step_dir(tmp_path)
  assert collected
  collected.clear()
  with pytest.raises(OSError):
    with checkpoint.quiet_orbax_echoes():
      raise OSError('a save failed')
  assert collected


# ---------------------------------------------------------------------------------------
# Rotation: keep_last / keep_every as orbax has them, and never the newest good checkpoint.
# ---------------------------------------------------------------------------------------

def _save_each(manager, steps_to_save, before_each=lambda step: None):
  for step in steps_to_save:
    before_each(step)
    checkpoint.save(manager, step, {'x': np.full(3, step, np.float32)}, {'index': step},
                    force=True)
  manager.wait_until_finished()
  kept = manager.all_steps()
  manager.close()
  return sorted(kept)


@pytest.mark.parametrize('keep_last,keep_every', [(2, 0), (1, 4), (3, 5), (0, 0), (0, 3)])
def test_rotation_keeps_what_orbax_own_options_keep(tmp_path, keep_last, keep_every):
  """make_manager states keep_last/keep_every as an explicit preservation policy (to add
  KeepNewestGood): it must keep exactly what orbax's max_to_keep/keep_period keep."""
  ckpt = types.SimpleNamespace(keep_last=keep_last, keep_every=keep_every, async_save=False)
  ours = _save_each(checkpoint.make_manager(tmp_path / 'ours', ckpt), range(1, 13))
  reference = ocp.CheckpointManager(
      tmp_path / 'orbax' / 'checkpoints', item_names=(checkpoint.STATE, checkpoint.DATA_ITER),
      options=ocp.CheckpointManagerOptions(max_to_keep=keep_last or None,
                                           keep_period=keep_every or None))
  assert ours == _save_each(reference, range(1, 13))


_KILLED_WHILE_ROTATING = """
import os, signal, sys, types
import numpy as np
from etils import epath
from bert_sym import checkpoint
manager = checkpoint.make_manager(
    sys.argv[1], types.SimpleNamespace(keep_last=1, keep_every=0, async_save=False))
checkpoint.save(manager, 1, {'x': np.ones(3, np.float32)}, {'index': 1}, force=True)
checkpoint.finish_saves(manager)

def remove_one_file_then_die(self, *args, **kwargs):   # a kill in the middle of a deletion
  os.remove(min(os.path.join(d, f) for d, _, names in os.walk(self) for f in names))
  os.kill(os.getpid(), signal.SIGKILL)

type(epath.Path(sys.argv[1])).rmtree = remove_one_file_then_die
checkpoint.save(manager, 2, {'x': np.ones(3, np.float32)}, {'index': 2}, force=True)
checkpoint.finish_saves(manager)
"""


def test_a_kill_while_rotation_removes_a_step_leaves_no_half_deleted_step(tmp_path):
  """keep_last=1: saving step 2 removes step 1. Killed half way through that removal, step
  1 was still listed as finished with files missing (what `--checkpoint=.../1` or a GLUE
  sweep then read). Rotation moves a step out of the listing before removing it."""
  child = subprocess.run([sys.executable, '-c', _KILLED_WHILE_ROTATING, str(tmp_path)],
                         capture_output=True, text=True, timeout=300, check=False)
  assert child.returncode == -signal.SIGKILL, child.stderr[-3000:]
  assert checkpoint.finished_steps(tmp_path) == [2]
  assert sorted(p.name for p in (tmp_path / 'checkpoints').iterdir()
                if not p.name.startswith('.')) == ['2']
  # The rerun's manager removes what the killed rotation left; its own rotation leaves none.
  manager = checkpoint.make_manager(
      tmp_path, types.SimpleNamespace(keep_last=1, keep_every=0, async_save=False))
  assert not (tmp_path / 'checkpoints' / checkpoint.ROTATED_OUT).exists()
  checkpoint.save(manager, 3, {'x': np.ones(3, np.float32)}, {'index': 3}, force=True)
  checkpoint.finish_saves(manager)
  manager.close()
  assert sorted(p.name for p in (tmp_path / 'checkpoints').iterdir()) == ['3']


def test_a_rotated_out_step_that_cannot_be_removed_does_not_stop_the_run(tmp_path,
                                                                        monkeypatch, caplog):
  """Removing `.rotated-out` runs before each save: a file there held open on NFS (EBUSY)
  stopped the run with "Saving checkpoint step N ... failed", N never attempted. It is out
  of the listing already: a warning, and the save goes on."""
  manager = checkpoint.make_manager(
      tmp_path, types.SimpleNamespace(keep_last=1, keep_every=0, async_save=False))
  for step in (1, 2):   # saving 2 moves 1 out
    checkpoint.save(manager, step, {'x': np.ones(3, np.float32)}, {'index': step}, force=True)

  def busy(self, *args, **kwargs):
    raise OSError(errno.EBUSY, 'Device or resource busy', str(self / '.nfs000123'))
  monkeypatch.setattr(type(checkpoint.checkpoint_dir(tmp_path)), 'rmtree', busy)
  with caplog.at_level(logging.WARNING):
    checkpoint.save(manager, 3, {'x': np.ones(3, np.float32)}, {'index': 3}, force=True)
    checkpoint.finish_saves(manager)
  manager.close()
  assert checkpoint.finished_steps(tmp_path) == [3]
  assert any('Could not remove' in r.getMessage() for r in caplog.records)


def test_removing_a_failed_saves_files_while_its_writes_still_run_is_no_traceback(
    tmp_path, monkeypatch):
  """A failed async save's writes, still running, recreated a file while its temporary
  step was removed: rmtree's ENOTEMPTY was a traceback over the one-line error (CI, once,
  test_one_hosts_failed_save_stops_every_host_in_one_line[True])."""
  # Not a real manager: its start-up removes temporary steps in a background thread, which
  # raced this test's mkdir (CI, once). remove_unfinished_steps reads only .directory.
  manager = types.SimpleNamespace(directory=checkpoint.checkpoint_dir(tmp_path))
  (manager.directory / '8.orbax-checkpoint-tmp-1234' / 'state' / 'd').mkdir(parents=True)
  path_type, real_rmtree, calls = type(manager.directory), type(manager.directory).rmtree, []

  def racing(self, *args, **kwargs):
    calls.append(self)
    if len(calls) == 1:
      raise OSError(errno.ENOTEMPTY, 'Directory not empty', 'd')
    return real_rmtree(self, *args, **kwargs)
  monkeypatch.setattr(path_type, 'rmtree', racing)
  monkeypatch.setattr(saving.time, 'sleep', lambda seconds: None)
  saving.remove_unfinished_steps(manager)
  assert len(calls) >= 2 and not list(manager.directory.glob('*.orbax-checkpoint-tmp*'))


def test_rotation_keeps_the_newest_checkpoint_the_step_health_calls_good(tmp_path):
  """keep_last=1, a save every 2 steps, a loss spike from step 7: checkpoint 6 made the
  spiking loss of step 7, so 4 is the newest good one and must outlive the rotation."""
  health = loop.StepHealth('stop')
  keep_good = checkpoint.KeepNewestGood()
  keep_good.good_below = health.good_below
  ckpt = types.SimpleNamespace(keep_last=1, keep_every=0, async_save=False)
  losses = {s: 5.0 for s in range(1, 7)} | {s: 100.0 for s in range(7, 13)}
  observed = []

  def observe_up_to(step):   # the loop judges every step before it saves
    for s in range(len(observed) + 1, step + 1):
      health.observe(s, {'train/finite': True, 'train/loss': losses[s]})
      observed.append(s)

  manager = checkpoint.make_manager(tmp_path, ckpt, keep_good=keep_good)
  assert _save_each(manager, [2, 4, 6], observe_up_to) == [4, 6]   # 6 is not judged yet
  manager = checkpoint.make_manager(tmp_path, ckpt, keep_good=keep_good)
  assert _save_each(manager, [8, 10, 12], observe_up_to) == [4, 12]
  assert health.onset == 7 and health.good_below() == 6


def test_a_spike_then_divergence_leaves_the_newest_good_checkpoint_to_resume(tmp_path,
                                                                            monkeypatch):
  """Through the trainer, keep_last=1: the real step, whose reported loss is 100x from
  step 7 on and NaN at step 11. Orbax alone keeps only step 10, which the divergence sets
  aside, and the rerun would start from step 0; the run must point to step 4 and keep it."""
  real_build = train.build_mlm_step

  def spiking_step(config, mesh):
    mlm = real_build(config, mesh)

    @jax.jit
    def train_step(state, batch):
      state, metrics = mlm.train_step(state, batch)
      step = state['step']
      loss = jnp.where(step >= 7, 100.0, 1.0) * metrics['train/loss']
      finite = jnp.where(step == 11, 0.0, metrics['train/finite'])
      return state, dict(metrics, **{'train/loss': jnp.where(step == 11, jnp.nan, loss),
                                     'train/finite': finite})
    return dataclasses.replace(mlm, train_step=train_step)

  monkeypatch.setattr(train, 'build_mlm_step', spiking_step)
  config = train_fixtures.tiny_config(total_steps=16, log_every_steps=2, eval_every_steps=16,
                                      checkpoint__every_steps=2, checkpoint__keep_last=1)
  with pytest.raises(loop.NonFiniteError) as error:
    train.train_and_evaluate(config, str(tmp_path),
                             make_iterator=train_fixtures.make_synthetic_iterator)
  assert error.value.onset == 7
  assert 'Non-finite loss or gradient at step 11' in str(error.value)
  assert 'The newest checkpoint from before the divergence is step 4' in str(error.value)
  assert checkpoint.finished_steps(tmp_path) == [4]
  assert [p.name.split('-')[0] for p in (tmp_path / 'damaged_checkpoints').iterdir()] == ['10']
  # The steps rotation moved out (2, 6, 8) are gone too, however the run ended.
  assert [p.name for p in (tmp_path / 'checkpoints').iterdir()] == ['4']


# ---------------------------------------------------------------------------------------
# Restore rules (checkpoint.restore_latest): corruption is set aside, nothing else is.
# ---------------------------------------------------------------------------------------

def _trainer_spec(config):
  """The state the trainer builds for `config` (its optimizer included)."""
  mesh, rules = sharding.make_mesh(config.mesh), sharding.logical_rules(config)
  model = model_lib.BertForMaskedLM(config.model)
  tx, _ = optim.make_optimizer(config.optimizer, config.total_steps)
  seq_len = config.data.max_seq_len
  return steps.create_state(
      lambda key: model.init(key, *model_lib.dummy_inputs(1, seq_len))['params'],
      tx, mesh, rules)


@pytest.fixture(scope='module')
def trainer_run(tmp_path_factory):
  """A workdir as the trainer leaves it: config.json, steps 4 and 8, metrics.jsonl."""
  workdir = tmp_path_factory.mktemp('trainer_run')
  config = train_fixtures.tiny_config()
  spec = _trainer_spec(config)
  state = spec.init(jax.random.key(0), jax.random.key(1))
  checkpoint.write_config(workdir, config)
  manager = checkpoint.make_manager(workdir, config.checkpoint)
  for step in (4, 8):
    checkpoint.save(manager, step, state, {'index': step}, force=True)
  manager.wait_until_finished()
  manager.close()
  (workdir / 'metrics.jsonl').write_text(''.join(
      json.dumps({'step': s, 'train/loss': 7.0 - s / 10}) + '\n' for s in range(1, 9)))
  return workdir, config, spec


def _copy(trainer_run, tmp_path):
  workdir, config, spec = trainer_run
  shutil.copytree(workdir, tmp_path / 'run')
  return tmp_path / 'run', config, spec


def _restore(workdir, run_config, spec, **kwargs):
  manager, step, state, data, _ = checkpoint.restore_latest(
      workdir, run_config.checkpoint, spec.abstract, log=print, **kwargs)
  manager.close()
  return step, state, data


def _layout(workdir):
  damaged = workdir / checkpoint.DAMAGED_DIR
  return (checkpoint.finished_steps(workdir),
          sorted(p.name.split('-')[0] for p in damaged.iterdir()) if damaged.exists() else [])


def test_optimizer_state_change_is_a_readable_error_and_moves_nothing(tmp_path, trainer_run):
  """grad_clip_norm 1.0 -> 0 drops optax's clipping state: the params still match, the
  optimizer state does not. Before: every step was quarantined and the run restarted."""
  workdir, config, _ = _copy(trainer_run, tmp_path)
  changed = train_fixtures.tiny_config(optimizer__grad_clip_norm=0.0)
  with pytest.raises(checkpoint.IncompatibleCheckpoint) as error:
    _restore(workdir, changed, _trainer_spec(changed))
  message = str(error.value)
  assert 'opt_state/' in message and 'optimizer.grad_clip_norm' in message, message
  assert _layout(workdir) == ([4, 8], [])
  # Given the config, the keys that changed since config.json are named too.
  with pytest.raises(checkpoint.IncompatibleCheckpoint,
                     match=r'optimizer.grad_clip_norm=1.0 in its config.json, 0.0 now\. Fix: '
                           r'rerun with --config.optimizer.grad_clip_norm=1.0 to resume it'):
    _restore(workdir, changed, _trainer_spec(changed), config=changed)
  assert _layout(workdir) == ([4, 8], [])


def _failing_reads(monkeypatch, failures):
  """CheckpointManager.restore raises OSError `failures` times, then reads for real."""
  calls = []
  original = ocp.CheckpointManager.restore

  def restore(self, *args, **kwargs):
    calls.append(args)
    if len(calls) <= failures:
      raise OSError(5, 'Input/output error (simulated storage hiccup)')
    return original(self, *args, **kwargs)
  monkeypatch.setattr(ocp.CheckpointManager, 'restore', restore)
  monkeypatch.setattr(checkpoint.restoring, 'BACKOFF_SECONDS', 0.01)
  return calls


def test_transient_read_error_is_retried_and_resumes_newest(tmp_path, trainer_run,
                                                            monkeypatch):
  workdir, config, spec = _copy(trainer_run, tmp_path)
  calls = _failing_reads(monkeypatch, failures=2)
  slept = []   # the waits, as the defaults have them (2 s, doubling), not waited here
  monkeypatch.setattr(checkpoint.restoring, 'BACKOFF_SECONDS', 2.0)
  monkeypatch.setattr(checkpoint.restoring, 'time', types.SimpleNamespace(
      sleep=slept.append, time=time.time))
  step, state, data = _restore(workdir, config, spec)
  assert step == 8 and data == {'index': 8} and len(calls) == 3
  assert slept == [2.0, 4.0]
  assert _layout(workdir) == ([4, 8], [])


def test_a_reader_retries_a_storage_error_then_names_it_in_one_line(tmp_path, trainer_run,
                                                                   monkeypatch):
  """GLUE's and export's read (load_pretrained): a transient error on every attempt is
  retried READ_ATTEMPTS times, then said as itself; nothing is skipped or moved."""
  workdir, _, _ = _copy(trainer_run, tmp_path)
  calls = []

  def failing(step_dir):
    calls.append(step_dir)
    raise OSError(5, 'Input/output error (simulated storage hiccup)')
  monkeypatch.setattr(checkpoint.restoring, 'read_json_item', failing)
  monkeypatch.setattr(checkpoint.restoring, 'BACKOFF_SECONDS', 0.0)
  with pytest.raises(checkpoint.CheckpointReadError) as error:
    checkpoint.load_pretrained(workdir)
  message = str(error.value)
  assert 'Input/output error' in message and 'does not look damaged' in message, message
  assert len(calls) == checkpoint.READ_ATTEMPTS and set(calls) == {workdir / 'checkpoints' / '8'}
  assert _layout(workdir) == ([4, 8], [])


def test_persistent_read_error_stops_moves_nothing_keeps_metrics(tmp_path, trainer_run,
                                                                 monkeypatch):
  """Through the trainer: one readable line, the checkpoints and metrics.jsonl as they were."""
  workdir, config, _ = _copy(trainer_run, tmp_path)
  metrics_before = (workdir / 'metrics.jsonl').read_text()
  _failing_reads(monkeypatch, failures=10**6)
  hooks_before = (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM),
                  sys.unraisablehook, sys.excepthook)
  with pytest.raises(train.RunError) as error:
    train.train_and_evaluate(config, str(workdir),
                             make_iterator=train_fixtures.make_synthetic_iterator)
  # The process is left as it was found (a notebook keeps its own Ctrl-C and hooks).
  assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM),
          sys.unraisablehook, sys.excepthook) == hooks_before
  message = str(error.value)
  assert '\n' not in message and 'OSError' in message and 'nothing was moved' in message
  assert f'after {checkpoint.READ_ATTEMPTS} attempts' in message, message
  assert _layout(workdir) == ([4, 8], [])
  assert (workdir / 'metrics.jsonl').read_text() == metrics_before
  assert not (workdir / checkpoint.LOCK_FILE).exists()   # released on the way out


def test_a_storage_error_is_retried_three_times_after_2_4_and_8_seconds(tmp_path, trainer_run,
                                                                       monkeypatch):
  """The README's failure table, as it counts: 3 retries, 2, 4 and 8 s apart, then one
  line, for the trainer's restore and for GLUE's and export's read alike. (The tests
  above count READ_ATTEMPTS, whatever it is, or stop after two failures.)"""
  workdir, config, spec = _copy(trainer_run, tmp_path)
  calls = _failing_reads(monkeypatch, failures=10**6)
  monkeypatch.setattr(checkpoint.restoring, 'BACKOFF_SECONDS', 2.0)
  slept = []   # the waits, not waited here
  fake_time = types.SimpleNamespace(sleep=slept.append, time=time.time)
  monkeypatch.setattr(checkpoint.restoring, 'time', fake_time)
  monkeypatch.setattr(checkpoint.pretrained, 'time', fake_time)
  with pytest.raises(checkpoint.CheckpointReadError, match='after 4 attempts'):
    _restore(workdir, config, spec)
  assert len(calls) == 4 and slept == [2.0, 4.0, 8.0]
  slept.clear()
  calls.clear()

  def failing(step_dir):   # the first read of load_pretrained
    calls.append(step_dir)
    raise OSError(5, 'Input/output error (simulated storage hiccup)')
  monkeypatch.setattr(checkpoint.restoring, 'read_json_item', failing)
  with pytest.raises(checkpoint.CheckpointReadError, match='Input/output error'):
    checkpoint.load_pretrained(workdir)
  assert len(calls) == 4 and slept == [2.0, 4.0, 8.0]
  assert _layout(workdir) == ([4, 8], [])


def _truncate_arrays(step_dir):
  for f in (step_dir / 'state').rglob('d/*'):
    f.write_bytes(f.read_bytes()[:f.stat().st_size // 2])


def test_truncated_newest_step_is_set_aside_and_previous_restored(tmp_path, trainer_run,
                                                                  capsys):
  workdir, config, spec = _copy(trainer_run, tmp_path)
  _truncate_arrays(workdir / 'checkpoints' / '8')
  step, _, data = _restore(workdir, config, spec)
  assert step == 4 and data == {'index': 4}
  assert _layout(workdir) == ([4], ['8'])
  out = capsys.readouterr()
  assert 'checkpoint step 8 cannot be restored (ValueError: OUT_OF_RANGE' in out.out
  assert 'Traceback' not in out.out + out.err and 'never retrieved' not in out.out + out.err


def test_every_step_damaged_stops_unless_start_over(tmp_path, trainer_run):
  workdir, config, spec = _copy(trainer_run, tmp_path)
  _truncate_arrays(workdir / 'checkpoints' / '8')
  (workdir / 'checkpoints' / '4' / 'state' / '_METADATA').unlink()
  with pytest.raises(checkpoint.NothingRestored, match=r'--start_over'):
    _restore(workdir, config, spec)
  assert _layout(workdir) == ([], ['4', '8'])
  with pytest.raises(checkpoint.NothingRestored):   # a rerun still refuses
    _restore(workdir, config, spec)
  assert _restore(workdir, config, spec, start_over=True) == (None, None, None)
  # The steps stay, acknowledged: a rerun before the new run's first save (a requeued job)
  # starts from step 0 instead of refusing again.
  assert sorted(p.name.split('-')[0] for p in (workdir / 'damaged_checkpoints').iterdir()
                if p.name.endswith('-started-over')) == ['4', '8']
  assert _restore(workdir, config, spec) == (None, None, None)


def _garble(path):
  path.write_bytes(b'\x00\xffnot what was written')


@pytest.mark.parametrize('damage', [
    lambda step_dir: (step_dir / 'data_iter' / 'metadata').write_text('{"index": 8'),
    # JSON of another shape: before, a KeyError the trainer called "does not look damaged",
    # refusing to start instead of falling back to step 4.
    lambda step_dir: (step_dir / 'data_iter' / 'metadata').write_text('{}'),
    lambda step_dir: (step_dir / 'data_iter' / 'metadata').write_text(
        '{"process_count": 2, "states": [{"index": 8}]}'),
    lambda step_dir: [_garble(f) for f in (step_dir / 'state').rglob('manifest.ocdbt')],
    lambda step_dir: _garble(step_dir / 'state' / '_METADATA'),
], ids=['data_iter_not_json', 'data_iter_empty_object', 'data_iter_states_short',
        'manifest_unreadable', 'METADATA_unreadable'])
def test_unreadable_metadata_sets_the_step_aside(tmp_path, trainer_run, capsys, damage):
  """The README's first failure row, for damage to the small files rather than the arrays:
  the step moves to damaged_checkpoints/ with the warning, the previous one restores."""
  workdir, config, spec = _copy(trainer_run, tmp_path)
  newest = workdir / 'checkpoints' / '8'
  assert damage(newest) != []   # the file to damage exists in this orbax's layout
  step, _, data = _restore(workdir, config, spec)
  assert step == 4 and data == {'index': 4}
  assert _layout(workdir) == ([4], ['8'])
  out = capsys.readouterr()
  assert 'checkpoint step 8 cannot be restored' in out.out, out.out
  assert 'Traceback' not in out.out + out.err


@pytest.mark.parametrize('damage', ['truncated_arrays', 'missing_METADATA'])
def test_readers_fall_back_to_the_previous_step_with_the_warning(tmp_path, trainer_run,
                                                                 capsys, damage):
  """Export's and GLUE's loading (load_pretrained, resolve_step_dir): as the trainer, but
  read-only (nothing moved). Before: AttributeError 'NoneType' has no attribute 'tree'."""
  workdir, _, _ = _copy(trainer_run, tmp_path)
  newest = workdir / 'checkpoints' / '8'
  if damage == 'truncated_arrays':
    _truncate_arrays(newest)
  else:
    (newest / 'state' / '_METADATA').unlink()
  assert checkpoint.resolve_step_dir(workdir).name == '4'
  from bert_sym.glue import finetune  # pylint: disable=g-import-not-at-top
  assert finetune.load_pretrained_encoder(workdir).step == 4   # GLUE's way in
  _, params = checkpoint.load_pretrained(workdir)      # export's way in
  assert params['encoder']['layer_0']['attention']['pairwise'].shape == (2, 16, 16)
  err = capsys.readouterr().err
  assert 'WARNING: checkpoint step 8 cannot be restored' in err and 'Trying the previous' in err
  assert 'Traceback' not in err and 'never retrieved' not in err
  assert _layout(workdir) == ([4, 8], [])
  with pytest.raises(checkpoint.DamagedCheckpoint, match='is damaged'):
    checkpoint.load_pretrained(newest)   # a step named explicitly is not replaced


def test_second_trainer_on_a_live_workdir_stops(tmp_path):
  """The lock holds host and pid; a live holder stops the second trainer, a dead one on
  this host is taken over."""
  lock = tmp_path / checkpoint.LOCK_FILE
  with checkpoint.workdir_lock(tmp_path):
    holder = json.loads(lock.read_text())
    assert holder['pid'] == os.getpid() and holder['host'] == socket.gethostname()
    with pytest.raises(checkpoint.WorkdirBusy, match=f'pid {os.getpid()} on'):
      with checkpoint.workdir_lock(tmp_path):
        pass
    assert json.loads(lock.read_text()) == holder   # the holder's lock untouched
  assert not lock.exists()
  dead = subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'],
                        capture_output=True, text=True, check=True)
  lock.write_text(json.dumps({'host': socket.gethostname(), 'pid': int(dead.stdout)}))
  said = []
  with checkpoint.workdir_lock(tmp_path, log=said.append):
    assert json.loads(lock.read_text())['pid'] == os.getpid()
  assert said and 'no longer running' in said[0]
  # A container restarted after a SIGKILL often gets the same pid and hostname: the lock
  # left by its earlier life names our pid but is not one this process holds.
  lock.write_text(json.dumps({'host': socket.gethostname(), 'pid': os.getpid()}))
  said.clear()
  with checkpoint.workdir_lock(tmp_path, log=said.append):
    assert lock.exists()
  assert said and 'taking over' in said[0] and not lock.exists()


def test_a_killed_holders_lock_is_taken_over_and_a_live_ones_is_not(tmp_path):
  """Another process holds the lock: a second trainer stops naming its pid. SIGKILLed, it
  cannot release the lock file, but the kernel releases the lock: taken over."""
  code = ('import sys, time; from bert_sym import checkpoint\n'
          'with checkpoint.workdir_lock(sys.argv[1]):\n'
          '  print("held", flush=True); time.sleep(300)\n')
  holder = subprocess.Popen([sys.executable, '-c', code, str(tmp_path)], cwd=train_fixtures.REPO_ROOT,
                            env=dict(os.environ, JAX_PLATFORMS='cpu'), stdout=subprocess.PIPE,
                            text=True)
  try:
    assert holder.stdout.readline().strip() == 'held'
    with pytest.raises(checkpoint.WorkdirBusy, match=f'pid {holder.pid} on'):
      with checkpoint.workdir_lock(tmp_path):
        pass
  finally:
    holder.kill()
    holder.wait()
  said = []
  with checkpoint.workdir_lock(tmp_path, log=said.append):
    assert json.loads((tmp_path / checkpoint.LOCK_FILE).read_text())['pid'] == os.getpid()
  assert said and f'pid {holder.pid} on' in said[0] and 'no longer running' in said[0]


@pytest.mark.parametrize('then', ['nobody_takes_it', 'a_third_trainer_takes_it'])
def test_a_lock_released_while_we_are_taking_it(tmp_path, monkeypatch, then):
  """The holder releases (unlinks) the lock file between our open and our lock: we then
  lock a deleted file. Taking that for the lock let two trainers run (we and whoever took
  the fresh file); before, the vanished file raised FileNotFoundError with the wrong fix."""
  import fcntl  # pylint: disable=g-import-not-at-top
  path = str(tmp_path / checkpoint.LOCK_FILE)
  holder_fd = os.open(path, os.O_CREAT | os.O_RDWR)   # another open file: another holder
  fcntl.flock(holder_fd, fcntl.LOCK_EX)
  os.write(holder_fd, json.dumps({'host': socket.gethostname(), 'pid': 1}).encode())
  third = []
  real_flock = fcntl.flock

  def flock_after_the_holder_leaves(fd, operation):
    if holder_fd is not None and not third:
      os.unlink(path)      # the holder's release: unlink, then unlock
      os.close(holder_fd)
      third.append(None)
      if then == 'a_third_trainer_takes_it':
        third[0] = os.open(path, os.O_CREAT | os.O_RDWR)
        real_flock(third[0], fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(third[0], json.dumps({'host': 'elsewhere', 'pid': 4242}).encode())
    return real_flock(fd, operation)
  monkeypatch.setattr(locking.fcntl, 'flock', flock_after_the_holder_leaves)
  if then == 'nobody_takes_it':
    with checkpoint.workdir_lock(tmp_path):
      assert json.loads(open(path).read())['pid'] == os.getpid()
    assert not os.path.exists(path)
  else:
    with pytest.raises(checkpoint.WorkdirBusy, match='pid 4242 on elsewhere'):
      with checkpoint.workdir_lock(tmp_path):
        pass
    assert json.loads(open(path).read())['pid'] == 4242   # the third trainer's, untouched
    os.close(third[0])


@pytest.mark.parametrize('error, kind', [
    (FileNotFoundError(2, 'No such file'), 'damaged'),
    (json.JSONDecodeError('Expecting value', '{"a":', 5), 'damaged'),
    (UnicodeDecodeError('utf-8', b'\xff', 0, 1, 'invalid start byte'), 'damaged'),
    (ValueError('OUT_OF_RANGE: Error reading "d/abc": Requested byte range [0, 16)'), 'damaged'),
    (ValueError('NOT_FOUND: Metadata at "step/.zarray" does not exist'), 'damaged'),
    (OSError(5, 'Input/output error'), 'transient'),
    (TimeoutError('read timed out'), 'transient'),
    (ValueError('UNAVAILABLE: gs:// returned 503'), 'transient'),
    (PermissionError(13, 'Permission denied'), 'fatal'),
    (MemoryError(), 'fatal'),
    (ValueError('PERMISSION_DENIED: 403 from gs://'), 'fatal'),
    (ValueError('some bug in our code'), 'fatal'),
])
def test_failure_kinds(error, kind):
  assert checkpoint.failure_kind(error) == kind


def test_error_descriptions_are_one_line_and_say_where_they_were_cut():
  long = ValueError('OUT_OF_RANGE: Error reading "' + 'dir/' * 100 + 'd/abc"\n'
                    '  [tensorstore_spec=\'{"driver": "zarr"}\']')
  said = checkpoint.describe_error(long)
  assert '\n' not in said and 'tensorstore_spec' not in said
  assert said.startswith('ValueError: OUT_OF_RANGE: Error reading "dir/dir/')
  assert said.endswith('...') and len(said) == len('ValueError: ') + 240
  assert checkpoint.describe_error(ValueError(
      'NOT_FOUND: no _METADATA. See full TensorStore spec below')) == (
          'ValueError: NOT_FOUND: no _METADATA')


@pytest.mark.parametrize('error', [PermissionError(13, 'Permission denied'), MemoryError()],
                         ids=['permission_denied', 'out_of_memory'])
def test_fatal_read_error_is_one_line_without_retries(tmp_path, trainer_run, monkeypatch,
                                                      error):
  workdir, config, spec = _copy(trainer_run, tmp_path)
  calls = []

  def failing(self, *args, **kwargs):
    calls.append(args)
    raise error
  monkeypatch.setattr(ocp.CheckpointManager, 'restore', failing)
  with pytest.raises(checkpoint.CheckpointReadError, match=type(error).__name__) as raised:
    _restore(workdir, config, spec)
  assert '\n' not in str(raised.value) and len(calls) == 1
  assert _layout(workdir) == ([4, 8], [])


def test_start_over_trains_from_zero_and_keeps_the_old_rows(tmp_path, trainer_run,
                                                            monkeypatch):
  workdir, config, _ = _copy(trainer_run, tmp_path)
  old_rows = (workdir / 'metrics.jsonl').read_text()
  for step in (4, 8):
    (workdir / 'checkpoints' / str(step) / 'state' / '_METADATA').unlink()
  config = train_fixtures.tiny_config(total_steps=4, checkpoint__every_steps=4, eval_steps=1)
  iterator = train_fixtures.make_synthetic_iterator
  with pytest.raises(train.RunError, match='--start_over'):
    train.train_and_evaluate(config, str(workdir), make_iterator=iterator)
  handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
  train.train_and_evaluate(config, str(workdir), make_iterator=iterator, start_over=True)
  # A finished run puts back the handlers it found too (a notebook keeps its Ctrl-C).
  assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers
  assert checkpoint.finished_steps(workdir) == [4]
  [kept] = workdir.glob('metrics.jsonl.*.old')
  assert kept.read_text() == old_rows
  new_rows = [json.loads(l) for l in (workdir / 'metrics.jsonl').read_text().splitlines()]
  assert new_rows[0]['step'] == 0 and new_rows[-1]['step'] == 4
  # Rerun: already trained to step 4. Every checkpoint manager opened is closed (its
  # threads too; a notebook calls this many times).
  opened, closed = [], []
  init, close = ocp.CheckpointManager.__init__, ocp.CheckpointManager.close
  monkeypatch.setattr(ocp.CheckpointManager, '__init__',
                      lambda self, *a, **k: (opened.append(id(self)), init(self, *a, **k))[1])
  monkeypatch.setattr(ocp.CheckpointManager, 'close',
                      lambda self: (closed.append(id(self)), close(self))[1])
  train.train_and_evaluate(config, str(workdir), make_iterator=iterator)
  assert opened and set(opened) <= set(closed)


# ---- Hosts agree: two real processes (jax.distributed over gloo) ----

_TWO_HOST_READS = r'''
import json, sys
import jax
jax.config.update('jax_cpu_collectives_implementation', 'gloo')
jax.distributed.initialize(sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from bert_sym.checkpoint import restoring
restoring.BACKOFF_SECONDS = 0.0
# What each process's own check of step 8 sees, per scenario: one host's check fails
# (always, or only the first time); the arrays are then read for real (orbax's restore,
# with its own collectives).
MISSING = FileNotFoundError(2, 'No such file', '8/state/_METADATA')
SEEN = {'damaged_on_both': [MISSING, MISSING], 'damaged_on_1': [None, MISSING],
        'transient_on_0': [OSError(5, 'Input/output error'), None],
        'transient_once_on_1': [None, OSError(5, 'Input/output error')],
        'incompatible_on_1': [None, restoring.IncompatibleCheckpoint('opt_state/0/count')]}
read_metadata = restoring.read_state_metadata
mesh = jax.sharding.Mesh(np.array(jax.devices()), ('d',))
abstract = {'x': jax.ShapeDtypeStruct((4,), np.float32, sharding=NamedSharding(mesh, P()))}
manager = restoring.make_manager(sys.argv[3])
out = {}
for name, seen in SEEN.items():
  error, calls = seen[jax.process_index()], []
  def check(step_dir, error=error, once=name.endswith('_once_on_1')):
    calls.append(step_dir)
    if error is not None and not (once and len(calls) > 1):
      raise error
    return read_metadata(step_dir)
  restoring.read_state_metadata = check
  try:
    result, reason = restoring._restore_step(manager, 8, abstract, None)
    out[name] = [reason] if result is None else [np.asarray(result[0]['x']).tolist(), result[1]]
  except Exception as e:
    out[name] = [type(e).__name__, str(e)]
# The checks pass on both, then process 1's read of the arrays fails inside orbax's
# restore, after which process 0 waits in orbax's closing barrier.
from orbax.checkpoint._src.serialization import serialization
read_arrays = serialization.async_deserialize
async def failing_read(*args, **kwargs):
  if jax.process_index() == 1:
    raise OSError(5, 'Input/output error', 'an array file')
  return await read_arrays(*args, **kwargs)
restoring.read_state_metadata = read_metadata
serialization.async_deserialize = failing_read
try:
  restoring._restore_step(manager, 8, abstract, None)
  out['array_read_fails_on_1'] = ['restored']
except Exception as e:
  out['array_read_fails_on_1'] = [type(e).__name__, str(e)]
# A data file of process 1's shards cut short: only process 1 reads it, so only it sees
# the damage, which is the step's all the same (set aside, not "the hosts differ").
serialization.async_deserialize = read_arrays
import glob, os
from bert_sym import checkpoint
from bert_sym.checkpoint.core import allgather_json
halves = NamedSharding(mesh, P('d'))
sharded = restoring.make_manager(sys.argv[3] + '/sharded')
x = jax.make_array_from_callback((1024,), halves, lambda i: np.arange(1024, dtype=np.float32)[i])
checkpoint.save(sharded, 8, {'x': x}, {'index': 8}, force=True)
sharded.wait_until_finished()
allgather_json(None)
if jax.process_index() == 0:
  for f in glob.glob(sys.argv[3] + '/sharded/checkpoints/8/state/ocdbt.process_1/d/*'):
    os.truncate(f, 10)
allgather_json(None)
abstract = {'x': jax.ShapeDtypeStruct((1024,), np.float32, sharding=halves)}
result, reason = restoring._restore_step(sharded, 8, abstract, None)
out['shard_damaged_on_1'] = [reason]
print('RESULT', json.dumps(out))
'''


def test_two_hosts_act_on_the_worst_read_either_saw(tmp_path):
  """Each host reads the step itself; when only one host's read fails, both take that
  outcome (transient: both retry, then stop or restore; incompatible: both stop), so no
  host resumes from a step the other set aside. Damage that every host sees makes both
  skip the step (the trainer sets it aside); damage that one host sees and the other
  does not is their views differing (a stale NFS cache), not the step's: both retry,
  then stop with nothing moved (the trainer used to set the good step aside). A host
  whose check failed never met the other inside orbax's restore (gloo aborted both); one
  whose array read failed inside it meets the other at orbax's closing barrier."""
  manager = checkpoint.make_manager(tmp_path)
  checkpoint.save(manager, 8, {'x': np.arange(4, dtype=np.float32)}, {'index': 8}, force=True)
  manager.wait_until_finished()
  manager.close()
  address = train_fixtures.coordinator_address()
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=str(train_fixtures.REPO_ROOT))
  procs = [subprocess.Popen([sys.executable, '-c', _TWO_HOST_READS, address,
                             str(i), str(tmp_path)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for i in range(2)]
  outputs = [p.communicate(timeout=300) for p in procs]
  for p, (_, err) in zip(procs, outputs):
    assert p.returncode == 0, err[-3000:]
  host0, host1 = (json.loads(out.split('RESULT ', 1)[1]) for out, _ in outputs)
  assert host0 == host1
  [reason] = host0['damaged_on_both']
  assert 'No such file' in reason
  kind, line = host0['damaged_on_1']
  assert kind == 'CheckpointReadError' and 'after 4 attempts' in line, line
  assert ('process(es) [1] cannot read it' in line and 'No such file' in line
          and 'the hosts see different files' in line and 'nothing was moved' in line), line
  assert host0['transient_once_on_1'] == [[0.0, 1.0, 2.0, 3.0], {'index': 8}]
  kind, line = host0['transient_on_0']
  assert kind == 'CheckpointReadError' and 'after 4 attempts' in line and 'Input/output' in line
  assert host0['incompatible_on_1'] == ['IncompatibleCheckpoint', 'opt_state/0/count']
  # Process 1 met process 0 in orbax's barrier, then both agreed: before, their collectives
  # differed and gloo aborted both (exit 134).
  kind, line = host0['array_read_fails_on_1']
  assert kind == 'CheckpointReadError' and 'Input/output' in line, line
  [reason] = host0['shard_damaged_on_1']
  assert reason and 'array index' in reason, reason


def test_only_gloo_or_a_barrier_says_that_another_process_has_gone(monkeypatch):
  """The words that make a host stop with "another process of this run stopped" (and skip
  the restore barrier): a storage timeout or reset on this host's own write is not one."""
  from bert_sym import cli  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(cli, 'one_of_several_processes', lambda: True)
  gone = ('UNKNOWN: Gloo AllGather failed: [pair.cc:547] Connection closed by peer [::1]:9',
          'DEADLINE_EXCEEDED: Barrier timed out. Id: ThreadSaveMultiHostValueHolder',
          # orbax's async save, wrapping the barrier's error (seen once in a CI run of
          # test_one_hosts_failed_save_stops_every_host_in_one_line[True]).
          'TimeoutError: Timed out while waiting for async_write_complete barrier.')
  own = ('DEADLINE_EXCEEDED: Error writing "gs://b/run/checkpoints/8/state/d/x"',
         'UNAVAILABLE: Connection reset by peer (GCS upload)', '[Errno 28] No space left')
  assert all(cli.another_process_stopped(text) for text in gone)
  assert not any(cli.another_process_stopped(text) for text in own)
  monkeypatch.setattr(cli, 'one_of_several_processes', lambda: False)
  assert not cli.another_process_stopped(gone[0])   # one process: nobody else to blame


def test_export_and_glue_stop_on_a_read_error_that_is_not_damage(tmp_path):
  """A permission (or other fatal) error on the newest step must stop a reader in one line,
  not fall back to an older step as if the newest were damaged."""
  from bert_sym.checkpoint import pretrained  # pylint: disable=g-import-not-at-top
  newest, older = tmp_path / '8', tmp_path / '4'
  def read(error):
    def read_step(step_dir):
      if step_dir == newest:
        raise error
      return 'older state'
    return read_step
  warnings = []
  step_dir, value = pretrained._first_readable(  # pylint: disable=protected-access
      tmp_path, read(FileNotFoundError('state/_METADATA')), warnings.append,
      step_dirs=[newest, older])
  assert (step_dir, value) == (older, 'older state') and 'skipped it' in warnings[0]
  with pytest.raises(checkpoint.CheckpointReadError, match='does not look damaged'):
    pretrained._first_readable(  # pylint: disable=protected-access
        tmp_path, read(PermissionError(13, 'Permission denied')), warnings.append,
        step_dirs=[newest, older])


def test_an_encoder_of_another_shape_is_refused_in_one_line():
  from bert_sym.checkpoint import pretrained  # pylint: disable=g-import-not-at-top
  params = {'bert': {'encoder': {'w': np.zeros((2, 3))}, 'pooler': {}}, 'classifier': {}}
  with pytest.raises(ValueError, match=r'does not match .*\(1 parameters differ'):
    pretrained.with_pretrained_encoder(params, {'w': np.zeros((2, 4))})
  out = pretrained.with_pretrained_encoder(params, {'w': np.ones((2, 3), np.float16)})
  assert out['bert']['encoder']['w'].dtype == np.float32
  assert params['bert']['encoder']['w'].sum() == 0   # the fresh params are not changed


def test_an_object_store_workdir_is_not_locked(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  with checkpoint.workdir_lock('gs://bucket/run'):
    pass
  assert not list(tmp_path.rglob('*'))


def test_release_leaves_a_lock_file_that_is_not_ours(tmp_path):
  """Ours was replaced meanwhile by another trainer's fresh lock file: leaving must not
  delete that one."""
  path = tmp_path / checkpoint.LOCK_FILE
  with checkpoint.workdir_lock(tmp_path):
    os.unlink(path)
    path.write_text(json.dumps({'host': 'elsewhere', 'pid': 4242}))
  assert json.loads(path.read_text())['pid'] == 4242


def test_a_longer_dead_holder_text_is_overwritten_whole(tmp_path):
  """Trailing bytes of a dead holder's longer text made the lock file unreadable JSON, and
  a second trainer's message then said "pid ?"."""
  path = tmp_path / checkpoint.LOCK_FILE
  path.write_text(json.dumps({'host': 'x' * 500, 'pid': 1}))
  with checkpoint.workdir_lock(tmp_path, log=lambda *a: None):
    assert json.loads(path.read_text())['pid'] == os.getpid()
    with pytest.raises(checkpoint.WorkdirBusy,
                       match=f'pid {os.getpid()} on {socket.gethostname()}'):
      with checkpoint.workdir_lock(tmp_path):
        pass


def test_a_filesystem_without_locks_warns_and_runs(tmp_path, monkeypatch):
  def no_locks(fd, operation):
    raise OSError(errno.ENOLCK, 'No locks available')
  monkeypatch.setattr(locking.fcntl, 'flock', no_locks)
  said = []
  with checkpoint.workdir_lock(tmp_path, log=said.append):
    pass
  assert said and 'cannot be locked on this filesystem' in said[0]


def test_an_unexpected_error_taking_the_lock_is_raised_as_itself(tmp_path, monkeypatch):
  """A PermissionError must not come out as WorkdirBusy ('another trainer')."""
  def denied(*args, **kwargs):
    raise PermissionError(errno.EACCES, 'Permission denied')
  monkeypatch.setattr(locking.os, 'open', denied)
  with pytest.raises(PermissionError):
    with checkpoint.workdir_lock(tmp_path):
      pass


def _diverge(tmp_path, steps, onset, resumed_good):
  from bert_sym import pretrain_loop  # pylint: disable=g-import-not-at-top
  config = train_fixtures.tiny_config()
  for step in steps:
    _write_run(tmp_path, config, step=step)
  manager = checkpoint.make_manager(tmp_path, config.checkpoint)
  run = types.SimpleNamespace(console=lambda *a: None, last_saved=steps[-1], workdir=tmp_path)
  pretrain_loop.set_aside_divergence(loop.NonFiniteError('x', onset=onset), tmp_path, manager,
                                     resumed_good, run)
  manager.close()
  return checkpoint.finished_steps(tmp_path), run.last_saved


def test_the_checkpoint_of_the_step_before_the_onset_goes_aside(tmp_path):
  # (two saves: the tiny config keeps the newest 2)
  assert _diverge(tmp_path, (5, 8), onset=6, resumed_good=None) == ([], None)


def test_the_checkpoint_resumed_from_stays_unless_the_divergence_began_right_after_it(tmp_path):
  assert _diverge(tmp_path, (5, 8), onset=7, resumed_good=5) == ([5], 5)
  # Onset 6: step 6's loss came from 5's parameters (tests/test_train.py, end to end).
  assert _diverge(tmp_path / 'next', (5, 8), onset=6, resumed_good=5) == ([], None)


# From a mutation audit: each test fails with the check it names removed.

def _wrapped(inner):
  """As orbax raises a failed array read: a bare Exception whose cause says what happened."""
  try:
    try:
      raise inner
    except Exception as e:   # pylint: disable=broad-except
      raise Exception('restore failed') from e   # pylint: disable=broad-exception-raised
  except Exception as wrapper:   # pylint: disable=broad-except
    return wrapper


def test_a_bare_wrapper_defers_to_its_cause():
  short = ValueError('OUT_OF_RANGE: Error reading "d/abc": Requested byte range [0, 16)')
  assert restoring.failure_kind(_wrapped(short)) == 'damaged'
  assert restoring.failure_kind(_wrapped(OSError(5, 'Input/output error'))) == 'transient'
  assert restoring.failure_kind(Exception('nothing chained')) == 'fatal'
  try:   # raised while handling, without `from`: the cause is the implicit context
    try:
      raise short
    except ValueError:
      raise Exception('restore failed')   # pylint: disable=broad-exception-raised,raise-missing-from
  except Exception as implicit:   # pylint: disable=broad-except
    assert restoring.failure_kind(implicit) == 'damaged'


def test_diverged_and_acknowledged_steps_are_not_damage(tmp_path):
  root = tmp_path / restoring.DAMAGED_DIR
  root.mkdir()
  for name in (f'6-100{restoring.DIVERGED_SUFFIX}', '4-100',
               f'2-90{restoring.STARTED_OVER_SUFFIX}'):
    (root / name).mkdir()
  assert restoring.damaged_steps_found(tmp_path) == ['4-100']


def test_a_step_belongs_to_the_newest_start_in_its_lineage(tmp_path):
  """GLUE keys a sweep's results by the start of the trainer that wrote the step: for a
  resumed run that is the newest start, not the first."""
  step_dir = tmp_path / '16'
  (step_dir / 'data_iter').mkdir(parents=True)
  (step_dir / 'data_iter' / 'metadata').write_text(json.dumps(
      {'process_count': 1, 'states': [{}], 'lineage': [['a', -1], ['b', 8]]}))
  assert checkpoint.lineage_of(step_dir) == [['a', -1], ['b', 8]]
  assert checkpoint.run_id_of(step_dir) == 'b'
  assert checkpoint.run_id_of(tmp_path / 'missing') is None


def test_config_differences_include_keys_only_one_config_has():
  a = ml_collections.ConfigDict({'x': 1, 'model': {'attention': 'pairwise'}})
  b = ml_collections.ConfigDict({'x': 1, 'y': 2, 'model': {'attention': 'standard'}})
  assert checkpoint.config_differences(a, b) == ['model.attention', 'y']
  assert checkpoint.config_differences(b, a) == ['model.attention', 'y']
  assert checkpoint.config_differences(a, a) == []


def test_the_step_a_run_resumed_from_is_not_its_own():
  # A run resumed from step 12 of a checkpoint that recorded no lineage wrote 13 on, not 12.
  assert checkpoint.written_by([['b', 12]], 12) is None
  assert checkpoint.written_by([['b', 12]], 13) == 'b'


class _Manager:
  def __init__(self, steps):
    self._steps = steps

  def all_steps(self):
    return self._steps


def test_a_background_failure_is_named_by_the_step_whose_save_failed():
  manager = _Manager([4])
  saving._LAST_STARTED[manager] = 8   # pylint: disable=protected-access
  # Step 8's background save failed; it surfaces when step 12's save starts.
  assert saving._failed_step(manager, 12) == 8   # pylint: disable=protected-access
  manager._steps = [4, 8]   # step 8 was committed: the failure is the current save's
  assert saving._failed_step(manager, 12) == 12   # pylint: disable=protected-access
  assert saving._failed_step(manager) == 8   # pylint: disable=protected-access


def test_every_host_stops_on_any_hosts_failed_or_stalled_save(tmp_path, monkeypatch):
  """What each process does with the save outcomes gathered at a log step: one whose own
  write failed names the cause; the others name the process(es) whose write failed, else
  those that timed out waiting. A host left out of "waited" alone trained on into the next
  step's collective, where it was aborted when the stalled one left."""
  monkeypatch.setattr(sys, 'unraisablehook', sys.unraisablehook)   # _save_failed mutes
  monkeypatch.setattr(sys, 'excepthook', sys.excepthook)           # orbax's echoes
  manager = checkpoint.make_manager(tmp_path)
  raise_if = saving._raise_if_any_failed   # pylint: disable=protected-access
  try:
    raise_if(manager, None, [None, None])   # nothing failed: go on
    for kinds, named in (([None, 'waited'], '1'), (['failed', 'waited', 'failed'], '0, 2')):
      with pytest.raises(checkpoint.CheckpointSaveError,
                         match=f'process[(]es[)] {named} reported it failed'):
        raise_if(manager, None, kinds)
  finally:
    manager.close()


def _failing_save(tmp_path, monkeypatch, saved_steps, error):
  """The one-line error of a save at step 12 that raises `error`, after `saved_steps`."""
  manager = checkpoint.make_manager(tmp_path)
  try:
    for step in saved_steps:
      saving.save(manager, step, {'x': jnp.zeros(3)}, {'pos': step})
    manager.wait_until_finished()

    def fail(*args, **kwargs):
      del args, kwargs
      raise error

    monkeypatch.setattr(manager, 'save', fail)
    with pytest.raises(checkpoint.CheckpointSaveError) as raised:
      saving.save(manager, 12, {'x': jnp.zeros(3)}, {'pos': 12})
  finally:
    monkeypatch.undo()
    manager.close()
  return str(raised.value)


def test_a_failed_save_names_the_newest_intact_checkpoint(tmp_path, monkeypatch):
  """keep_last > 1: the step the rerun resumes from (8), not the oldest kept (4)."""
  message = _failing_save(tmp_path, monkeypatch, (4, 8),
                          OSError(errno.ENOSPC, 'No space left on device'))
  assert 'the previous checkpoint (step 8) is intact' in message, message
  assert 'the disk is full (ENOSPC)' in message, message


def test_a_wrapped_os_error_is_named_by_its_cause(tmp_path, monkeypatch):
  try:
    raise RuntimeError('commit failed') from OSError(errno.ENOSPC, 'No space left on device')
  except RuntimeError as wrapped:
    message = _failing_save(tmp_path, monkeypatch, (), wrapped)
  assert 'the disk is full (ENOSPC)' in message and 'no earlier checkpoint' in message, message


@pytest.mark.parametrize('error, cause', [
    (OSError(errno.EDQUOT, os.strerror(errno.EDQUOT)), 'the disk quota is exceeded (EDQUOT)'),
    (PermissionError(errno.EACCES, 'Permission denied'), 'permission denied (EACCES)'),
    (OSError(errno.EROFS, os.strerror(errno.EROFS)), 'the filesystem is read-only (EROFS)'),
    # TensorStore's words for them (gs://, or a local array write), in a bare Exception.
    (Exception('RESOURCE_EXHAUSTED: Error writing "d/0": quota'),
     'the disk is full or over quota (ENOSPC / EDQUOT)'),
    (Exception('PERMISSION_DENIED: Error writing "d/0"'), 'permission denied (EACCES)'),
], ids=['EDQUOT', 'EACCES', 'EROFS', 'tensorstore_RESOURCE_EXHAUSTED',
        'tensorstore_PERMISSION_DENIED'])
def test_each_save_failure_the_readme_names_is_one_line_with_its_cause(tmp_path, monkeypatch,
                                                                      error, cause):
  """README: 'A save fails (disk full, quota, permission) | The run stops at once: one
  line'. Only ENOSPC was exercised."""
  message = _failing_save(tmp_path, monkeypatch, (4,), error)
  assert f'Saving checkpoint step 12 to {tmp_path}' in message and cause in message, message
  assert 'the previous checkpoint (step 4) is intact' in message and '\n' not in message


def test_a_save_records_its_lineage_and_meter(tmp_path):
  manager = checkpoint.make_manager(tmp_path)
  try:
    saving.save(manager, 2, {'x': jnp.zeros(3)}, {'pos': 5}, meter_state={'m': 1},
                lineage=[['a', -1]])
    manager.wait_until_finished()
  finally:
    manager.close()
  step_dir = tmp_path / 'checkpoints' / '2'
  assert checkpoint.lineage_of(step_dir) == [['a', -1]]
  item = checkpoint.read_json_item(step_dir)
  assert item['states'] == [{'pos': 5}] and item['meter'] == {'m': 1}


def _background_write_fails_at(step, monkeypatch):
  """Writing the arrays of `step` fails with ENOSPC in orbax's background thread."""
  from orbax.checkpoint._src.serialization import serialization  # pylint: disable=g-import-not-at-top
  original = serialization.async_serialize_from_host

  async def write(shards, tensorstore_spec, *args, **kwargs):
    if f'/{step}.orbax-checkpoint-tmp' in str(tensorstore_spec):
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), f'step {step}')
    return await original(shards, tensorstore_spec, *args, **kwargs)
  monkeypatch.setattr(serialization, 'async_serialize_from_host', write)


def test_noticing_a_failed_background_save_leaves_orbax_to_skip_its_rotation(tmp_path,
                                                                           monkeypatch):
  """keep_last=1, step 4 saved, step 8's background write fails. Our check saw the failure
  before orbax's finalize thread did (held back here): it used to take orbax's stored
  error, and the finalize thread, seeing none, rotated step 4 out as if step 8 had been
  committed. The run's only checkpoint was lost. Now orbax still sees it and keeps step 4."""
  import threading  # pylint: disable=g-import-not-at-top
  manager = checkpoint.make_manager(tmp_path, ml_collections.ConfigDict(
      dict(keep_last=1, keep_every=0, async_save=True, save_timeout_s=30)))
  try:
    saving.save(manager, 4, {'x': jnp.zeros(3)}, {'pos': 4})
    manager.wait_until_finished()
    _background_write_fails_at(8, monkeypatch)
    finalize_may_go = threading.Event()
    metadata = manager._non_blocking_metadata_store   # pylint: disable=protected-access
    wait_for_metadata = metadata.wait_until_finished
    in_finalize_thread = lambda: threading.current_thread() is not threading.main_thread()
    monkeypatch.setattr(metadata, 'wait_until_finished', lambda: (
        in_finalize_thread() and finalize_may_go.wait(30), wait_for_metadata()))
    saving.save(manager, 8, {'x': jnp.ones(3)}, {'pos': 8})
    manager._checkpointer._async_manager._thread.join(30)   # pylint: disable=protected-access
    with pytest.raises(checkpoint.CheckpointSaveError, match=r'step 8 .*\(ENOSPC\)'):
      saving.check_saves(manager)
    finalize_may_go.set()
    with pytest.raises(Exception):   # orbax's own report of the failed save
      manager.wait_until_finished()
  finally:
    finalize_may_go.set()
    monkeypatch.undo()
  assert checkpoint.finished_steps(tmp_path) == [4]


def test_two_set_asides_of_one_step_in_one_second_keep_both(tmp_path, monkeypatch):
  """Named <step>-<second><suffix>: the second one renamed onto the first (locally an
  error; on gs://, a rename copies objects, so both steps' files were merged)."""
  from bert_sym.checkpoint import restoring  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(restoring.time, 'time', lambda: 1700000000.5)
  ckpt_dir = tmp_path / 'checkpoints'
  moved = []
  for attempt in ('first', 'second'):
    (ckpt_dir / '8').mkdir(parents=True)
    (ckpt_dir / '8' / 'which').write_text(attempt)
    moved.append(restoring._set_aside(ckpt_dir, 8, '-diverged'))
  assert [p.name for p in moved] == ['8-1700000000-diverged', '8-1700000000-1-diverged']
  assert [(p / 'which').read_text() for p in moved] == ['first', 'second']


def test_a_workdir_url_the_trainer_cannot_write_is_one_line(tmp_path):
  """--workdir=file:///x (or memory://) was a KeyError traceback from etils.epath."""
  assert checkpoint.workdir_problem(f'file://{tmp_path}/run') == (
      f'--workdir=file://{tmp_path}/run: file:// is not a storage the trainer writes to. Fix: '
      f'a local directory (--workdir={tmp_path}/run), or one of gs://.')
  assert 'memory:// is not a storage' in checkpoint.workdir_problem('memory://bucket/run')
  # TensorFlow's gfile, which orbax's paths use once TF is installed, has neither.
  assert 's3:// is not a storage' in checkpoint.workdir_problem('s3://bucket/run')
  assert 'az:// is not a storage' in checkpoint.workdir_problem('az://bucket/run')
  assert checkpoint.workdir_problem(tmp_path / 'fresh') is None


def test_a_workdir_bucket_this_machine_cannot_reach_is_one_line(tmp_path, monkeypatch):
  """TensorFlow's gfile (etils.epath's gs:// backend in the trainer) raises tf.errors.OpError,
  not OSError: a gs:// workdir unreachable from here (no network, no credentials, a bucket
  its service account cannot read) was a traceback before the run started."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  from etils import epath  # pylint: disable=import-outside-toplevel
  unreachable = tf.errors.FailedPreconditionError(
      None, None, "Error executing an HTTP request: libcurl code 6 meaning 'Could not resolve "
      "hostname'\n\t when reading metadata of gs://bucket/run/checkpoints")
  def exists(self):
    raise unreachable
  monkeypatch.setattr(type(epath.Path(tmp_path)), 'exists', exists)
  assert checkpoint.workdir_problem(tmp_path / 'run') == (
      f"--workdir={tmp_path / 'run'} cannot be read (FailedPreconditionError: Error executing "
      "an HTTP request: libcurl code 6 meaning 'Could not resolve hostname' when reading "
      'metadata of gs://bucket/run/checkpoints). Fix: check that this machine can reach and '
      'write it (network, credentials, bucket permissions), or pass another --workdir.')


def test_another_config_file_on_a_workdir_names_the_workdirs_own_config_as_a_fix(tmp_path):
  """configs/sym_small.py rerun on a tiny workdir listed the model and optimizer flags only;
  following them, the data keys (max_seq_len, ...) were refused at the next start."""
  from configs import sym_small, tiny  # pylint: disable=g-import-not-at-top
  checkpoint.write_config(tmp_path, tiny.get_config())
  hint = checkpoint.config_hint(tmp_path, sym_small.get_config())
  assert 'model.hidden_size=' in hint and '--config.model.hidden_size=' in hint, hint
  assert (f'(or --config=configs/from_json.py:{tmp_path}, its own config) to resume it, or '
          'use a fresh --workdir for this config.') in hint, hint
  # One key changed on the command line: its flag alone is the fix.
  config = tiny.get_config()
  config.model.mlp_dim += 16
  hint = checkpoint.config_hint(tmp_path, config)
  assert hint.endswith(f'--config.model.mlp_dim={config.model.mlp_dim - 16} to resume it, or '
                       'use a fresh --workdir for this config.'), hint


def test_the_input_resume_hint_names_only_keys_of_the_read_position(tmp_path):
  """A resume the input pipeline refused (here: corpus files changed in place) named every
  data.* key changed since config.json, e.g. the masking rate, which is not part of the
  read position: "Fix: rerun with --config.data.mask_rate=0.15 to resume it", a rerun
  refused the same way. Such keys are left out, so the generic advice stays."""
  from configs import tiny  # pylint: disable=g-import-not-at-top
  checkpoint.write_config(tmp_path, tiny.get_config())
  config = tiny.get_config()
  config.data.mask_rate = 0.2
  config.data.whole_word_masking = True
  config.data.max_predictions_per_seq += 1
  assert checkpoint.data_config_hint(tmp_path, config) == ''
  config.seed += 1   # the order: part of the position, still named with its flag
  hint = checkpoint.data_config_hint(tmp_path, config)
  assert 'mask' not in hint and f'--config.seed={config.seed - 1}' in hint, hint

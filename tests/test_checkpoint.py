"""checkpoint.py: config.json round trip, load_pretrained, shape checks, atomic finalize."""

import json
import sys
import types

import flax.linen as nn
import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from bert_sym import checkpoint
from bert_sym import model as model_lib
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


def test_plain_orbax_reads_a_checkpoint(tmp_path):
  """The README snippet: no project code, numpy restore (any device count)."""
  params = _write_run(tmp_path, train_fixtures.tiny_config(), step=3)
  path = tmp_path / 'checkpoints' / '3' / 'state'
  ckptr = ocp.PyTreeCheckpointer()
  tree = ckptr.metadata(path).item_metadata.tree
  state = ckptr.restore(path, args=ocp.args.PyTreeRestore(
      restore_args=jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)))
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
  manager = checkpoint.make_manager(tmp_path, other.checkpoint)
  with pytest.raises(ValueError, match=r'(?s)intermediate/kernel.*another config'):
    checkpoint.check_compatible(manager, manager.latest_step(), abstract)


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


def test_echoes_of_a_failed_orbax_read_are_muted_and_other_unraisables_are_not(monkeypatch):
  """After a damaged checkpoint, orbax's cancelled reads print as "Exception ignored"
  (sys.unraisablehook); those are dropped, anything else still reaches the old hook."""
  seen = []
  monkeypatch.setattr(sys, 'unraisablehook', seen.append)
  checkpoint._mute_echoes_of_failed_reads()  # pylint: disable=protected-access
  checkpoint._mute_echoes_of_failed_reads()  # pylint: disable=protected-access  (idempotent)
  unraisable = lambda obj, error: types.SimpleNamespace(
      object=obj, exc_value=error, exc_traceback=None, exc_type=type(error), err_msg=None)
  orbax_echo = unraisable('<coroutine object orbax.checkpoint._src.read>', ValueError('x'))
  closed_loop = unraisable(None, RuntimeError('Event loop is closed'))
  other = unraisable('<function mine>', ValueError('a real problem'))
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

"""sharding.py: mesh from config, logical rules -> NamedSharding, batch checks."""

import json
import os
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import ml_collections
import pytest
from jax.sharding import PartitionSpec as P

from bert_sym import model as model_lib
from bert_sym import sharding
from tests import train_fixtures
from tests.train_fixtures import cpu_devices_flags


def _mesh_config(data=-1, fsdp=1, tensor=1):
  return ml_collections.ConfigDict(dict(data=data, fsdp=fsdp, tensor=tensor))


@pytest.mark.parametrize('mesh, devices, expected', [
    ((-1, 1, 1), 8, (8, 1, 1)),
    ((1, -1, 1), 8, (1, 8, 1)),
    ((4, 1, 2), 8, (4, 1, 2)),
    ((-1, 1, 2), 8, (4, 1, 2)),
    ((-1, 1, 1), 1, (1, 1, 1)),
])
def test_mesh_shape(mesh, devices, expected):
  assert sharding.mesh_shape(_mesh_config(*mesh), devices) == expected


@pytest.mark.parametrize('mesh, devices, message', [
    ((4, 1, 4), 8, 'has 16 devices but JAX sees 8'),
    ((-1, 3, 1), 8, 'multiple of 3 devices'),
    ((-1, -1, 1), 8, 'at most one axis'),
    ((0, -1, 1), 8, 'sizes must be positive'),
])
def test_mesh_shape_errors(mesh, devices, message):
  with pytest.raises(ValueError, match=message):
    sharding.mesh_shape(_mesh_config(*mesh), devices)


def test_rules_from_json_lists_and_unknown_axis():
  config = train_fixtures.tiny_config()
  config.sharding_rules = [['batch', ['data', 'fsdp']], ['embed', 'fsdp'], ['kv', None]]
  assert sharding.logical_rules(config) == (
      ('batch', ('data', 'fsdp')), ('embed', 'fsdp'), ('kv', None))
  config.sharding_rules = [['embed', 'model']]
  with pytest.raises(ValueError, match="unknown mesh axis"):
    sharding.logical_rules(config)
  # A misspelled logical name sharded nothing, silently (flax replicates unnamed axes).
  config.sharding_rules = [['batch', 'data'], ['mpl', 'tensor']]
  with pytest.raises(ValueError, match="names 'mpl', which no array of the model has"):
    sharding.logical_rules(config)


@pytest.mark.parametrize('rules', [
    ('batch', 'data'),   # --config.sharding_rules="(('batch', 'data'))": no trailing comma
    ('bogus',),          # what ml_collections makes of --config.sharding_rules=bogus
    ((1, 2),),
])
def test_rules_that_are_not_pairs_name_the_key_and_the_fix(rules):
  """Each was 'too many values to unpack (expected 2)' (or an unknown axis named 2 for
  the logical axis 1): no key, no fix, in bert_sym.train and bert_sym.aot alike."""
  config = train_fixtures.tiny_config()
  config.sharding_rules = rules
  with pytest.raises(ValueError, match=r"config.sharding_rules=.* is not a \(logical axis, "
                                       r"mesh axes\) pair. Fix: a tuple of pairs"):
    sharding.logical_rules(config)


def test_fsdp_alone_across_gpu_nodes_is_refused_naming_nodes():
  """JAX gives GPUs of different nodes different slice indices: a 2-node FSDP mesh
  (data=1) hit the multi-slice rule, whose message spoke of TPU slices only."""
  import types  # pylint: disable=g-import-not-at-top
  gpus = [types.SimpleNamespace(id=i, slice_index=i // 4, platform='gpu') for i in range(8)]
  with pytest.raises(ValueError, match=r'data=1 must be a multiple of the 2 nodes \(only the '
                     r'data axis spans nodes; fsdp and tensor stay inside one\)'):
    sharding.make_mesh(_mesh_config(1, -1, 1), gpus)


def test_the_known_logical_axes_are_the_models(monkeypatch):
  """sharding.LOGICAL_AXES is what the MLM and GLUE models name, scanned or not: their
  parameters' axes and the activations they constrain (recorded while traced)."""
  config = train_fixtures.tiny_config()
  named = set()
  constrain = sharding.constrain
  monkeypatch.setattr(sharding, 'constrain', lambda x, axes: (
      named.update(a for a in axes if a), constrain(x, axes))[1])
  mesh = sharding.make_mesh(_mesh_config())
  scanned = config.model.copy_and_resolve_references()
  scanned.scan_layers = not config.model.scan_layers
  for module in (model_lib.BertForMaskedLM(config.model), model_lib.BertForMaskedLM(scanned),
                 model_lib.BertForSequenceClassification(config.model, num_labels=3)):
    with sharding.kernel_mesh(mesh, sharding.logical_rules(config)):
      boxed = jax.eval_shape(lambda m=module: m.init(
          jax.random.key(0), *model_lib.dummy_inputs())['params'])
    for spec in jax.tree.leaves(nn.get_partition_spec(boxed),
                                is_leaf=lambda x: isinstance(x, P)):
      named.update(a for a in spec if a)
  assert named == set(sharding.LOGICAL_AXES)


def _tiny_model_shardings():
  """(config, mesh, boxed abstract params, their shardings) of the tiny MLM model."""
  config = train_fixtures.tiny_config()
  mesh = sharding.make_mesh(_mesh_config())
  module = model_lib.BertForMaskedLM(config.model)
  boxed = jax.eval_shape(lambda: module.init(jax.random.key(0), *model_lib.dummy_inputs())
                         ['params'])
  return config, mesh, boxed, sharding.logical_to_shardings(
      boxed, mesh, sharding.logical_rules(config))


def test_param_shardings_follow_the_rules():
  """On a 1-device mesh the specs are still the rules' specs (sizes 1 divide anything)."""
  _, _, boxed, shardings = _tiny_model_shardings()
  assert jax.tree.structure(shardings) == jax.tree.structure(nn.meta.unbox(boxed))
  layer = shardings['encoder']['layer_0']
  assert layer['intermediate']['kernel'].spec == P('fsdp', 'tensor')
  assert layer['attention']['query']['kernel'].spec == P('fsdp', 'tensor', None)
  assert layer['attention']['pairwise'].spec == P('tensor', None, None)
  assert (shardings['encoder']['embeddings']['word_embeddings']['embedding'].spec
          == P('tensor', 'fsdp'))
  assert shardings['mlm_head']['transform']['kernel'].spec == P('fsdp', None)


_BATCH_CHECKS = textwrap.dedent("""
    import json, sys
    import jax
    import ml_collections
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
    from bert_sym import sharding
    rules = (('batch', ('data', 'fsdp')),)
    out = {'devices': jax.device_count(), 'process_count': jax.process_count()}
    for name, (data, fsdp, tensor), batch in (
        ('ok', (8, 1, 1), 16), ('dp', (8, 1, 1), 12), ('processes', (1, 1, 8), 3),
        ('ways', (1, 1, 8), 4), ('fsdp_ok', (1, 8, 1), 16), ('fsdp_dp', (2, 4, 1), 12)):
      mesh = sharding.make_mesh(ml_collections.ConfigDict(
          dict(data=data, fsdp=fsdp, tensor=tensor)))
      try:
        out[name] = sharding.check_batch_size(batch, mesh, rules)
      except ValueError as e:
        out[name] = str(e)
    # The batch split over fsdp alone, the data axis (across the processes) left out: each
    # process's devices hold the whole batch, half of which it reads.
    mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=2, fsdp=4, tensor=1)))
    out['data_axis_left_out'] = [[d.process_index for d in row] for row in mesh.devices[:, :, 0]]
    try:
      out['batch_within_processes'] = sharding.check_batch_size(32, mesh, (('batch', 'fsdp'),))
    except ValueError as e:
      out['batch_within_processes'] = str(e)
    # GLUE's batches on a mesh whose processes alternate along the batch, as on TPU pods
    # (v4-16: processes 0,1,0,1,...): the global rows must keep the batch's order.
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec
    from bert_sym.glue import finetune
    alternating = sorted(jax.devices(), key=lambda d: (d.id % 4, d.process_index))
    mesh = Mesh(np.array(alternating).reshape(8, 1, 1), ('data', 'fsdp', 'tensor'))
    gather = jax.jit(lambda b: b, out_shardings=NamedSharding(mesh, PartitionSpec()))
    out['processes_along_batch'] = [d.process_index for d in mesh.devices.flat]
    for name, batch, stacked in (('glue_rows', np.arange(16), False),
                                 ('glue_rows_stacked', np.arange(32).reshape(2, 16), True)):
      rows = gather(finetune.global_batch({"x": batch}, mesh, rules, stacked))['x']
      out[name] = np.asarray(rows).tolist()
    print('RESULT', json.dumps(out))
""")


def test_batch_size_checks_on_8_devices_in_2_processes():
  """check_batch_size's three errors, each reachable only with several devices and
  processes, and GLUE's global batches on a mesh whose processes alternate: two real
  processes (jax.distributed, gloo) of 4 CPU devices each."""
  address = train_fixtures.coordinator_address()
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=str(train_fixtures.REPO_ROOT),
             XLA_FLAGS=cpu_devices_flags(4))
  procs = [subprocess.Popen([sys.executable, '-c', _BATCH_CHECKS, address, str(i)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  outputs = [p.communicate(timeout=300) for p in procs]
  for p, (_, err) in zip(procs, outputs):
    assert p.returncode == 0, err[-3000:]
  results = [json.loads(out.split('RESULT ', 1)[1]) for out, _ in outputs]
  assert results[0] == results[1]
  result = results[0]
  assert result['devices'] == 8 and result['process_count'] == 2
  assert result['ok'] == 8                                 # 16 rows, 8 per process
  assert result['data_axis_left_out'] == [[0, 0, 0, 0], [1, 1, 1, 1]]
  assert result['batch_within_processes'] == (
      "The batch axes ('fsdp',) do not split the batch between the 2 processes: the devices "
      'of process 0 hold 32 rows of each batch of config.batch_size=32, but it reads 16. '
      "Fix: put the mesh axis that spans processes (normally 'data') among the batch axes, "
      "e.g. ('batch', ('data', 'fsdp')) in config.sharding_rules.")
  # Not only "a multiple of 8": a resume refuses another batch (helper-found advice loop).
  assert result['dp'] == ('config.batch_size=12 is not divisible by the data-parallel size '
                          'data x fsdp = 8 x 1 = 8. Fix: a multiple of 8, or a config.mesh '
                          'whose data-parallel size divides 12 (a resumed run keeps its '
                          'batch: there, change the mesh or the device count).')
  assert result['processes'] == ('config.batch_size=3 is not divisible by the 2 processes; '
                                 'each process reads an equal share.')
  assert result['ways'].startswith('The data-parallel size 1 is not a multiple of the 2 '
                                   'processes')
  # The batch is split over every axis its rule names (FSDP shards the batch too).
  assert result['fsdp_ok'] == 8
  assert result['fsdp_dp'].startswith('config.batch_size=12 is not divisible by the '
                                      'data-parallel size data x fsdp = 2 x 4 = 8. Fix: a '
                                      'multiple of 8, or a config.mesh')
  assert result['processes_along_batch'] == [0, 1] * 4
  assert result['glue_rows'] == list(range(16))
  assert result['glue_rows_stacked'] == [list(range(16)), list(range(16, 32))]


def test_a_dimension_its_mesh_axes_do_not_divide_is_replicated_with_a_warning(caplog):
  """A vocabulary of 1001 rows on tensor=2 (bert-base's 30522 on 4 ways): that dimension is
  replicated and named in a warning; the others keep the rules' axes. An abstract mesh
  (no devices needed) of the shape data 1 x fsdp 4 x tensor 2."""
  config = train_fixtures.tiny_config()
  config.model.vocab_size = 1001
  mesh = jax.sharding.AbstractMesh((1, 4, 2), sharding.MESH_AXES)
  module = model_lib.BertForMaskedLM(config.model)
  boxed = jax.eval_shape(lambda: module.init(jax.random.key(0), *model_lib.dummy_inputs())
                         ['params'])
  with caplog.at_level('WARNING'):
    shardings = sharding.logical_to_shardings(boxed, mesh, sharding.logical_rules(config))
  assert shardings['encoder']['embeddings']['word_embeddings']['embedding'].spec == P(None,
                                                                                    'fsdp')
  assert shardings['encoder']['layer_0']['intermediate']['kernel'].spec == P('fsdp', 'tensor')
  assert ("['encoder']['embeddings']['word_embeddings']['embedding']: dim 0 (size 1001) is "
          'not divisible by mesh axes tensor of size 2; replicating it instead.') in caplog.text


def test_opt_state_shardings_follow_params():
  """Adam's mu/nu take their parameter's sharding; counts are replicated."""
  import optax  # pylint: disable=g-import-not-at-top
  from bert_sym import optim  # pylint: disable=g-import-not-at-top
  config, mesh, boxed, param_shardings = _tiny_model_shardings()
  abstract_params = nn.meta.unbox(boxed)
  tx, _ = optim.make_optimizer(config.optimizer, 10)
  shardings = sharding.opt_state_shardings(tx, abstract_params, param_shardings, mesh)
  assert (jax.tree.structure(shardings)
          == jax.tree.structure(jax.eval_shape(tx.init, abstract_params)))
  adam = [s for s in jax.tree.leaves(
      shardings, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
      if isinstance(s, optax.ScaleByAdamState)]
  assert len(adam) == 1
  assert adam[0].mu == param_shardings and adam[0].nu == param_shardings
  assert adam[0].count.spec == P()


def test_batch_sharding_comes_from_the_batch_rule():
  config = train_fixtures.tiny_config()
  mesh = sharding.make_mesh(_mesh_config())
  rules = sharding.logical_rules(config)
  assert sharding.batch_sharding(mesh, rules).spec == P(('data', 'fsdp'))
  config.sharding_rules = [['batch', 'data'], ['embed', 'fsdp']]
  rules = sharding.logical_rules(config)
  assert sharding.batch_axes(rules) == ('data',)
  assert sharding.batch_sharding(mesh, rules).spec == P('data')
  assert sharding.check_batch_size(16, mesh, rules=rules) == 16
  with pytest.raises(ValueError, match="no 'batch' entry"):
    sharding.batch_axes((('embed', 'fsdp'),))


def test_steps_are_traced_with_the_kernel_mesh():
  """What splash attention reads to run in shard_map: set while the train and eval steps
  are traced, and only then."""
  from bert_sym import steps   # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp      # pylint: disable=g-import-not-at-top
  mesh = sharding.make_mesh(_mesh_config(), jax.devices()[:1])
  rules = (('batch', 'data'),)
  seen = []

  def record(state, batch):
    seen.append(sharding.current_kernel_mesh())
    return state, {'loss': jnp.sum(batch)}
  replicated = sharding.replicated(mesh)
  steps.jit_train_step(record, replicated, replicated, replicated, rules)(
      jnp.zeros(2), jnp.ones(2))
  steps.make_eval_step(record, replicated, replicated, replicated, rules)(
      jnp.zeros(2), jnp.ones(2))
  assert seen == [(mesh, rules), (mesh, rules)]
  assert sharding.current_kernel_mesh() is None


_FSDP_PROBE = """
import json
import jax
from bert_sym import aot
from tests import train_fixtures
out = {}
for name, data, fsdp in (('data_parallel', -1, 1), ('fsdp', 1, -1), ('hybrid', 2, -1)):
  config = train_fixtures.tiny_config(
      mesh__data=data, mesh__fsdp=fsdp, batch_size=64, model__hidden_size=64,
      model__mlp_dim=256, data__max_seq_len=64, model__max_position_embeddings=64)
  config.model.attention_impl = 'xla'
  built = aot.build_steps(config, jax.devices())
  compiled = built.train_step.lower(built.spec.abstract, built.batch).compile()
  out[name] = dict(temporaries=aot.memory_report(compiled)['temporaries'],
                   collectives=aot.count_collectives(compiled.as_text()))
print(json.dumps(out))
"""


def test_fsdp_needs_no_more_memory_per_device_than_data_parallelism():
  """FSDP shards the weights and optimizer state; the activations stay split by batch, as
  under data parallelism. Without constraints on the activations XLA followed the weights'
  `embed` split into the residual stream: 24 all-to-alls and 3.5x the temporaries here
  (bert-base on v4-8: 28.5 GiB a chip where data parallelism needs 16.5). The compiler's
  own memory analysis, 8 CPU devices. Hybrid (data=2 x fsdp=4, the multi-node layout: FSDP
  inside a node, data parallel across): the embedding tables' gradient, scattered from the
  batch-split activations into tables split along `embed`, was an "Involuntary full
  rematerialization" (the whole tensor replicated, then split) until the tables are
  gathered before the lookup, as FSDP gathers every other weight."""
  result = subprocess.run([sys.executable, '-c', _FSDP_PROBE], capture_output=True,
                          text=True, timeout=600, cwd=train_fixtures.REPO_ROOT,
                          env=dict(os.environ, JAX_PLATFORMS='cpu',
                                   XLA_FLAGS=cpu_devices_flags(8)))
  assert result.returncode == 0, result.stderr[-3000:]
  out = json.loads(result.stdout.strip().splitlines()[-1])
  assert 'Involuntary full rematerialization' not in result.stderr, result.stderr[-3000:]
  for layout in ('fsdp', 'hybrid'):
    assert out[layout]['temporaries'] <= out['data_parallel']['temporaries'], out
    # No activation is re-split: the weights are gathered (the embedding tables too, which
    # were re-split by an all-to-all each way), the gradients reduced.
    assert out[layout]['collectives'].get('all-to-all', 0) == 0, out
    assert out[layout]['collectives'].get('all-gather', 0) > 0   # the weights, gathered

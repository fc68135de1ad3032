"""The dropout RNG knob (config.prng_impl): threefry, rbg and unsafe_rbg train the same
step, with one key per dropout layer for the whole batch; a run resumes only with the
implementation that wrote it. (Resuming with the same one is tests/test_train.py's.)"""

import jax
import numpy as np
import jax.numpy as jnp
import pytest

from bert_sym import config_check
from bert_sym import sharding, steps, train
from tests import train_fixtures

IMPLS = ('threefry', 'rbg', 'unsafe_rbg')
KEY_WORDS = {'threefry': 2, 'rbg': 4, 'unsafe_rbg': 4}


def test_config_check_knows_the_same_names_as_steps():
  assert set(config_check.PRNG_IMPLS) == set(steps.PRNG_IMPLS)
  config = train_fixtures.tiny_config(prng_impl='philox')
  with pytest.raises(config_check.ConfigError, match="prng_impl.*'philox'"):
    config_check.check(config)


def _tiny_step(prng_impl):
  config = train_fixtures.tiny_config(prng_impl=prng_impl)
  mlm = train.build_mlm_step(config, sharding.make_mesh(config.mesh))
  iterator = train_fixtures.make_synthetic_iterator(
      config.data, batch_size=config.batch_size, split='train', seed=0)
  from bert_sym import objectives  # pylint: disable=g-import-not-at-top
  batch = jax.tree.map(jnp.asarray, objectives.host_mlm_positions(
      next(iterator), config.data.max_predictions_per_seq))
  init_key, dropout = jax.random.split(jax.random.key(0))
  return mlm.spec, mlm.update, batch, init_key, steps.dropout_key(dropout, prng_impl)


def _random_bits_keys(jaxpr):
  """The key shapes of every random_bits in `jaxpr`, nested jaxprs included."""
  shapes = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == 'random_bits':
      shapes.append(eqn.invars[0].aval.shape)
    for sub in _sub_jaxprs(eqn.params.values()):
      shapes += _random_bits_keys(sub)
  return shapes


def _sub_jaxprs(values):
  """The jaxprs among an equation's params (a scan's body, a pjit's callee...), found by
  their fields: jax.core.jaxprs_in_params is gone from jax 0.12."""
  for value in values:
    if isinstance(value, (list, tuple)):
      yield from _sub_jaxprs(value)
    elif hasattr(value, 'eqns'):        # Jaxpr
      yield value
    elif hasattr(getattr(value, 'jaxpr', None), 'eqns'):   # ClosedJaxpr
      yield value.jaxpr


@pytest.mark.parametrize('prng_impl', IMPLS)
def test_each_implementation_builds_the_step_with_one_batched_key_per_dropout(prng_impl):
  spec, step, batch, init_key, dropout = _tiny_step(prng_impl)
  state = spec.init(init_key, dropout)
  assert state['rng'].shape == (KEY_WORDS[prng_impl],)
  assert spec.abstract['rng'].shape == state['rng'].shape   # what a restore compares
  # Every mask is drawn from one scalar key for the whole [batch, ...] array: no vmap
  # over per-example keys (a key of shape [batch] would show here).
  key_shapes = _random_bits_keys(jax.make_jaxpr(step)(state, batch).jaxpr)
  assert key_shapes and all(shape == () for shape in key_shapes), key_shapes
  # (Tracing checks the key plumbing; test_resume_rbg_* really trains with rbg.)


def test_unknown_implementation_is_a_clear_error():
  with pytest.raises(ValueError, match=r"prng_impl='philox'; use one of"):
    steps.dropout_key(jax.random.key(0), 'philox')


def test_resuming_with_another_prng_impl_is_a_readable_error(tmp_path):
  """One rbg run (4-word keys), resumed twice: as threefry (2 words) the key shapes differ;
  as unsafe_rbg they are the same (4 words) and config.json says which implementation wrote
  the run. Neither failed resume changes config.json or the checkpoints."""
  config = train_fixtures.tiny_config(total_steps=2, eval_steps=0, checkpoint__every_steps=2,
                                      prng_impl='rbg')
  train.train_and_evaluate(config, str(tmp_path),
                           make_iterator=train_fixtures.make_synthetic_iterator)
  config = train_fixtures.tiny_config(total_steps=4, eval_steps=0, prng_impl='threefry')
  with pytest.raises(train.RunError) as error:
    train.train_and_evaluate(config, str(tmp_path),
                             make_iterator=train_fixtures.make_synthetic_iterator)
  message = str(error.value)
  assert 'rng: checkpoint (4,) uint32, config (2,) uint32' in message, message
  assert 'prng_impl' in message
  config = train_fixtures.tiny_config(total_steps=4, eval_steps=0, prng_impl='unsafe_rbg')
  with pytest.raises(train.RunError, match=r"prng_impl='rbg'.*--config.prng_impl=rbg"):
    train.train_and_evaluate(config, str(tmp_path),
                             make_iterator=train_fixtures.make_synthetic_iterator)


def test_a_config_json_edited_to_another_key_shape_does_not_block_the_resume(tmp_path):
  """The restore's shape check tells threefry keys (2 words) from rbg ones (4 words): a
  config.json edited by hand to say rbg over a threefry checkpoint refused the command
  that wrote it ('trained with prng_impl=rbg'), and --config.prng_impl=rbg then failed on
  the key shape. It resumes, and config.json says threefry again."""
  config = train_fixtures.tiny_config(total_steps=2, eval_steps=0, checkpoint__every_steps=2)
  train.train_and_evaluate(config, str(tmp_path),
                           make_iterator=train_fixtures.make_synthetic_iterator)
  path = tmp_path / 'config.json'
  path.write_text(path.read_text().replace('"prng_impl": "threefry"', '"prng_impl": "rbg"'))
  config = train_fixtures.tiny_config(total_steps=4, eval_steps=0, checkpoint__every_steps=2)
  train.train_and_evaluate(config, str(tmp_path),
                           make_iterator=train_fixtures.make_synthetic_iterator)
  assert sorted(p.name for p in (tmp_path / 'checkpoints').iterdir()) == ['2', '4']
  assert '"prng_impl": "threefry"' in path.read_text()


@pytest.mark.parametrize('prng_impl', sorted(steps.PRNG_IMPLS))
def test_every_step_and_micro_batch_gets_its_own_dropout_key(prng_impl):
  """unsafe_rbg's fold_in is an XOR: folding step then micro-batch index gave micro-batch
  1 of step 0 the masks of micro-batch 0 of step 1 (and so on) under accumulation."""
  rng = jax.random.key(0, impl=steps.jax_prng_impl(prng_impl))
  for accum in (1, 4):
    keys = {(s, i): jax.random.key_data(steps.micro_batch_key(rng, jnp.int32(s), i, accum))
            for s in range(6) for i in range(accum)}
    distinct = {tuple(np.asarray(k).ravel().tolist()) for k in keys.values()}
    assert len(distinct) == len(keys), (prng_impl, accum)


def test_the_train_step_draws_new_masks_each_step_and_the_same_on_a_replay():
  """The dropout key is folded with the state's step: the same params and batch at step 0
  and at step 1 see other masks (other losses), and step 1 replayed (a resume) the same.
  A key that ignored the step would reuse one set of masks for the whole run."""
  spec, step, batch, init_key, dropout = _tiny_step('threefry')
  state = spec.init(init_key, dropout)
  loss_at = lambda s: float(jax.jit(step)(dict(state, step=jnp.asarray(s, state['step'].dtype)),
                                          batch)[1]['train/loss'])
  assert loss_at(0) != loss_at(1)
  assert loss_at(1) == loss_at(1)


def test_a_finite_loss_with_an_infinite_gradient_is_not_applied():
  """A bf16 overflow in the backward pass can leave the loss finite and a gradient
  infinite: the step must count as non-finite and leave params and Adam's moments as
  they were, as for a non-finite loss (the loss alone was not enough to tell)."""
  import optax  # pylint: disable=g-import-not-at-top

  @jax.custom_vjp
  def overflowing(w):
    return jnp.sum(w)
  overflowing.defvjp(lambda w: (jnp.sum(w), None),
                     lambda _, g: (jnp.full((3,), jnp.inf) * g,))

  def loss_fn(params, batch, key):
    del key
    return overflowing(params['w']) * jnp.sum(batch['x']), {}
  tx = optax.adam(0.1)
  step = steps.make_train_step(loss_fn, tx, lambda s: 0.1,
                               weight_fn=lambda batch: jnp.float32(1.0))
  params = {'w': jnp.ones(3)}
  state = {'params': params, 'opt_state': tx.init(params), 'step': jnp.int32(0),
           'rng': jax.random.key_data(jax.random.key(0))}
  new, metrics = jax.jit(step)(state, {'x': jnp.ones(2)})
  assert np.isfinite(float(metrics['train/loss'])) and not np.isfinite(
      float(metrics['train/grad_norm']))
  assert float(metrics['train/finite']) == 0.0
  np.testing.assert_array_equal(new['params']['w'], params['w'])
  for old, kept in zip(jax.tree.leaves(state['opt_state'][0].mu),
                       jax.tree.leaves(new['opt_state'][0].mu)):
    np.testing.assert_array_equal(kept, old)

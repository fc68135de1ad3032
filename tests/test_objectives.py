"""bert_sym.objectives: the sums the update steps and evals take are NaN-proof at weight 0."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bert_sym import model as bert
from bert_sym import objectives
from configs.common import model_config

LENGTH = 128   # splash tiles are 128 long


def test_weighted_sum_ignores_nan_where_the_weight_is_zero():
  values = jnp.array([1.0, jnp.nan, 2.0, jnp.inf])
  weights = jnp.array([1.0, 0.0, 0.5, 0.0])
  assert float(objectives.weighted_sum(values, weights)) == 2.0
  # What the old `sum(values * weights)` gave: NaN for the whole batch.
  assert np.isnan(float(jnp.sum(values * weights)))


def _batch(rng):
  """Two real rows and one zero-length row (all padding: attention mask all 0)."""
  ids = rng.integers(5, 1000, (3, LENGTH)).astype(np.int32)
  mask = np.ones((3, LENGTH), np.int32)
  mask[1, 70:] = 0
  mask[2] = 0
  ids[mask == 0] = 0
  weights = ((rng.random((3, LENGTH)) < 0.15) & (mask == 1)).astype(np.float32)
  return dict(input_ids=ids, token_type_ids=np.zeros_like(ids), attention_mask=mask,
              mlm_targets=rng.integers(5, 1000, (3, LENGTH)).astype(np.int32),
              mlm_weights=weights)


ON_GPU = pytest.mark.skipif(jax.default_backend() != 'gpu', reason='cuDNN needs a GPU')


@pytest.mark.parametrize('impl,sparse', [('xla', False), ('xla', True), ('splash', False),
                                         pytest.param('cudnn', False, marks=[ON_GPU, pytest.mark.gpu])])
def test_mlm_sums_with_a_zero_length_row_equal_those_without_it(impl, sparse):
  cfg = model_config('tiny', 'pairwise')
  cfg.update(vocab_size=1000, dtype='bfloat16' if impl == 'cudnn' else 'float32',
             max_position_embeddings=LENGTH, num_layers=1,
             hidden_size=32, num_heads=2, mlp_dim=64,
             attention_dropout_rate=0.0, attention_impl=impl,
             kernel_interpret=impl == 'splash')   # Pallas in interpret mode on CPU
  model = bert.BertForMaskedLM(cfg)
  params = nn.meta.unbox(model.init(jax.random.key(0), *bert.dummy_inputs(1, LENGTH))['params'])
  batch = _batch(np.random.default_rng(0))
  sums_of = jax.jit(lambda p, b: objectives.mlm_sums(model, p, b, sparse=sparse,
                                                     num_predictions=20))
  sums = sums_of(params, batch)
  assert all(np.isfinite(float(s)) for s in sums), sums
  expected = sums_of(params, {k: v[:2] for k, v in batch.items()})
  np.testing.assert_allclose([float(s) for s in sums], [float(s) for s in expected],
                             rtol=2e-2 if impl == 'cudnn' else 2e-5)
  # The update step's loss: finite, and its gradient too.
  loss_fn = objectives.mlm_loss_fn(model, sparse=sparse, num_predictions=20)
  grads = jax.jit(jax.grad(lambda p: loss_fn(p, batch, None)[0]))(params)
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))


@pytest.mark.parametrize('sparse', [False, True])
def test_mlm_accuracy_counts_the_weighted_targets_only(sparse):
  """The logged MLM accuracy against sklearn's on the weighted positions. Decoys: every
  position of weight 0 holds the token the model predicts there, so counting any of them
  shows (the step-parity batches could not show it: their unweighted targets are [PAD],
  which a model never predicts)."""
  from sklearn import metrics as sklearn_metrics  # pylint: disable=g-import-not-at-top
  cfg = model_config('tiny', 'pairwise')
  cfg.update(vocab_size=1000, dtype='float32', max_position_embeddings=LENGTH, num_layers=1,
             hidden_size=32, num_heads=2, mlp_dim=64, attention_impl='xla')
  model = bert.BertForMaskedLM(cfg)
  params = nn.meta.unbox(model.init(jax.random.key(0), *bert.dummy_inputs(1, LENGTH))['params'])
  batch = _batch(np.random.default_rng(1))
  predicted = np.asarray(model.apply({'params': params}, batch['input_ids'],
                                     batch['token_type_ids'], batch['attention_mask'])).argmax(-1)
  weighted = batch['mlm_weights'] > 0
  hits = weighted & (np.random.default_rng(2).random(weighted.shape) < 0.5)
  batch['mlm_targets'] = np.where(~weighted | hits, predicted, batch['mlm_targets'])
  _, correct, total = objectives.mlm_sums(model, params, batch, sparse=sparse,
                                          num_predictions=LENGTH)
  expected = sklearn_metrics.accuracy_score(batch['mlm_targets'][weighted], predicted[weighted])
  assert 0.3 < expected < 0.7
  np.testing.assert_allclose(float(correct) / float(total), expected, rtol=1e-6)


def test_classifier_loss_is_finite_with_a_padded_row():
  class NanOnPadding(nn.Module):   # stands in for a kernel that returns NaN at length 0
    @nn.compact
    def __call__(self, ids, types, mask, deterministic=True):
      del types, deterministic
      logits = nn.Dense(2)(ids[:, :1].astype(jnp.float32))
      return jnp.where(mask.sum(-1, keepdims=True) > 0, logits, jnp.nan)

  model = NanOnPadding()
  batch = dict(input_ids=jnp.ones((2, 4), jnp.int32), token_type_ids=jnp.zeros((2, 4), jnp.int32),
               attention_mask=jnp.array([[1, 1, 0, 0], [0, 0, 0, 0]]),
               labels=jnp.array([1, 0]), weights=jnp.array([1.0, 0.0]))
  params = model.init(jax.random.key(0), batch['input_ids'], batch['token_type_ids'],
                      batch['attention_mask'])['params']
  loss, _ = objectives.classifier_loss_fn(model, regression=False)(params, batch, None)
  assert np.isfinite(float(loss))


# From a mutation audit: each test fails with the rule it names broken.

_LEN = 32


def _tiny_mlm(dropout):
  cfg = model_config('tiny', 'pairwise')
  cfg.update(vocab_size=200, dtype='float32', max_position_embeddings=_LEN, num_layers=1,
             hidden_size=32, num_heads=2, mlp_dim=64, attention_impl='xla',
             dropout_rate=dropout, attention_dropout_rate=0.0)
  model = bert.BertForMaskedLM(cfg)
  params = nn.meta.unbox(model.init(jax.random.key(0), *bert.dummy_inputs(1, _LEN))['params'])
  rng = np.random.default_rng(0)
  ids = rng.integers(5, 200, (4, _LEN)).astype(np.int32)
  weights = (rng.random((4, _LEN)) < 0.2).astype(np.float32)
  weights[:, 3] = 1.0
  batch = dict(input_ids=ids, token_type_ids=np.zeros_like(ids),
               attention_mask=np.ones_like(ids), mlm_targets=ids, mlm_weights=weights)
  return model, params, batch


def test_the_training_loss_applies_dropout_when_given_a_dropout_key():
  """mlm_loss_fn with a dropout key is the train-mode loss: it differs between keys and
  from the eval-mode (key None) loss; with dropout_rate 0 they all agree."""
  for sparse in (False, True):
    model, params, batch = _tiny_mlm(dropout=0.3)
    loss_fn = objectives.mlm_loss_fn(model, sparse=sparse, num_predictions=_LEN)
    eval_loss = float(loss_fn(params, batch, None)[0])
    a = float(loss_fn(params, batch, jax.random.key(1))[0])
    b = float(loss_fn(params, batch, jax.random.key(2))[0])
    assert a != eval_loss and b != eval_loss and a != b, (a, b, eval_loss)
    model0, params0, batch0 = _tiny_mlm(dropout=0.0)
    loss_fn0 = objectives.mlm_loss_fn(model0, sparse=sparse, num_predictions=_LEN)
    np.testing.assert_allclose(float(loss_fn0(params0, batch0, jax.random.key(1))[0]),
                               float(loss_fn0(params0, batch0, None)[0]), rtol=1e-6)


def test_mlm_weight_of_a_batch_without_targets_is_one_not_zero():
  """A batch with no targets (loss sum 0) must not be divided by 0 (NaN update)."""
  batch = dict(mlm_weights=np.zeros((2, 8), np.float32))
  assert float(objectives.mlm_weight(batch)) == 1.0
  batch = dict(mlm_weights=np.ones((2, 8), np.float32))
  assert float(objectives.mlm_weight(batch)) == 16.0


def test_host_mlm_positions_are_in_sequence_order_on_long_rows():
  """The first P selected positions, ascending, at realistic lengths (512)."""
  rng = np.random.default_rng(0)
  weights = (rng.random((16, 512)) < 0.15).astype(np.float32)
  targets = rng.integers(1, 100, weights.shape).astype(np.int32)
  out = objectives.host_mlm_positions(dict(mlm_weights=weights, mlm_targets=targets), 80)
  for row in range(len(weights)):
    expected = np.flatnonzero(weights[row])[:80]
    n = len(expected)
    np.testing.assert_array_equal(out['mlm_positions'][row, :n], expected)
    np.testing.assert_array_equal(out['mlm_position_targets'][row, :n], targets[row, expected])
    assert (out['mlm_position_weights'][row, n:] == 0).all()


def test_glue_predictions_are_the_most_likely_class_or_the_regressors_output():
  logits = jnp.array([[0.1, 2.0, -1.0], [3.0, 0.0, 1.0]])
  np.testing.assert_array_equal(objectives.predictions(logits, False), [1, 0])
  np.testing.assert_allclose(objectives.predictions(logits[:, :1], True), [0.1, 3.0])

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

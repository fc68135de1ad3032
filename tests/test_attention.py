"""Structural properties of the three compatibility functions (PAPER.md identities)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bert_sym import export
from bert_sym import model as bert
from bert_sym.attention import SelfAttention
from configs.common import model_config
from hf_reference import padded_batch

VARIANTS = ('standard', 'symmetric', 'pairwise')
HIDDEN, HEADS = 64, 4


def attention_module(attention, impl='xla', dropout=0.0):
  return SelfAttention(hidden_size=HIDDEN, num_heads=HEADS, attention=attention,
                       attention_impl=impl, attention_dropout_rate=dropout)


def inputs(batch=2, length=10, seed=0, pad_from=None):
  x = jax.random.normal(jax.random.key(seed), (batch, length, HIDDEN))
  valid = np.ones((batch, length), bool)
  if pad_from is not None:
    valid[1, pad_from:] = False
  return x, jnp.asarray(valid)[:, None, None, :]


def init(module, x, mask, seed=0):
  variables = module.init(jax.random.key(seed), x, mask, deterministic=True)
  return nn.meta.unbox(variables['params'])


@pytest.mark.parametrize('attention,expect_symmetric',
                         [('symmetric', True), ('standard', False), ('pairwise', False)])
def test_symmetric_scores_form_a_symmetric_matrix(attention, expect_symmetric):
  module = attention_module(attention)
  x, mask = inputs()
  params = init(module, x, mask)
  _, probs = module.apply({'params': params}, x, mask, deterministic=True,
                          return_weights=True)
  log_p = np.log(np.asarray(probs, np.float64))               # S_ij - lse_i
  # For symmetric S: log p_ij - log p_ji = lse_j - lse_i. Add back
  # lse_i - lse_0 = log p_0i - log p_i0 to row i: S_ij - lse_0, symmetric iff S is.
  row_shift = np.swapaxes(log_p[..., :1, :], -1, -2) - log_p[..., :, :1]
  recovered = log_p + row_shift
  asymmetry = np.max(np.abs(recovered - np.swapaxes(recovered, -1, -2)))
  if expect_symmetric:
    assert asymmetry < 1e-5
  else:
    assert asymmetry > 1e-2


def test_pairwise_with_identity_equals_symmetric():
  x, mask = inputs(pad_from=6)
  pairwise = attention_module('pairwise')
  params = init(pairwise, x, mask)
  params['pairwise'] = jnp.broadcast_to(jnp.eye(HIDDEN // HEADS), params['pairwise'].shape)
  symmetric_params = {k: v for k, v in params.items() if k != 'pairwise'}
  out_pairwise = pairwise.apply({'params': params}, x, mask, deterministic=True)
  out_symmetric = attention_module('symmetric').apply(
      {'params': symmetric_params}, x, mask, deterministic=True)
  np.testing.assert_allclose(out_pairwise, out_symmetric, atol=1e-6, rtol=0)


def test_pairwise_diagonal_equals_pairwise_with_diagonal_matrix():
  x, mask = inputs(pad_from=6)
  diagonal_module = attention_module('pairwise_diagonal')
  params = init(diagonal_module, x, mask)
  assert params['pairwise_diagonal'].shape == (HEADS, HIDDEN // HEADS)
  full = {k: v for k, v in params.items() if k != 'pairwise_diagonal'}
  full['pairwise'] = jax.vmap(jnp.diag)(params['pairwise_diagonal'])
  out_diagonal = diagonal_module.apply({'params': params}, x, mask, deterministic=True)
  out_full = attention_module('pairwise').apply({'params': full}, x, mask, deterministic=True)
  np.testing.assert_allclose(out_diagonal, out_full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('attention', ['pairwise', 'symmetric'])
def test_equals_standard_with_folded_key(attention):
  """Wk := Wq P^T, bk := bq P^T per head (P = I for symmetric) gives standard attention."""
  x, mask = inputs(pad_from=6)
  module = attention_module(attention)
  params = init(module, x, mask)
  params['query']['bias'] = 0.1 * jax.random.normal(jax.random.key(3), (HEADS, HIDDEN // HEADS))
  key_kernel, key_bias = export.folded_key_projection(
      params['query']['kernel'], params['query']['bias'], params.get('pairwise'))
  standard_params = {k: v for k, v in params.items() if k != 'pairwise'}
  standard_params['key'] = {'kernel': key_kernel, 'bias': key_bias}
  out = module.apply({'params': params}, x, mask, deterministic=True)
  out_standard = attention_module('standard').apply(
      {'params': standard_params}, x, mask, deterministic=True)
  np.testing.assert_allclose(out, out_standard, atol=1e-5, rtol=0)


@pytest.mark.parametrize('attention', VARIANTS)
def test_fused_and_xla_paths_agree(attention):
  cfg = model_config('tiny', attention)
  cfg.vocab_size, cfg.dtype = 1000, 'float32'
  batch = padded_batch(cfg.vocab_size, length=16)
  cfg.attention_impl = 'xla'
  params = nn.meta.unbox(bert.BertForMaskedLM(cfg).init(jax.random.key(0), *batch)['params'])
  xla = bert.BertForMaskedLM(cfg).apply({'params': params}, *batch)
  cfg.attention_impl = 'fused'
  fused = bert.BertForMaskedLM(cfg).apply({'params': params}, *batch)
  np.testing.assert_allclose(fused, xla, atol=1e-5, rtol=0)


@pytest.mark.parametrize('attention', VARIANTS)
def test_padded_keys_get_exactly_zero_attention(attention):
  x, mask = inputs(pad_from=6)
  module = attention_module(attention, dropout=0.1)
  params = init(module, x, mask)
  for deterministic in (True, False):
    _, probs = module.apply({'params': params}, x, mask, deterministic=deterministic,
                            return_weights=True, rngs={'dropout': jax.random.key(1)})
    probs = np.asarray(probs)
    assert np.all(probs[1, :, :, 6:] == 0)
    if deterministic:   # (dropout zeroes some real keys too)
      assert np.all(probs[1, :, :, :6] > 0) and np.all(probs[0] > 0)
      np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-6)
  # Padding must not change what real tokens compute.
  out = module.apply({'params': params}, x, mask, deterministic=True)
  x_changed = x.at[1, 6:].set(100.0)
  out_changed = module.apply({'params': params}, x_changed, mask, deterministic=True)
  np.testing.assert_allclose(out[1, :6], out_changed[1, :6], atol=1e-5, rtol=0)


def test_fused_refuses_attention_dropout():
  x, mask = inputs()
  module = attention_module('pairwise', impl='fused', dropout=0.1)
  params = init(module, x, mask)
  with pytest.raises(ValueError, match='attention_impl'):
    module.apply({'params': params}, x, mask, deterministic=False,
                 rngs={'dropout': jax.random.key(0)})

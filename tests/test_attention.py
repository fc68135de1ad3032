"""Structural properties of the three compatibility functions (the paper's identities;
Courtois et al., Findings of ACL 2024)."""

import functools
import logging
import os
from pathlib import Path
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bert_sym import attention as attention_lib
from bert_sym import config_check
from bert_sym import hf_export as export
from bert_sym import kernel_choice
from bert_sym import lean_backward
from bert_sym.attention import SelfAttention
from tests.train_fixtures import cpu_devices_flags

VARIANTS = ('standard', 'symmetric', 'pairwise')
HIDDEN, HEADS = 64, 4
REPO_ROOT = Path(__file__).resolve().parents[1]


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


# ---------------------------------------------------------------------------------------
# Kernels: every backend computes what the xla reference path computes.
# ---------------------------------------------------------------------------------------

ALL_VARIANTS = attention_lib.VARIANTS
KERNEL_LENGTH = 128   # splash tiles are 128 wide
ON_GPU = jax.default_backend() == 'gpu'


def kernel_inputs(batch=2, length=KERNEL_LENGTH, real=(KERNEL_LENGTH, 77)):
  x = jax.random.normal(jax.random.key(5), (batch, length, HIDDEN))
  valid = np.arange(length)[None, :] < np.asarray(real)[:, None]   # right padding
  return x, jnp.asarray(valid)[:, None, None, :], jnp.asarray(valid)


def loss_and_grads(module, params, x, mask, valid):
  """A loss that reads every real position (as the MLM loss does), and its gradients."""
  cotangent = jax.random.normal(jax.random.key(9), x.shape[:2] + (HIDDEN,))

  def loss(p, x):
    out = module.apply({'params': p}, x, mask, deterministic=True)
    return jnp.sum(out * cotangent * valid[..., None]), out
  (value, out), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, x)
  return value, out, grads


@pytest.mark.parametrize('attention', ALL_VARIANTS)
@pytest.mark.parametrize('impl', [
    'splash', 'pallas',
    pytest.param('cudnn', marks=[pytest.mark.gpu, pytest.mark.skipif(
        not ON_GPU, reason='cuDNN flash attention needs a GPU (jax backend is not gpu)')])])
def test_kernel_equals_xla_path_with_right_padding(impl, attention):
  x, mask, valid = kernel_inputs()
  reference = SelfAttention(hidden_size=HIDDEN, num_heads=HEADS, attention=attention,
                            attention_impl='xla', attention_dropout_rate=0.1)
  # Pallas kernels run compiled on their accelerator (splash: TPU, pallas: GPU); elsewhere
  # in interpret mode.
  native = {'splash': 'tpu', 'pallas': 'gpu'}.get(impl)
  kernel = reference.clone(attention_impl=impl,
                           kernel_interpret=native is not None and jax.default_backend() != native)
  params = init(reference, x, mask)
  params = jax.tree.map(   # non-zero biases, so a dropped one shows
      lambda p: p + 0.05 * jax.random.normal(jax.random.key(2), p.shape), params)
  want_loss, want_out, want_grads = loss_and_grads(reference, params, x, mask, valid)
  got_loss, got_out, got_grads = loss_and_grads(kernel, params, x, mask, valid)
  # cuDNN and our pallas kernel run in bfloat16: a bf16 tolerance there.
  tol = 1e-5 if impl == 'splash' else 3e-2
  real = np.asarray(valid)
  np.testing.assert_allclose(np.asarray(got_out)[real], np.asarray(want_out)[real],
                             atol=tol, rtol=tol)
  np.testing.assert_allclose(got_loss, want_loss, rtol=tol)
  for got, want in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(got, want, atol=tol, rtol=tol)


_SPLASH_ON_A_MESH = textwrap.dedent('''
    import flax.linen as nn, jax, jax.numpy as jnp, ml_collections, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from bert_sym import sharding, steps
    from bert_sym.attention import SelfAttention
    from configs import tiny
    assert jax.device_count() == 8
    mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(MESH_SIZES)))
    rules = sharding.logical_rules(tiny.get_config())
    x = jax.random.normal(jax.random.key(5), (4, 128, 64))
    valid = np.arange(128)[None] < np.array([128, 77, 100, 5])[:, None]
    mask, valid = jnp.asarray(valid)[:, None, None, :], jnp.asarray(valid)
    cotangent = jax.random.normal(jax.random.key(9), x.shape)
    reference = SelfAttention(hidden_size=64, num_heads=4, attention='ATTENTION',
                              attention_impl='xla', attention_dropout_rate=0.0)
    kernel = reference.clone(attention_impl='splash', kernel_interpret=True)
    boxed = reference.init(jax.random.key(0), x, mask, deterministic=True)['params']
    params = jax.device_put(nn.meta.unbox(boxed),
                            sharding.logical_to_shardings(boxed, mesh, rules))
    rows = NamedSharding(mesh, P(('data', 'fsdp')))
    x, mask, valid, cotangent = jax.device_put((x, mask, valid, cotangent), rows)

    def loss_and_grads(module):
      def loss(p, x, mask, valid, cotangent):
        out = module.apply({'params': p}, x, mask, deterministic=True)
        return jnp.sum(out * cotangent * valid[..., None]), out
      return jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)

    def run(module, context=True):
      fn = loss_and_grads(module)
      fn = steps.in_mesh_context(fn, mesh, rules) if context else fn
      return jax.jit(fn), (params, x, mask, valid, cotangent)
    (want, want_out), want_grads = run(reference)[0](*run(reference)[1])
    step, args = run(kernel)
    (got, got_out), got_grads = step(*args)
    real = np.asarray(valid)
    np.testing.assert_allclose(np.asarray(got_out)[real], np.asarray(want_out)[real],
                               atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    for g, w in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
      np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-5)
    # Each device runs the kernel on its own rows and heads: (data, fsdp) and tensor.
    traced = str(jax.make_jaxpr(step)(*args))
    assert 'shard_map' in traced and "('data', 'fsdp')" in traced and 'tensor' in traced
    without = str(jax.make_jaxpr(run(kernel, context=False)[0])(*args))
    assert 'shard_map' not in without
    print('SPLASH ON A MESH OK')
''')


@pytest.mark.parametrize('attention, mesh', [
    ('standard', 'data=2, fsdp=2, tensor=2'), ('pairwise', 'data=2, fsdp=2, tensor=2'),
    ('standard', 'data=1, fsdp=1, tensor=8')])
def test_splash_on_a_mesh_runs_per_shard_and_equals_xla(attention, mesh):
  """On 8 devices (data 2 x fsdp 2 x tensor 2) splash runs inside shard_map, each device
  on its own examples and heads, and equals the xla path in forward and gradients. With
  more tensor ways than heads (4 on tensor=8) the heads stay whole on every device: a
  split that does not divide would be a shard_map error."""
  env = dict(os.environ, XLA_FLAGS=cpu_devices_flags(8),
             JAX_PLATFORMS='cpu', PYTHONPATH=str(REPO_ROOT))
  script = _SPLASH_ON_A_MESH.replace('ATTENTION', attention).replace('MESH_SIZES', mesh)
  result = subprocess.run(
      [sys.executable, '-c', script],
      cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'SPLASH ON A MESH OK' in result.stdout


def test_kernel_comparison_can_fail():
  """The comparison above sees a one-token change of the padding (so it is not vacuous)."""
  x, mask, valid = kernel_inputs()
  reference = attention_module('pairwise')
  params = init(reference, x, mask)
  _, want_out, _ = loss_and_grads(reference, params, x, mask, valid)
  valid2 = np.asarray(valid).copy()
  valid2[1, 77] = True
  mask2 = jnp.asarray(valid2)[:, None, None, :]
  kernel = reference.clone(attention_impl='splash', kernel_interpret=True)
  _, got_out, _ = loss_and_grads(kernel, params, x, mask2, valid)
  assert np.abs(np.asarray(got_out)[np.asarray(valid)] -
                np.asarray(want_out)[np.asarray(valid)]).max() > 1e-3


@pytest.mark.gpu   # the CPU's side of the choice: skipped on a GPU machine
@pytest.mark.skipif(jax.default_backend() != 'cpu', reason='checks the CPU choice')
def test_auto_on_cpu_picks_xla_and_says_so(caplog):
  kernel_choice._log_once.cache_clear()
  with caplog.at_level(logging.INFO):
    impl = kernel_choice.resolve_implementation(
        'auto', training_dropout=False, return_weights=False, seq_len=128)
  assert impl == 'xla'
  assert 'attention_impl=auto on cpu: using xla attention' in caplog.text


def test_auto_falling_back_to_xla_on_an_accelerator_is_a_warning(caplog):
  """The default logs (absl at WARNING) dropped the reason a TPU or GPU run took xla."""
  kernel_choice._log_once.cache_clear()
  with caplog.at_level(logging.WARNING):
    impl = kernel_choice.resolve_implementation(
        'auto', training_dropout=True, return_weights=False, seq_len=128, backend='tpu')
  assert impl == 'xla'
  assert ('attention_impl=auto on tpu: using xla attention, not splash, because '
          'attention dropout') in caplog.text


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason='auto picks cudnn on a GPU only')
def test_auto_on_gpu_runs_cudnn_in_bf16_and_xla_in_fp32(caplog):
  x, mask, _ = kernel_inputs()
  kernel_choice._log_once.cache_clear()
  module = SelfAttention(hidden_size=HIDDEN, num_heads=HEADS, attention='pairwise',
                         attention_impl='auto', dtype=jnp.bfloat16)
  params = init(attention_module('pairwise'), x, mask)
  with caplog.at_level(logging.INFO):
    module.apply({'params': params}, x, mask, deterministic=True)
  assert 'attention_impl=auto on gpu: using cudnn attention' in caplog.text
  with caplog.at_level(logging.INFO):
    module.clone(dtype=jnp.float32).apply({'params': params}, x, mask, deterministic=True)
  assert 'using xla attention, not cudnn, because model.dtype is float32' in caplog.text


@pytest.mark.parametrize('backend,kernel', [('gpu', 'cudnn'), ('tpu', 'splash')])
def test_auto_picks_the_backend_kernel_and_xla_for_dropout(backend, kernel, caplog):
  resolve = functools.partial(kernel_choice.resolve_implementation, 'auto',
                              return_weights=False, seq_len=128, backend=backend)
  assert resolve(training_dropout=False) == kernel
  kernel_choice._log_once.cache_clear()
  with caplog.at_level(logging.INFO):   # splash has no dropout; cuDNN's in scanned layers
    assert resolve(training_dropout=True, scanned=True) == 'xla'
  assert 'attention dropout is on' in caplog.text and kernel in caplog.text
  assert kernel_choice.resolve_implementation(
      'auto', training_dropout=False, return_weights=True, seq_len=128,
      backend=backend) == 'xla'
  if kernel == 'cudnn':   # float32 models stay float32
    assert resolve(training_dropout=False, dtype=jnp.float32) == 'xla'
  else:                   # a length that splash's 128-wide blocks cannot tile
    kernel_choice._log_once.cache_clear()
    with caplog.at_level(logging.INFO):
      assert resolve(training_dropout=False, seq_len=100) == 'xla'
    assert 'sequence length 100 is not a multiple of 128' in caplog.text


def test_a_float16_model_on_tpu_runs_xla_not_splash(caplog):
  """auto took splash for model.dtype=float16 on a TPU, and the TPU compiler failed the
  train step with a MosaicError traceback ('Invalid vector type for load'; bert_sym.aot
  for v5e-4); xla compiles it. Named, splash is refused with the fix."""
  resolve = functools.partial(kernel_choice.resolve_implementation, training_dropout=False,
                              return_weights=False, seq_len=128, backend='tpu')
  kernel_choice._log_once.cache_clear()
  with caplog.at_level(logging.WARNING):
    assert resolve('auto', dtype=jnp.float16) == 'xla'
  assert 'not splash, because model.dtype is float16' in caplog.text
  assert resolve('auto', dtype=jnp.bfloat16) == resolve('auto', dtype=jnp.float32) == 'splash'
  with pytest.raises(ValueError, match=r"'splash' cannot run: model.dtype is float16.*"
                                       r"model.dtype=auto"):
    resolve('splash', dtype=jnp.float16)
  assert resolve('splash', dtype=jnp.float16, interpret=True) == 'splash'   # CPU tests


@pytest.mark.gpu   # skipped on a GPU machine
@pytest.mark.skipif(ON_GPU, reason='checks the error raised off GPU')
def test_cudnn_off_gpu_is_a_clear_error():
  x, mask = inputs()
  module = attention_module('pairwise', impl='cudnn')
  params = init(attention_module('pairwise'), x, mask)
  with pytest.raises(ValueError, match=r"model.attention_impl='cudnn' needs a GPU.*auto"):
    module.apply({'params': params}, x, mask, deterministic=True)


def test_old_fused_name_is_a_clear_error():
  with pytest.raises(ValueError, match="'fused' was removed"):
    kernel_choice.resolve_implementation('fused', training_dropout=False,
                                         return_weights=False, seq_len=128)


def test_named_kernel_refuses_dropout_weights_and_bad_lengths():
  x, mask, _ = kernel_inputs()
  module = SelfAttention(hidden_size=HIDDEN, num_heads=HEADS, attention='pairwise',
                         attention_impl='splash', attention_dropout_rate=0.1,
                         kernel_interpret=True)
  params = init(attention_module('pairwise'), x, mask)
  with pytest.raises(ValueError, match='attention_dropout_rate=0'):
    module.apply({'params': params}, x, mask, deterministic=False,
                 rngs={'dropout': jax.random.key(0)})
  with pytest.raises(ValueError, match='attention weights'):
    module.apply({'params': params}, x, mask, deterministic=True, return_weights=True)
  x_short, mask_short = inputs(length=10)
  with pytest.raises(ValueError, match='multiple of 128'):
    module.apply({'params': params}, x_short, mask_short, deterministic=True)


def test_xla_softmax_keeps_only_compute_dtype_probabilities():
  """Backward of the bf16-output softmax equals jax.nn.softmax's in float32."""
  scores = jax.random.normal(jax.random.key(0), (2, 3, 5, 5))
  cot = jax.random.normal(jax.random.key(1), scores.shape)
  ours = jax.grad(lambda s: jnp.sum(lean_backward.softmax_as(s, jnp.float32) * cot))(scores)
  ref = jax.grad(lambda s: jnp.sum(jax.nn.softmax(s) * cot))(scores)
  np.testing.assert_allclose(ours, ref, atol=1e-6)
  _, vjp = jax.vjp(lambda s: lean_backward.softmax_as(s, jnp.bfloat16), scores)
  residuals = [r for r in jax.tree.leaves(vjp) if getattr(r, 'shape', ()) == scores.shape]
  assert residuals and all(r.dtype == jnp.bfloat16 for r in residuals)


def _autodiff_dropout_attention(q, k, v, mask, rng, rate, dtype):
  """xla_attention's training formula, differentiated by JAX (which keeps the dropout mask
  and the dropped probabilities for the backward pass)."""
  scores = jnp.einsum('bqhd,bkhd->bhqk', q, k, preferred_element_type=jnp.float32)
  scores = jnp.where(mask, scores / np.sqrt(q.shape[-1]), jnp.finfo(jnp.float32).min)
  probs = lean_backward.softmax_as(scores, dtype)
  probs = attention_lib.inverted_dropout(probs, rate, rng)
  return jnp.einsum('bhqk,bkhd->bqhd', probs, v.astype(dtype))


def test_xla_attention_dropout_backward_draws_the_mask_again():
  """The paper recipe's attention dropout on xla: gradients equal JAX's autodiff of the
  same formula (bit for bit in bf16, padding included), and the compiled (CPU) backward
  keeps less than autodiff's: the mask is drawn again from the key, not kept.
  tests/test_aot_gpu.py checks the GPU compiler's step, which merged the two draws (kept
  the mask) without the optimization barrier."""
  q, k, v = (jax.random.normal(jax.random.key(i), (2, 16, 3, 8)) for i in range(3))
  mask = (jnp.arange(16) < jnp.array([16, 11])[:, None])[:, None, None, :]
  rate = 0.1
  for dtype, atol, impl in ((jnp.bfloat16, 0.0, 'threefry2x32'), (jnp.bfloat16, 0.0, 'rbg'),
                            (jnp.bfloat16, 0.0, 'unsafe_rbg'), (jnp.float32, 1e-6, 'threefry2x32')):
    rng = jax.random.key(3, impl=impl)   # config.prng_impl's choices: the same mask drawn twice
    ours = lambda q, k, v: attention_lib.xla_attention(
        q, k, v, mask, dropout_rate=rate, dropout_rng=rng, deterministic=False, dtype=dtype)[0]
    ref = lambda q, k, v: _autodiff_dropout_attention(q, k, v, mask, rng, rate, dtype)
    cot = jax.random.normal(jax.random.key(4), q.shape).astype(dtype)
    (out, vjp), (want, ref_vjp) = jax.vjp(ours, q, k, v), jax.vjp(ref, q, k, v)
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(want, np.float32),
                               atol=atol)
    for got, expected in zip(vjp(cot), ref_vjp(cot)):
      np.testing.assert_allclose(got, expected, atol=atol)
  # The attention maps a training pass returns carry gradients, as autodiff's do.
  maps = lambda lean: lambda q: jnp.sum(attention_lib.xla_attention(
      q, k, v, mask, dropout_rate=rate, dropout_rng=rng, deterministic=False,
      dtype=jnp.float32, lean_backward=lean)[1] ** 2)
  np.testing.assert_allclose(jax.grad(maps(True))(q), jax.grad(maps(False))(q), atol=1e-6)
  assert float(jnp.abs(jax.grad(maps(True))(q)).max()) > 0
  # Compiled (CPU) temporaries of the gradient at 8 x 4 heads x 256 x 256.
  q = jnp.ones((8, 256, 4, 16))
  mask = jnp.ones((8, 1, 1, 256), bool)
  def temp_bytes(attend):
    grad = jax.jit(jax.grad(lambda q: attend(q, q, q).astype(jnp.float32).sum()))
    return grad.lower(q).compile().memory_analysis().temp_size_in_bytes
  ours = temp_bytes(lambda q, k, v: attention_lib.xla_attention(
      q, k, v, mask, dropout_rate=rate, dropout_rng=rng, deterministic=False,
      dtype=jnp.bfloat16)[0])
  autodiff = temp_bytes(lambda q, k, v: _autodiff_dropout_attention(
      q, k, v, mask, rng, rate, jnp.bfloat16))
  mask_bytes = 8 * 4 * 256 * 256   # one bool [batch, heads, L, L]
  assert ours <= autodiff - mask_bytes, (ours, autodiff)


def test_recipes_pair_attention_dropout_with_the_kernel_that_can_run_it():
  from configs import common  # pylint: disable=g-import-not-at-top
  paper = common.base_config('tiny', 'pairwise').model
  fast = common.base_config('tiny', 'pairwise', recipe='fast').model
  assert (paper.attention_impl, paper.attention_dropout_rate) == ('xla', 0.1)
  assert (fast.attention_impl, fast.attention_dropout_rate) == ('auto', 0.0)
  for model in (paper, fast):   # both recipes train on every backend, nothing raises
    for backend in ('cpu', 'gpu', 'tpu'):
      kernel_choice.resolve_implementation(
          model.attention_impl, training_dropout=model.attention_dropout_rate > 0,
          return_weights=False, seq_len=128, backend=backend)
  assert kernel_choice.resolve_implementation(
      fast.attention_impl, training_dropout=False, return_weights=False, seq_len=128,
      backend='gpu') == 'cudnn'
  with pytest.raises(ValueError, match='recipe'):
    common.base_config('tiny', 'pairwise', recipe='fastest')


def test_cudnn_head_sizes_are_judged_by_jaxs_own_flash_attention_check(caplog):
  """cuDNN flash attention takes head sizes that are multiples of 8 up to 128 (256 from
  Hopper): `auto` takes xla for the others, with a warning, and a config naming cudnn is
  refused before the step is built (it was JAX's NotImplementedError traceback at the first
  step). The rule is JAX's check_is_flash_attention (on CPU it applies the pre-Hopper limit)."""
  from jax._src.cudnn import fused_attention_stablehlo as fused  # pylint: disable=g-import-not-at-top
  for head_dim in range(1, 300):
    shape = jax.ShapeDtypeStruct((2, 128, 4, head_dim), jnp.bfloat16)
    try:
      fused.check_is_flash_attention(shape, shape, shape, fused.AttentionLayout.BTNH.value,
                                     90000, has_bias=False, is_training=True)
      jax_takes_it = True
    except NotImplementedError:
      jax_takes_it = False
    assert (kernel_choice.cudnn_head_dim_problem(head_dim) is None) == jax_takes_it, head_dim
  resolve = functools.partial(kernel_choice.resolve_implementation, training_dropout=False,
                              return_weights=False, seq_len=128, backend='gpu')
  assert resolve('auto', head_dim=64) == 'cudnn' and resolve('cudnn', head_dim=64) == 'cudnn'
  kernel_choice._log_once.cache_clear()
  with caplog.at_level(logging.WARNING):
    assert resolve('auto', head_dim=36) == 'xla'
  assert 'using xla attention, not cudnn, because the head size 36' in caplog.text
  with pytest.raises(ValueError, match=r"'cudnn' cannot run: the head size 36 .*num_heads"):
    resolve('cudnn', head_dim=36)
  # The trainer's preflight (and so bert_sym.aot for GPUs) passes the config's head size.
  from configs import common  # pylint: disable=g-import-not-at-top
  config = common.base_config('tiny', 'pairwise', recipe='fast')
  config.model.dtype = 'bfloat16'
  with kernel_choice.target_backend('gpu'):
    config.model.hidden_size, config.model.num_heads = 128, 2
    assert config_check.training_kernel(config) == 'cudnn'
    config.model.hidden_size, config.model.num_heads = 72, 2
    assert config_check.training_kernel(config) == 'xla'
    config.model.attention_impl = 'cudnn'
    with pytest.raises(config_check.ConfigError, match='head size 36'):
      config_check.training_kernel(config)
  # The model passes its own head size: built for a GPU, a 36-wide head runs xla (here).
  x, mask = inputs()
  module = SelfAttention(hidden_size=72, num_heads=2, attention='pairwise',
                         attention_impl='auto', dtype=jnp.bfloat16)
  with kernel_choice.target_backend('gpu'):
    params = module.init(jax.random.key(0), x[..., :72], mask, deterministic=True)
    module.apply(params, x[..., :72], mask, deterministic=True)

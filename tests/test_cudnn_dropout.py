"""Attention dropout inside cuDNN flash attention (bert_sym.attention.cudnn_attention).

On CPU: what the step hands to XLA for a GPU, lowered for the `cuda` platform without a
GPU (the custom calls, their dropout rate and per-layer seeds), and the kernel choice.
On a GPU (marked `gpu`, skipped elsewhere with the reason): what the kernel really does.
"""

import json
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bert_sym import attention as attention_lib
from bert_sym import kernel_choice
from bert_sym import model as model_lib
from configs.common import model_config

ON_GPU = jax.default_backend() == 'gpu'
FORWARD, BACKWARD = '__cudnn$fmhaSoftmaxDropout', '__cudnn$fmhaSoftmaxDropoutBackward'


def tiny_cudnn_config(**overrides):
  cfg = model_config('tiny', 'pairwise')
  cfg.update(dict(vocab_size=256, dtype='bfloat16', attention_impl='cudnn',
                  attention_dropout_rate=0.1, scan_layers=False))
  cfg.update(overrides)
  return cfg


def _custom_calls(hlo_text: str) -> list[tuple[str, dict]]:
  """(target, cudnn_fmha_backend_config) of every cuDNN attention custom call."""
  calls = []
  for match in re.finditer(r'custom_call @(__cudnn\$fmha\w+)\(.*?backend_config = "(.*?)"',
                           hlo_text):
    config = json.loads(match.group(2).replace('\\22', '"'))
    calls.append((match.group(1), config['cudnn_fmha_backend_config']))
  return calls


def lowered_train_grads_for_gpu(cfg, monkeypatch, length=64):
  """The MLM loss's gradient, traced and lowered for `cuda` on whatever host this is."""
  from jax._src.cudnn import fused_attention_stablehlo as fused  # pylint: disable=g-import-not-at-top
  if not ON_GPU:   # no cuDNN library here: only its version is asked, at trace time
    monkeypatch.setattr(fused, 'check_cudnn_version', lambda: 90800)
  module = model_lib.BertForMaskedLM(cfg)
  ids, types, mask = model_lib.dummy_inputs(2, length)
  with kernel_choice.target_backend('gpu'):
    abstract = jax.eval_shape(lambda: nn.meta.unbox(
        module.init(jax.random.key(0), ids, types, mask)['params']))

    def loss(params, key):
      logits = module.apply({'params': params}, ids, types, mask, deterministic=False,
                            rngs={'dropout': key})
      return jnp.mean(logits.astype(jnp.float32))
    traced = jax.jit(jax.grad(loss)).trace(abstract, jax.random.key(1))
    return traced.lower(lowering_platforms=('cuda',)).as_text()


def test_dropout_runs_inside_cudnn_with_its_own_seed_per_layer(monkeypatch):
  if kernel_choice.cudnn_dropout_missing():
    pytest.skip(kernel_choice.cudnn_dropout_missing())
  calls = _custom_calls(lowered_train_grads_for_gpu(tiny_cudnn_config(), monkeypatch))
  forward = [c for t, c in calls if t == FORWARD]
  backward = [c for t, c in calls if t == BACKWARD]
  layers = model_config('tiny').num_layers
  assert len(forward) == len(backward) == layers, [t for t, _ in calls]
  assert {c['dropout_rate'] for c in forward + backward} == {0.1}
  seeds = [c['seed'] for c in forward]
  assert len(set(seeds)) == layers                   # layers draw different masks
  assert sorted(c['seed'] for c in backward) == sorted(seeds)   # each backward its forward's
  assert {c['mask_type'] for c in forward} == {'PADDING'}


def test_evaluation_calls_cudnn_without_dropout(monkeypatch):
  from jax._src.cudnn import fused_attention_stablehlo as fused  # pylint: disable=g-import-not-at-top
  if not ON_GPU:
    monkeypatch.setattr(fused, 'check_cudnn_version', lambda: 90800)
  module = model_lib.BertForMaskedLM(tiny_cudnn_config())
  inputs = model_lib.dummy_inputs(2, 64)
  with kernel_choice.target_backend('gpu'):
    abstract = jax.eval_shape(lambda: module.init(jax.random.key(0), *inputs))
    text = jax.jit(lambda v: module.apply(v, *inputs, deterministic=True)).trace(
        abstract).lower(lowering_platforms=('cuda',)).as_text()
  assert [t for t, _ in _custom_calls(text)] == ['__cudnn$fmhaSoftmax'] * 2


def test_auto_leaves_attention_dropout_on_gpu_to_xla_and_says_why(caplog):
  """cuDNN's in-kernel dropout failed on an H100 (jax 0.11.2, 2026-12-06: the backward
  test aborted the process, the train step hung), so `auto` takes xla for it, with the
  reason; named, cudnn still takes dropout (an opt-in for another JAX)."""
  resolve = lambda impl='auto', **kw: kernel_choice.resolve_implementation(
      impl, return_weights=False, seq_len=128, backend='gpu', **kw)
  kernel_choice._log_once.cache_clear()  # pylint: disable=protected-access
  with caplog.at_level('INFO'):
    assert resolve(training_dropout=True) == 'xla'
  assert 'backward aborted the process' in caplog.text
  assert 'set model.attention_impl=cudnn to try it' in caplog.text
  assert resolve(training_dropout=False) == 'cudnn'   # no dropout: cuDNN
  assert resolve(training_dropout=False, scanned=True) == 'cudnn'
  if not kernel_choice.cudnn_dropout_missing():
    assert resolve('cudnn', training_dropout=True) == 'cudnn'


def test_auto_s_warning_for_dropout_in_scanned_layers_names_a_fix_that_works(caplog):
  """With scanned layers the warning said `set model.scan_layers=False to train with cudnn`,
  but unscanned `auto` still takes xla (cuDNN's dropout failed on a GPU): the fix it names
  must be one that gets cudnn."""
  kernel_choice._log_once.cache_clear()  # pylint: disable=protected-access
  with caplog.at_level('WARNING'):
    assert kernel_choice.resolve_implementation(
        'auto', training_dropout=True, return_weights=False, seq_len=128, backend='gpu',
        scanned=True) == 'xla'
  assert 'backward aborted the process' in caplog.text
  assert ('set model.attention_impl=cudnn to try it with your JAX and '
          'model.scan_layers=False') in caplog.text


def test_named_cudnn_refuses_dropout_with_scanned_layers():
  with pytest.raises(ValueError, match=r"attention_impl='cudnn' with attention dropout.*"
                                       r"scan_layers=False"):
    kernel_choice.resolve_implementation(
        'cudnn', training_dropout=True, return_weights=False, seq_len=128, backend='gpu',
        scanned=True)
  assert kernel_choice.resolve_implementation(
      'cudnn', training_dropout=True, return_weights=False, seq_len=128,
      backend='gpu') == 'cudnn'


def test_old_jax_without_cudnn_dropout_is_a_clear_error(monkeypatch):
  monkeypatch.setattr(kernel_choice, 'cudnn_dropout_missing',
                      lambda: "jax 0.4.1's cuDNN dot_product_attention lacks ['dropout_rate']")
  with pytest.raises(ValueError, match=r'upgrade jax\[cuda\].*attention_impl=xla'):
    kernel_choice.resolve_implementation(
        'cudnn', training_dropout=True, return_weights=False, seq_len=128, backend='gpu')
  assert kernel_choice.resolve_implementation(
      'auto', training_dropout=True, return_weights=False, seq_len=128,
      backend='gpu') == 'xla'


# ---------------------------------------------------------------------------------------
# On a GPU: what the kernel does. V = identity (head dim = sequence length = 64) makes the
# output the dropped, rescaled probability matrix itself: out = (P * M) / (1 - rate).
# ---------------------------------------------------------------------------------------

RATE, LENGTH, BATCH, HEADS = 0.1, 64, 4, 2


def _identity_inputs(real=(LENGTH, LENGTH, 40, 0)):
  q = jax.random.normal(jax.random.key(0), (BATCH, LENGTH, HEADS, LENGTH), jnp.bfloat16)
  k = jax.random.normal(jax.random.key(1), (BATCH, LENGTH, HEADS, LENGTH), jnp.bfloat16)
  v = jnp.broadcast_to(jnp.eye(LENGTH, dtype=jnp.bfloat16)[None, :, None, :],
                       (BATCH, LENGTH, HEADS, LENGTH))
  valid = np.arange(LENGTH)[None, :] < np.asarray(real)[:, None]
  return q, k, v, jnp.asarray(valid)[:, None, None, :]


def _attend(rate, seed=7):
  return jax.jit(lambda q, k, v, m: attention_lib.cudnn_attention(
      q, k, v, m, dtype=jnp.float32, dropout_rate=rate, seed=seed))


def _probabilities(q, k, mask):   # [b, h, q, k] float32, the no-dropout reference
  _, probs = attention_lib.xla_attention(q, k, jnp.zeros_like(q), mask, dropout_rate=0.0,
                                         dropout_rng=None, deterministic=True,
                                         dtype=jnp.float32)
  return np.asarray(probs)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason='cuDNN flash attention needs a GPU')
def test_gpu_dropout_zero_equals_xla():
  q, k, v, mask = _identity_inputs(real=(LENGTH, 50, 40, 64))
  got = np.asarray(_attend(0.0)(q, k, v, mask))
  want, _ = attention_lib.xla_attention(q, k, v, mask, dropout_rate=0.0, dropout_rng=None,
                                        deterministic=True, dtype=jnp.bfloat16)
  np.testing.assert_allclose(got, np.asarray(want, np.float32), atol=2e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason='cuDNN flash attention needs a GPU')
def test_gpu_consecutive_executions_draw_new_masks():
  q, k, v, mask = _identity_inputs(real=(LENGTH,) * BATCH)
  attend = _attend(RATE)
  first, second = np.asarray(attend(q, k, v, mask)), np.asarray(attend(q, k, v, mask))
  assert (first != second).mean() > 0.05   # ~2 * 0.1 * 0.9 of the entries differ


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason='cuDNN flash attention needs a GPU')
def test_gpu_dropped_mass_is_the_rate_and_the_mean_is_unbiased():
  q, k, v, mask = _identity_inputs(real=(LENGTH,) * BATCH)
  probs = np.transpose(_probabilities(q, k, mask), (0, 2, 1, 3))   # [b, q, h, k] as out
  attend, runs = _attend(RATE), 200
  outs = np.stack([np.asarray(attend(q, k, v, mask)) for _ in range(runs)])
  kept_mass = (outs * (1 - RATE)).sum(-1)          # each row of P sums to 1
  assert abs(1 - kept_mass.mean() - RATE) < 0.01, 1 - kept_mass.mean()
  zero_fraction = (outs == 0).mean()
  assert abs(zero_fraction - RATE) < 0.01, zero_fraction
  # E[out] = P: per entry, the mean of `runs` draws has std P * sqrt(r / (1 - r) / runs).
  std = probs * np.sqrt(RATE / (1 - RATE) / runs)
  error = np.abs(outs.mean(0) - probs)
  assert (error <= 5 * std + 1e-2 * probs + 1e-4).mean() > 0.999, error.max()


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason='cuDNN flash attention needs a GPU')
def test_gpu_backward_uses_the_forward_mask():
  """out = D V with D the dropped probabilities; for V = I and an identity cotangent,
  dV = D^T dO = D^T = out^T, which holds only if the backward drew the forward's mask."""
  q, k, v, mask = _identity_inputs(real=(LENGTH,) * BATCH)

  @jax.jit
  def forward_and_dv(q, k, v, mask):
    out, vjp = jax.vjp(lambda v: attention_lib.cudnn_attention(
        q, k, v, mask, dtype=jnp.bfloat16, dropout_rate=RATE, seed=11), v)
    (dv,) = vjp(jnp.broadcast_to(jnp.eye(LENGTH, dtype=out.dtype)[None, :, None, :],
                                 out.shape))
    return out, dv
  for _ in range(3):   # and on later executions, whose offsets have advanced
    out, dv = (np.asarray(a, np.float32) for a in forward_and_dv(q, k, v, mask))
    assert (out == 0).mean() > 0.05                # dropout really was applied
    np.testing.assert_allclose(dv, np.swapaxes(out, 1, 3), atol=2e-2)
    assert ((dv == 0) == (np.swapaxes(out, 1, 3) == 0)).mean() > 0.999


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason='cuDNN flash attention needs a GPU')
@pytest.mark.parametrize('mask_type', ['NO_MASK', 'PADDING'])
@pytest.mark.parametrize('length', [64, 128])
def test_gpu_dropout_backward_runs(mask_type, length):
  """Which of cuDNN's dropout backwards run: on an H100 (jax 0.11.2) the V = identity test
  above aborted the process (padding mask, seq 64 = head dim 64) and the train step (seq
  128 and 512, padding) never ended a step. Each configuration apart, so that a GPU run
  (benchmarks/run_gpu_tests.py reports a crash against its test id) says which fail."""
  from jax._src.cudnn import fused_attention_stablehlo as fused  # pylint: disable=g-import-not-at-top
  q, k, v = (jax.random.normal(jax.random.key(i), (BATCH, length, HEADS, 64), jnp.bfloat16)
             for i in range(3))
  lengths = jnp.asarray([length, length, length // 2, 1], jnp.int32)

  def loss(q, k, v):
    padding = dict(q_seqlen=jnp.full((BATCH,), length, jnp.int32), kv_seqlen=lengths) if (
        mask_type == 'PADDING') else {}
    out = fused.dot_product_attention(
        q, k, v, scale=0.125, mask_type=getattr(fused.MaskType, mask_type), seed=5,
        dropout_rate=RATE, qkv_layout='BTNH', **padding)
    return jnp.sum(out.astype(jnp.float32) ** 2)
  grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
  for g in grads:
    g = np.asarray(g, np.float32)
    assert np.isfinite(g).all() and np.abs(g).max() > 0


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason='cuDNN flash attention needs a GPU')
def test_gpu_gradients_are_finite_for_an_all_padding_row():
  q, k, v, mask = _identity_inputs(real=(LENGTH, LENGTH, 40, 0))   # example 3: no tokens

  def loss(q, k, v):
    out = attention_lib.cudnn_attention(q, k, v, mask, dtype=jnp.float32,
                                        dropout_rate=RATE, seed=3)
    return jnp.sum(out * mask[:, 0, 0, :, None, None])
  grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
  for g in grads:
    assert np.isfinite(np.asarray(g, np.float32)).all()


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason='cuDNN flash attention needs a GPU')
def test_gpu_model_trains_with_cudnn_dropout_when_named():
  cfg = tiny_cudnn_config(attention_impl='cudnn')
  module = model_lib.BertForMaskedLM(cfg)
  ids, types, mask = model_lib.dummy_inputs(2, 64)
  params = nn.meta.unbox(module.init(jax.random.key(0), ids, types, mask)['params'])

  @jax.jit
  def grads(params, key):
    return jax.grad(lambda p: jnp.mean(module.apply(
        {'params': p}, ids, types, mask, deterministic=False, rngs={'dropout': key})))(params)
  hlo = grads.lower(params, jax.random.key(1)).compile().as_text()
  assert FORWARD in hlo   # cudnn, with the dropout inside it
  assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads(params,
                                                                             jax.random.key(1))))


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason='cuDNN flash attention needs a GPU')
@pytest.mark.parametrize('graphs', [{}, {'xla_gpu_graph_min_graph_size': 1}],
                         ids=['default', 'cuda_graphs_forced'])
def test_gpu_a_whole_model_draws_new_masks_each_execution(graphs):
  """The one-op jits above are never recorded into a CUDA graph; the model's program is
  (XLA graphs runs of >= 5 ops by default). A replayed graph must not replay cuDNN's
  dropout offset. Hidden dropout 0 and the same key: only cuDNN's masks can differ."""
  cfg = tiny_cudnn_config(dropout_rate=0.0)
  module = model_lib.BertForMaskedLM(cfg)
  ids, types, mask = model_lib.dummy_inputs(2, 64)
  params = nn.meta.unbox(module.init(jax.random.key(0), ids, types, mask)['params'])
  forward = jax.jit(lambda p, key: module.apply({'params': p}, ids, types, mask,
                                                deterministic=False, rngs={'dropout': key}))
  compiled = forward.lower(params, jax.random.key(1)).compile(compiler_options=graphs)
  assert FORWARD in compiled.as_text()
  outputs = [np.asarray(compiled(params, jax.random.key(1)), np.float32) for _ in range(3)]
  assert not np.array_equal(outputs[0], outputs[1]), 'cuDNN dropout repeated its masks'
  assert not np.array_equal(outputs[1], outputs[2]), 'cuDNN dropout repeated its masks'

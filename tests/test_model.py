"""The BERT model against the paper's numbers and against Hugging Face BERT."""

import flax.linen as nn
import jax
import jax.ad_checkpoint
import jax.numpy as jnp
import numpy as np
import pytest
import transformers

from bert_sym import attention as attention_lib
from bert_sym import kernel_choice
from bert_sym import lean_backward
from bert_sym import hf_export as export
from bert_sym import model as bert
from configs.common import model_config
from hf_reference import hf_mlm_forward, padded_batch, random_hf_mlm

VARIANTS = ('standard', 'symmetric', 'pairwise')


def tiny_config(attention, **overrides):
  cfg = model_config('tiny', attention)
  cfg.vocab_size = 1000
  cfg.dtype = 'float32'
  cfg.update(overrides)
  return cfg


def init_params(module, cfg, seed=0, length=16):
  variables = module.init(jax.random.key(seed), *bert.dummy_inputs(2, length))
  return nn.meta.unbox(variables['params'])


# ---------------------------------------------------------------------------------------
# Parameter counts (the paper's table, Courtois et al., Findings of ACL 2024: encoder + pooler, Hugging Face BertModel convention).
# ---------------------------------------------------------------------------------------

PAPER_COUNTS = {
    ('base', 'standard'): 109_482_240,
    ('base', 'symmetric'): 102_395_136,
    ('base', 'pairwise'): 102_984_960,
    ('small', 'standard'): 28_763_648,
    ('small', 'symmetric'): 27_713_024,
    ('small', 'pairwise'): 27_844_096,
}


@pytest.mark.parametrize('impl, backend', [('cudnn', 'gpu'), ('splash', 'tpu'), ('auto', 'gpu')])
def test_parameters_are_counted_whatever_kernel_the_config_names(impl, backend):
  """The count (ablation summary, --dry_run) built the model for the CPU: a config naming
  cudnn failed there on a real GPU, and splash (which refuses length 8) everywhere."""
  cfg = model_config('small', 'pairwise')
  cfg.attention_impl = impl
  with kernel_choice.target_backend(backend):
    assert bert.encoder_plus_pooler_params(cfg) == PAPER_COUNTS[('small', 'pairwise')]
  assert cfg.attention_impl == impl   # the caller's config is left as it was


@pytest.mark.parametrize('size,attention', sorted(PAPER_COUNTS))
def test_encoder_plus_pooler_params_match_paper(size, attention):
  cfg = model_config(size, attention)
  assert bert.encoder_plus_pooler_params(cfg) == PAPER_COUNTS[(size, attention)]


# Ablations beyond the paper: pairwise_diagonal adds d_h parameters per head and layer
# (hidden_size per layer) to symmetric; standard_syminit is standard with another init.
ABLATION_COUNTS = {
    ('base', 'pairwise_diagonal'): 102_395_136 + 12 * 768,
    ('base', 'standard_syminit'): 109_482_240,
    ('small', 'pairwise_diagonal'): 27_713_024 + 4 * 512,
    ('small', 'standard_syminit'): 28_763_648,
}


@pytest.mark.parametrize('size,attention', sorted(ABLATION_COUNTS))
def test_ablation_variant_counts(size, attention):
  cfg = model_config(size, attention)
  assert bert.encoder_plus_pooler_params(cfg) == ABLATION_COUNTS[(size, attention)]


def test_standard_syminit_starts_with_key_equal_to_query_and_trains_apart():
  cfg = tiny_config('standard_syminit')
  params = init_params(bert.BertForMaskedLM(cfg), cfg)
  for i in range(cfg.num_layers):
    attn = params['encoder'][f'layer_{i}']['attention']
    np.testing.assert_array_equal(attn['key']['kernel'], attn['query']['kernel'])
    assert float(np.std(attn['query']['kernel'])) == pytest.approx(0.02, rel=0.1)
  # Different layers still draw different weights.
  layer0 = params['encoder']['layer_0']['attention']['query']['kernel']
  layer1 = params['encoder']['layer_1']['attention']['query']['kernel']
  assert not np.allclose(layer0, layer1)
  # Q and K are separate parameters: one gradient step moves them differently.
  batch = padded_batch(cfg.vocab_size, batch=2, length=12)
  model = bert.BertForMaskedLM(cfg)
  grads = jax.grad(lambda p: jnp.sum(model.apply({'params': p}, *batch)[..., :5] ** 2))(params)
  g = grads['encoder']['layer_0']['attention']
  assert not np.allclose(g['query']['kernel'], g['key']['kernel'])


@pytest.mark.parametrize('size', ['base', 'small'])
def test_standard_count_matches_hugging_face_bert_model(size):
  cfg = model_config(size, 'standard')
  import torch  # pylint: disable=g-import-not-at-top
  with torch.device('meta'):   # shapes only: drawing bert-base's random weights took seconds
    hf = transformers.BertModel(transformers.BertConfig(**export.hf_bert_config_kwargs(cfg)))
  assert bert.encoder_plus_pooler_params(cfg) == sum(p.numel() for p in hf.parameters())


# ---------------------------------------------------------------------------------------
# Numerical equivalence with Hugging Face BertForMaskedLM (same weights).
# ---------------------------------------------------------------------------------------

def _compare_with_hf(cfg, length, seed=0):
  hf = random_hf_mlm(cfg, seed=seed)
  params = export.mlm_params_from_hf(hf.state_dict(), cfg)
  batch = padded_batch(cfg.vocab_size, batch=3, length=length, seed=seed)
  assert batch[2].min() == 0 and batch[1].max() == 1   # padding and a second segment

  hf_hidden, hf_logits = hf_mlm_forward(hf, *batch)
  model = bert.BertForMaskedLM(cfg)
  logits = model.apply({'params': params}, *batch)
  hidden = model.apply({'params': params}, *batch,
                       method=lambda m, *a: m.encoder(*a))
  # Both implementations compute every position, pads included (pad queries still
  # attend to the real keys), so the comparison covers the whole batch.
  np.testing.assert_allclose(np.asarray(hidden), hf_hidden, atol=1e-4, rtol=0)
  np.testing.assert_allclose(np.asarray(logits), hf_logits, atol=1e-4, rtol=0)


def test_bfloat16_compute_keeps_residual_stream_and_logits_float32():
  """Mixed precision as PyTorch AMP: bf16 matmuls, float32 stream, close to the fp32 HF."""
  cfg = tiny_config('standard', dtype='bfloat16')
  hf = random_hf_mlm(cfg, seed=3)
  params = export.mlm_params_from_hf(hf.state_dict(), cfg)
  batch = padded_batch(cfg.vocab_size, batch=3, length=16, seed=3)
  hf_hidden, hf_logits = hf_mlm_forward(hf, *batch)
  model = bert.BertForMaskedLM(cfg)
  logits = model.apply({'params': params}, *batch)
  hidden = model.apply({'params': params}, *batch, method=lambda m, *a: m.encoder(*a))
  assert hidden.dtype == jnp.float32 and logits.dtype == jnp.float32
  # bf16 has an 8-bit mantissa: errors of ~1e-2 are expected, an fp32 stream keeps them there.
  np.testing.assert_allclose(np.asarray(hidden), hf_hidden, atol=5e-2, rtol=0)
  np.testing.assert_allclose(np.asarray(logits), hf_logits, atol=5e-2, rtol=0)
  assert np.abs(np.asarray(logits) - hf_logits).max() > 0   # bf16 really was used


def _auto_runs() -> str:
  """What attention_impl='auto' runs for the float32 tiny model on this machine."""
  return kernel_choice.resolve_implementation(
      'auto', training_dropout=False, return_weights=False, seq_len=24, dtype=jnp.float32)


# 'auto' is named by the kernel it resolves to here (on CPU: xla, the same as [xla]).
@pytest.mark.parametrize('impl', ['xla', pytest.param('auto', id=f'auto->{_auto_runs()}')])
def test_standard_matches_hugging_face_tiny(impl):
  _compare_with_hf(tiny_config('standard', attention_impl=impl), length=24)


def test_standard_matches_hugging_face_bert_small_shape():
  cfg = model_config('small', 'standard')
  cfg.dtype = 'float32'
  _compare_with_hf(cfg, length=64, seed=1)


# ---------------------------------------------------------------------------------------
# Training-time behaviour.
# ---------------------------------------------------------------------------------------

def _zero_grad_leaves(grads):
  return [jax.tree_util.keystr(path) for path, g in jax.tree_util.tree_leaves_with_path(grads)
          if not np.any(np.asarray(g) != 0)]


@pytest.mark.parametrize('attention', VARIANTS)
def test_every_parameter_gets_a_gradient(attention):
  cfg = tiny_config(attention)
  input_ids, token_type_ids, attention_mask = padded_batch(cfg.vocab_size, length=16)
  labels = jnp.asarray(np.random.default_rng(1).integers(0, cfg.vocab_size, input_ids.shape))

  mlm = bert.BertForMaskedLM(cfg)
  mlm_params = init_params(mlm, cfg)

  def mlm_loss(p):
    logits = mlm.apply({'params': p}, input_ids, token_type_ids, attention_mask)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[..., None], -1))

  grads = jax.grad(mlm_loss)(mlm_params)
  if attention == 'pairwise':
    assert grads['encoder']['layer_0']['attention']['pairwise'].shape == (4, 32, 32)
  assert _zero_grad_leaves(grads) == []

  clf = bert.BertForSequenceClassification(cfg, num_labels=3)
  clf_params = init_params(clf, cfg)
  targets = jnp.array([0, 1, 2])

  def clf_loss(p):
    logits = clf.apply({'params': p}, input_ids, token_type_ids, attention_mask)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), targets[:, None], -1))

  grads = jax.grad(clf_loss)(clf_params)
  assert {'pooler', 'encoder'} <= set(grads['bert']) and 'classifier' in grads
  assert _zero_grad_leaves(grads) == []


@pytest.mark.parametrize('rates', [dict(dropout_rate=0.1, attention_dropout_rate=0.0),
                                   dict(dropout_rate=0.0, attention_dropout_rate=0.1)],
                         ids=['hidden', 'attention_probs'])
def test_dropout_only_in_train_mode(rates):
  cfg = tiny_config('pairwise', **rates)
  model = bert.BertForMaskedLM(cfg)
  params = init_params(model, cfg)
  batch = padded_batch(cfg.vocab_size)
  run = lambda seed: model.apply({'params': params}, *batch, deterministic=False,
                                 rngs={'dropout': jax.random.key(seed)})
  evaluated = model.apply({'params': params}, *batch)
  # Eval mode equals train mode of the same model with both dropout rates 0: deterministic
  # turns every dropout off, and nothing else differs between the modes.
  no_dropout = bert.BertForMaskedLM(tiny_config('pairwise', dropout_rate=0.0,
                                                attention_dropout_rate=0.0))
  without = no_dropout.apply({'params': params}, *batch, deterministic=False,
                             rngs={'dropout': jax.random.key(0)})
  np.testing.assert_allclose(evaluated, without, rtol=0, atol=1e-6)
  np.testing.assert_array_equal(run(0), run(0))
  assert np.max(np.abs(run(0) - evaluated)) > 1e-3
  assert np.max(np.abs(run(0) - run(1))) > 1e-3


@pytest.mark.parametrize('attention', VARIANTS)
def test_sparse_mlm_head_equals_gathered_dense_logits(attention):
  cfg = tiny_config(attention)
  model = bert.BertForMaskedLM(cfg)
  params = init_params(model, cfg)
  batch = padded_batch(cfg.vocab_size)
  positions = jnp.array([[0, 5, 15, 3], [2, 2, 7, 1], [4, 0, 0, 0]], jnp.int32)
  dense = model.apply({'params': params}, *batch)
  sparse = model.apply({'params': params}, *batch, masked_positions=positions)
  assert sparse.shape == (3, 4, cfg.vocab_size)
  np.testing.assert_allclose(sparse, jnp.take_along_axis(dense, positions[..., None], 1),
                             atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------
# Initialisation (as in the paper: P ~ N(0, 1); everything else N(0, 0.02), biases 0, LN 1/0).
# ---------------------------------------------------------------------------------------

def test_initialisation_follows_reference_code():
  cfg = model_config('small', 'pairwise')
  params = init_params(bert.BertForMaskedLM(cfg), cfg, length=8)
  checked = set()
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    name, leaf = jax.tree_util.keystr(path), np.asarray(leaf)
    last = path[-1].key
    if last == 'pairwise':
      assert leaf.shape == (8, 64, 64)
      assert abs(leaf.std() - 1.0) < 0.02 and abs(leaf.mean()) < 0.02, name
    elif last == 'bias':
      assert np.all(leaf == 0), name
    elif last == 'scale':
      assert np.all(leaf == 1), name
    else:   # Dense / DenseGeneral kernels and embedding tables
      assert last in ('kernel', 'embedding'), name
      assert abs(leaf.std() - 0.02) < 0.002 and abs(leaf.mean()) < 0.002, name
    checked.add(last)
  assert checked == {'pairwise', 'bias', 'scale', 'kernel', 'embedding'}


# ---------------------------------------------------------------------------------------
# Scan over layers: the stacked layout converts exactly, and computes the same model.
# ---------------------------------------------------------------------------------------

def _noisy(params, scale=0.05):
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(7), len(leaves))
  return jax.tree.unflatten(
      treedef, [x + scale * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


def _assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize('module', ['mlm', 'glue'])
def test_stack_and_unstack_layers_round_trip_exactly(module):
  cfg = tiny_config('pairwise', num_layers=3)
  scanned_cfg = tiny_config('pairwise', num_layers=3, scan_layers=True)
  make = {'mlm': bert.BertForMaskedLM,
          'glue': lambda c: bert.BertForSequenceClassification(c, num_labels=3)}[module]
  params = _noisy(init_params(make(cfg), cfg))
  stacked = bert.stack_layers(params, cfg.num_layers)
  # The stacked tree is exactly what the scanned model creates (names, shapes, dtypes).
  scanned_shapes = jax.eval_shape(lambda: init_params(make(scanned_cfg), scanned_cfg))
  assert jax.tree.structure(stacked) == jax.tree.structure(scanned_shapes)
  for x, s in zip(jax.tree.leaves(stacked), jax.tree.leaves(scanned_shapes)):
    assert x.shape == s.shape and x.dtype == s.dtype
  encoder = stacked['encoder'] if module == 'mlm' else stacked['bert']['encoder']
  assert encoder['layers']['intermediate']['kernel'].shape[0] == 3
  np.testing.assert_array_equal(encoder['layers']['attention']['pairwise'][2],
                                (params['encoder'] if module == 'mlm' else
                                 params['bert']['encoder'])['layer_2']['attention']['pairwise'])
  _assert_trees_equal(bert.unstack_layers(stacked), params)
  with pytest.raises(ValueError, match='layer_0'):
    bert.stack_layers(params, num_layers=4)


def test_stack_layers_keeps_the_numeric_order_past_ten():
  """bert-base has 12 layers: layer_10 goes after layer_9, not after layer_1 (string order
  would silently permute a converted checkpoint's layers)."""
  tree = {'encoder': {f'layer_{i}': {'w': np.full((2,), i, np.float32)} for i in range(12)}}
  stacked = bert.stack_layers(tree, 12)
  np.testing.assert_array_equal(stacked['encoder']['layers']['w'][:, 0], np.arange(12))
  np.testing.assert_array_equal(
      bert.unstack_layers(stacked)['encoder']['layer_10']['w'], tree['encoder']['layer_10']['w'])


def test_scanned_layers_draw_their_own_dropout_masks(monkeypatch):
  """Under nn.scan each layer gets its own dropout key (split_rngs), as the unscanned
  model's named layers do: one key shared by every layer is another regulariser."""
  cfg = tiny_config('standard', num_layers=3, scan_layers=True, dropout_rate=0.1,
                    attention_dropout_rate=0.0, attention_impl='xla')
  seen = []
  real = bert.inverted_dropout

  def recording(x, rate, rng):
    jax.debug.callback(lambda k: seen.append(np.asarray(k).tobytes()),
                       jax.random.key_data(rng))
    return real(x, rate, rng)

  monkeypatch.setattr(bert, 'inverted_dropout', recording)
  module = bert.BertForMaskedLM(cfg)
  params = init_params(module, cfg, length=8)
  ids, types, mask = bert.dummy_inputs(2, 8)
  jax.block_until_ready(module.apply({'params': params}, ids, types, mask,
                                     deterministic=False, rngs={'dropout': jax.random.key(1)}))
  # The embeddings' dropout, then two a layer (attention output, feed-forward output).
  assert len(seen) == 1 + 2 * 3 and len(set(seen)) == len(seen)


@pytest.mark.parametrize('attention,remat', [
    ('standard', False), ('symmetric', False), ('pairwise', False),
    ('pairwise_diagonal', False), ('standard_syminit', False), ('pairwise', 'dots')])
def test_scanned_model_equals_unscanned_forward_and_grads(attention, remat):
  overrides = dict(num_layers=3, remat=bool(remat), remat_policy=remat or 'full')
  cfg = tiny_config(attention, **overrides)
  scanned_cfg = tiny_config(attention, scan_layers=True, **overrides)
  batch = padded_batch(cfg.vocab_size, length=16)
  params = _noisy(init_params(bert.BertForMaskedLM(cfg), cfg))
  positions = jnp.asarray(np.tile(np.arange(0, 8, 2), (batch[0].shape[0], 1)))

  def loss(p, c):
    logits = bert.BertForMaskedLM(c).apply({'params': p}, *batch, masked_positions=positions)
    return jnp.mean(jax.nn.log_softmax(logits)[..., 3])
  want, want_grads = jax.value_and_grad(loss)(params, cfg)
  got, got_grads = jax.value_and_grad(loss)(bert.stack_layers(params), scanned_cfg)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  got_grads = bert.unstack_layers(got_grads)
  assert jax.tree.structure(got_grads) == jax.tree.structure(want_grads)
  for g, w in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-5)


def test_scanned_model_returns_attention_maps_and_exports_to_hugging_face():
  cfg = tiny_config('pairwise')
  scanned_cfg = tiny_config('pairwise', scan_layers=True)
  batch = padded_batch(cfg.vocab_size, length=16)
  params = _noisy(init_params(bert.BertForMaskedLM(cfg), cfg))
  stacked = bert.stack_layers(params)
  maps = lambda c, p: bert.BertForMaskedLM(c).apply(
      {'params': p}, *batch, method=lambda m, *a: m.encoder(*a, return_weights=True))[1]
  want, got = maps(cfg, params), maps(scanned_cfg, stacked)
  assert len(got) == cfg.num_layers
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, atol=1e-6)
  # The HF export reads the scanned layout and gives the same state dict, which still
  # reproduces our logits (test_export checks the unscanned one the same way).
  exported = export.mlm_params_to_hf(stacked, scanned_cfg)
  reference = export.mlm_params_to_hf(params, cfg)
  assert exported.keys() == reference.keys()
  for k in reference:
    np.testing.assert_array_equal(exported[k], reference[k])
  hf = transformers.BertForMaskedLM(transformers.BertConfig(**export.hf_bert_config_kwargs(cfg)))
  import torch  # pylint: disable=g-import-not-at-top
  hf.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in exported.items()},
                     strict=True)
  _, hf_logits = hf_mlm_forward(hf.eval(), *batch)
  logits = bert.BertForMaskedLM(scanned_cfg).apply({'params': stacked}, *batch)
  np.testing.assert_allclose(np.asarray(logits), hf_logits, atol=1e-4, rtol=0)


def test_remat_policy_names():
  assert bert.remat_policy(tiny_config('pairwise')) is False
  assert bert.remat_policy(tiny_config('pairwise', remat=True)) is None   # save nothing
  with pytest.raises(ValueError, match='model.remat_policy'):
    bert.remat_policy(tiny_config('pairwise', remat=True, remat_policy='everything'))


@pytest.mark.parametrize('where', ['hidden', 'attention'])
def test_dropout_scales_bf16_by_exactly_one_over_keep(where):
  """Training-time dropout must keep the expectation: kept values x / (1 - rate). flax's
  nn.Dropout (and our attention's) divided bf16 values by bf16(0.9) = 0.8984375: every
  kept value 0.18% too large. In float32 the values are flax's, bit for bit."""
  x = jax.random.uniform(jax.random.key(0), (512, 512), jnp.float32, 0.5, 2.0)
  key = jax.random.key(1)
  if where == 'hidden':
    drop = lambda x: bert.Dropout(0.1).apply({}, x, False, rngs={'dropout': key})
  else:
    drop = lambda x: attention_lib.inverted_dropout(x, 0.1, key)
  got = np.asarray(drop(x.astype(jnp.bfloat16)), np.float64)
  kept = got != 0
  assert abs(kept.mean() - 0.9) < 0.005
  original = np.asarray(x.astype(jnp.bfloat16), np.float64)
  ratio = got[kept].sum() / original[kept].sum()   # bf16 rounding of each value averages out
  assert abs(ratio - 1 / 0.9) < 2e-4, ratio
  flax_f32 = nn.Dropout(0.1).apply({}, x, False, rngs={'dropout': key},
                                   **({} if where == 'hidden' else {'rng': key}))
  np.testing.assert_array_equal(np.asarray(drop(x)), np.asarray(flax_f32))


# ---------------------------------------------------------------------------------------
# The FLOPs that MFU divides by.
# ---------------------------------------------------------------------------------------

def _matmul_flops(jaxpr) -> int:
  """2 x output size x contracted size of every dot_general, sub-computations included:
  counted from what JAX traces, not from our formula."""
  total = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == 'dot_general':
      (contracting, _), _ = eqn.params['dimension_numbers']
      lhs = eqn.invars[0].aval.shape
      total += 2 * int(np.prod(eqn.outvars[0].aval.shape)) * int(
          np.prod([lhs[i] for i in contracting]))
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else [value]:
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          total += _matmul_flops(sub.jaxpr)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          total += _matmul_flops(sub)
  return total


@pytest.mark.parametrize('attention', attention_lib.VARIANTS)
@pytest.mark.parametrize('sparse', [False, True], ids=['dense_head', 'sparse_head'])
def test_train_flops_per_token_is_three_times_the_traced_forward_matmuls(attention, sparse):
  """MFU's numerator: every matmul of the forward pass that JAX traces (projections,
  scores and PV over all L keys, pairwise P, MLP, MLM head at the predicted positions),
  times 3 for forward + backward. A wrong term (attention 2Ld instead of 4Ld, a projection
  too many for symmetric) changes every MFU figure the README and benchmarks quote."""
  cfg = tiny_config(attention)
  batch, length, predicted = 2, 24, 5
  model = bert.BertForMaskedLM(cfg)
  params = init_params(model, cfg, length=length)
  ids, types_, mask = (jnp.asarray(a) for a in padded_batch(cfg.vocab_size, batch, length))
  positions = jnp.tile(jnp.arange(predicted)[None], (batch, 1)) if sparse else None
  jaxpr = jax.make_jaxpr(lambda p: model.apply({'params': p}, ids, types_, mask,
                                               masked_positions=positions))(params)
  forward = _matmul_flops(jaxpr.jaxpr)
  fraction = predicted / length if sparse else 1.0
  expected = bert.train_flops_per_token(cfg, length, fraction)
  np.testing.assert_allclose(3 * forward / (batch * length), expected, rtol=1e-9)


def test_gelu_gradient_equals_pytorch_and_keeps_only_its_input(capsys):
  """The exact-erf GELU's hand-written backward against PyTorch's autograd (float32, and
  bfloat16 inputs within bf16 rounding); it keeps one [tokens, mlp] array for the backward
  where autodiff of jax.nn.gelu keeps three (the compiled bert-base step's 4.5 GiB)."""
  import torch  # pylint: disable=g-import-not-at-top
  x = np.concatenate([np.linspace(-8, 8, 1601), [-30.0, -5.5, 0.0, 1e-4, 30.0]]).astype(np.float32)
  grad = np.random.default_rng(0).normal(size=x.shape).astype(np.float32)
  x_t = torch.tensor(x, requires_grad=True)
  torch.nn.functional.gelu(x_t, approximate='none').backward(torch.tensor(grad))
  value, vjp = jax.vjp(lean_backward.gelu, jnp.asarray(x))
  np.testing.assert_allclose(value, torch.nn.functional.gelu(torch.tensor(x)).numpy(),
                             rtol=1e-6, atol=1e-6)   # jax.nn.gelu's own far tail
  np.testing.assert_allclose(vjp(jnp.asarray(grad))[0], x_t.grad.numpy(), rtol=1e-5, atol=1e-6)
  # bf16 operands (the compute dtype on accelerators): the slope in float32, one rounding.
  x16, g16 = jnp.asarray(x, jnp.bfloat16), jnp.asarray(grad, jnp.bfloat16)
  x_t = torch.tensor(np.asarray(x16, np.float32), requires_grad=True)
  torch.nn.functional.gelu(x_t).backward(torch.tensor(np.asarray(g16, np.float32)))
  (dx16,) = jax.vjp(lean_backward.gelu, x16)[1](g16)
  assert dx16.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(dx16, np.float32), x_t.grad.numpy(), rtol=2 ** -8,
                             atol=1e-6)
  # What the backward keeps: x alone (autodiff keeps x, erfc(x) and exp(x)).
  capsys.readouterr()
  jax.ad_checkpoint.print_saved_residuals(
      lambda h: lean_backward.gelu(h).sum(), jnp.ones((4, 8), jnp.bfloat16))
  kept = [line for line in capsys.readouterr().out.splitlines() if 'bf16[4,8]' in line]
  assert len(kept) == 1, kept


def _dot_operand_dtypes(fn, *args):
  jaxpr = jax.make_jaxpr(fn)(*args)
  found = []
  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == 'dot_general':
        found.append(tuple(str(v.aval.dtype) for v in eqn.invars))
      for sub in jax.core.jaxprs_in_params(eqn.params):
        walk(sub)
  walk(jaxpr.jaxpr)
  return found


def test_the_mlm_decoder_backward_runs_in_the_compute_dtype():
  """The tied decoder's logits are float32 (unrounded for the cross-entropy), so autodiff
  ran both backward matmuls in float32 (on the H100, two TF32 GEMMs: 3.5 ms of a 90.7 ms
  step). Lean, the cotangent is rounded to bf16 once, as under PyTorch AMP: the gradients
  equal a float64 product of the rounded operands to bf16 rounding."""
  rng = np.random.default_rng(0)
  hidden = rng.normal(size=(3, 5, 16)).astype(np.float32)
  table = rng.normal(size=(40, 16)).astype(np.float32) * 0.1
  grad = rng.normal(size=(3, 5, 40)).astype(np.float32) * 1e-3
  loss = lambda lean: lambda h, t: jnp.sum(
      lean_backward.decoder_logits(h, t, jnp.bfloat16, lean=lean) * grad)
  d_hidden, d_table = jax.grad(loss(True), argnums=(0, 1))(hidden, table)
  bf16 = lambda a: np.asarray(jnp.asarray(a, jnp.bfloat16), np.float64)
  np.testing.assert_allclose(d_hidden, bf16(bf16(grad) @ bf16(table)), rtol=2 ** -8, atol=1e-9)
  np.testing.assert_allclose(
      d_table, bf16(np.einsum('bpv,bpd->vd', bf16(grad), bf16(hidden))), rtol=2 ** -8, atol=1e-9)
  # Every matmul of the lean gradient takes bf16 operands; autodiff's takes float32 ones.
  grads = lambda lean: jax.grad(loss(lean), argnums=(0, 1))
  assert set(_dot_operand_dtypes(grads(True), hidden, table)) == {('bfloat16', 'bfloat16')}
  assert ('float32', 'bfloat16') in _dot_operand_dtypes(grads(False), hidden, table) or (
      ('bfloat16', 'float32') in _dot_operand_dtypes(grads(False), hidden, table))
  # In float32 (CPU's compute dtype) lean and autodiff agree.
  loss32 = lambda lean: lambda h, t: jnp.sum(
      lean_backward.decoder_logits(h, t, jnp.float32, lean=lean) * grad)
  for got, want in zip(jax.grad(loss32(True), argnums=(0, 1))(hidden, table),
                       jax.grad(loss32(False), argnums=(0, 1))(hidden, table)):
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-9)


def test_the_lean_cross_entropy_equals_optax_with_a_one_pass_gradient():
  """Value and gradient equal optax's softmax_cross_entropy_with_integer_labels (an
  independent implementation); the gradient has no scatter (autodiff of optax's scatters
  into a zero-filled [batch, predictions, vocab] float32 array); a weight-0 position's
  gradient is 0 even where its logits are not finite."""
  import optax  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.normal(size=(3, 5, 50)) * 4, jnp.float32)
  # -1 reads the last class in optax's gather (NumPy's indexing): the gradient agrees.
  labels = jnp.asarray(rng.integers(0, 50, size=(3, 5)), jnp.int32).at[1, 2].set(-1)
  weights = jnp.asarray(rng.integers(0, 2, size=(3, 5)), jnp.float32).at[0, 0].set(0.0)
  weights = weights.at[1, 2].set(1.0)   # the -1 label counts
  # Divided by the number of targets, as the MLM loss is: a gradient that ignored the loss's
  # cotangent (1 / targets here) would still pass with 0/1 weights summed.
  loss = lambda ce: lambda x: jnp.sum(
      jnp.where(weights > 0, ce(x, labels) * weights, 0.0)) / jnp.sum(weights)
  ours = loss(lean_backward.cross_entropy)
  theirs = loss(optax.softmax_cross_entropy_with_integer_labels)
  np.testing.assert_allclose(lean_backward.cross_entropy(logits, labels),
                             optax.softmax_cross_entropy_with_integer_labels(logits, labels),
                             rtol=1e-6)
  np.testing.assert_allclose(jax.grad(ours)(logits), jax.grad(theirs)(logits), atol=1e-6)
  scatters = lambda f: str(jax.make_jaxpr(jax.grad(f))(logits)).count('scatter')
  assert scatters(ours) == 0 and scatters(theirs) > 0
  grad = jax.grad(ours)(logits.at[0, 0].set(jnp.nan))   # position (0, 0) has weight 0
  assert np.all(np.asarray(grad[0, 0]) == 0) and np.isfinite(np.asarray(grad)).all()

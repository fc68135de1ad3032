"""Backward passes written by hand: what each keeps of the forward pass, in which dtype.

JAX differentiates the rest of the model by itself. Here its autodiff would keep arrays
that the backward can recompute for little (the largest activations of a BERT layer), or
run a backward matmul in float32 where PyTorch AMP runs it in the compute dtype:
- `softmax_as`: the probabilities in the compute dtype alone (always);
- with `model.lean_backward` (the default): `gelu` keeps x alone, as PyTorch's does;
  `dropout_attention` (attention dropout on the xla path) draws its mask again from the
  key, as FlashAttention does; `decoder_logits` (the tied MLM decoder, the largest matmul
  of a small BERT) runs its backward matmuls in the compute dtype, as AMP does;
  `cross_entropy` computes its gradient in one elementwise pass over the logits.
`model.lean_backward=False` is JAX autodiff's backward (what the GPU runs measured up to
2026-12-06). Compiled memory: benchmarks/RESULTS.md, "model.lean_backward".
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax


# ---- softmax: float32 statistics, probabilities kept in the compute dtype ----

@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def softmax_as(scores, dtype):
  """softmax(scores) over the last axis, computed in float32, returned in `dtype`.

  Only the `dtype` probabilities are kept for the backward pass (jax.nn.softmax would keep
  its float32 output, the largest activation of a BERT layer: [batch, heads, L, L]).
  """
  return jax.nn.softmax(scores, axis=-1).astype(dtype)


def _softmax_as_fwd(scores, dtype):
  probs = softmax_as(scores, dtype)
  return probs, probs


def softmax_as_backward(dtype, probs, grad):
  del dtype
  probs, grad = probs.astype(jnp.float32), grad.astype(jnp.float32)
  return (probs * (grad - jnp.sum(grad * probs, axis=-1, keepdims=True)),)


softmax_as.defvjp(_softmax_as_fwd, softmax_as_backward)


# ---- attention dropout on the xla path: the mask drawn again in the backward ----

def dropped_probs(probs, rng, rate: float, dtype):
  """(keep mask, inverted dropout of `probs`), scaled in float32 as attention.inverted_dropout."""
  keep = jax.random.bernoulli(rng, 1.0 - rate, probs.shape)
  return keep, jnp.where(keep, (probs.astype(jnp.float32) / (1.0 - rate)).astype(dtype), 0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def dropout_attention(scores, v, rng, rate: float, dtype):
  """dropout(softmax(scores)) v, the backward keeping the probabilities alone: it draws the
  dropout mask again from `rng`, where autodiff would keep the mask and the dropped
  probabilities too, two more [batch, heads, L, L] arrays a layer."""
  return _dropout_attention_fwd(scores, v, rng, rate, dtype)[0]


def _dropout_attention_fwd(scores, v, rng, rate, dtype):
  probs = softmax_as(scores, dtype)
  out = jnp.einsum('bhqk,bkhd->bqhd', dropped_probs(probs, rng, rate, dtype)[1],
                   v.astype(dtype))
  return out, (probs, v, rng)


def _dropout_attention_bwd(rate, dtype, saved, grad):
  probs, v, rng = saved   # the same ops autodiff runs, in the same dtypes
  # Else XLA's GPU compiler merges this draw with the forward's, and keeps the mask.
  probs, rng = jax.lax.optimization_barrier((probs, rng))
  keep, dropped = dropped_probs(probs, rng, rate, dtype)
  grad = grad.astype(dtype)
  d_v = jnp.einsum('bhqk,bqhd->bkhd', dropped, grad).astype(v.dtype)
  d_dropped = jnp.einsum('bqhd,bkhd->bhqk', grad, v.astype(dtype))
  d_probs = jnp.where(keep, (d_dropped.astype(jnp.float32) / (1.0 - rate)).astype(dtype), 0)
  (d_scores,) = softmax_as_backward(dtype, probs, d_probs)
  return d_scores, d_v, None


dropout_attention.defvjp(_dropout_attention_fwd, _dropout_attention_bwd)


# ---- GELU: x alone kept ----

@jax.custom_vjp
def _lean_gelu(x):
  return jax.nn.gelu(x, approximate=False)


def _lean_gelu_bwd(x, grad):
  x32 = x.astype(jnp.float32)   # Phi(x) + x phi(x), in float32 whatever the compute dtype
  slope = (0.5 * (1.0 + jax.lax.erf(x32 * np.float32(1 / np.sqrt(2))))
           + x32 * jnp.exp(-0.5 * x32 * x32) * np.float32(1 / np.sqrt(2 * np.pi)))
  return ((grad.astype(jnp.float32) * slope).astype(x.dtype),)


_lean_gelu.defvjp(lambda x: (_lean_gelu(x), x), _lean_gelu_bwd)


def gelu(x, lean: bool = True):
  """BERT's exact-erf GELU. Lean, its backward keeps x alone; autodiff of jax.nn.gelu keeps
  erfc(x) and exp(x) too (XLA's GPU compiler recomputes exp(x): one more [tokens, mlp]
  array a layer there; tests/test_aot_gpu.py)."""
  return _lean_gelu(x) if lean else jax.nn.gelu(x, approximate=False)


# ---- The tied MLM decoder: backward matmuls in the compute dtype ----

def decoder_logits(hidden, table, dtype, lean: bool = True):
  """Logits [..., vocab] = hidden [..., d] . table [vocab, d]^T: operands in `dtype`,
  accumulated and returned in float32 so that the cross-entropy sees them unrounded.

  The logits' cotangent is float32, so autodiff runs both backward matmuls in float32 (on
  a GPU, two [vocab, d] x [d, predictions] TF32 GEMMs a step: 3.5 ms of the H100 profile's
  90.7 ms step). Lean, the cotangent is rounded to `dtype` first, as under PyTorch AMP,
  whose decoder computes its logits in bf16 too."""
  hidden, table = hidden.astype(dtype), table.astype(dtype)
  if lean:
    return _lean_decoder(hidden, table)
  return jnp.einsum('...d,vd->...v', hidden, table, preferred_element_type=jnp.float32)


@jax.custom_vjp
def _lean_decoder(hidden, table):
  return jnp.einsum('...d,vd->...v', hidden, table, preferred_element_type=jnp.float32)


def _lean_decoder_bwd(saved, grad):
  hidden, table = saved
  grad = grad.astype(hidden.dtype)
  d_hidden = jnp.einsum('...v,vd->...d', grad, table, preferred_element_type=jnp.float32)
  d_table = jnp.einsum('...v,...d->vd', grad, hidden, preferred_element_type=jnp.float32)
  return d_hidden.astype(hidden.dtype), d_table.astype(table.dtype)


_lean_decoder.defvjp(lambda h, t: (_lean_decoder(h, t), (h, t)), _lean_decoder_bwd)


# ---- The MLM cross-entropy: softmax - one-hot, in one pass ----

def cross_entropy(logits, labels, lean: bool = True):
  """optax.softmax_cross_entropy_with_integer_labels(logits, labels).

  Autodiff of optax's picks the label's logit with a gather, whose transpose scatters the
  gradient into a zero-filled float32 [batch, predictions, vocab] array that further passes
  then combine with the softmax (in the compiled H100 step, five passes over 596 MiB
  arrays). Lean, the gradient is softmax - one-hot, scaled, in one elementwise pass that
  XLA fuses with the decoder's cast and bias gradient; where the loss's cotangent is 0
  (weight-0 positions) it is exactly 0, even for non-finite logits."""
  if not lean:
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  return _lean_cross_entropy(logits, labels)


@jax.custom_vjp
def _lean_cross_entropy(logits, labels):
  return _lean_cross_entropy_fwd(logits, labels)[0]


def _lean_cross_entropy_fwd(logits, labels):
  log_normalizer = jax.nn.logsumexp(logits, axis=-1)
  label_logits = jnp.take_along_axis(logits, labels[..., None], axis=-1)[..., 0]
  return log_normalizer - label_logits, (logits, labels, log_normalizer)


def _lean_cross_entropy_bwd(saved, grad):
  logits, labels, log_normalizer = saved
  vocab = logits.shape[-1]
  labels = jnp.where(labels < 0, labels + vocab, labels)   # as the forward's gather reads them
  one_hot = labels[..., None] == jnp.arange(vocab, dtype=labels.dtype)
  d_logits = (jnp.exp(logits - log_normalizer[..., None]) - one_hot) * grad[..., None]
  return jnp.where(grad[..., None] == 0, 0, d_logits).astype(logits.dtype), None


_lean_cross_entropy.defvjp(_lean_cross_entropy_fwd, _lean_cross_entropy_bwd)

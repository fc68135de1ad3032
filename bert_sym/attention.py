"""Self-attention with the three compatibility functions of Courtois et al. (2024).

For head h, with Q = X Wq + bq, K = X Wk + bk and d_h the head size:

  standard   S_h = Q_h K_h^T   / sqrt(d_h)
  symmetric  S_h = Q_h Q_h^T   / sqrt(d_h)      (one shared projection, no Wk/bk)
  pairwise   S_h = Q_h P_h Q_h^T / sqrt(d_h)    (P_h: a learned d_h x d_h matrix)

Two ablations beyond the paper, each a line below:

  pairwise_diagonal  S_h = Q_h diag(p_h) Q_h^T / sqrt(d_h)   (d_h parameters per head)
  standard_syminit   standard, with W_k, b_k initialised equal to W_q, b_q (symmetric
                     initialisation, Saponati et al., ICML 2025); they train apart after

All three reduce to "softmax(q k^T / sqrt(d_h)) v" with k = Q_h and q = Q_h P_h for the
new variants, so the same core (plain XLA or the fused `jax.nn.dot_product_attention`)
serves every variant and no custom kernel is needed.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

VARIANTS = ('standard', 'symmetric', 'pairwise', 'pairwise_diagonal', 'standard_syminit')
# Variants with their own key projection (the others use k = Q_h).
FREE_KEY_VARIANTS = ('standard', 'standard_syminit')
IMPLEMENTATIONS = ('auto', 'xla', 'fused')


def dense_init(stddev):
  return nn.initializers.normal(stddev)


def xla_attention(q, k, v, mask, *, dropout_rate, dropout_rng, deterministic, dtype):
  """Reference core: explicit scores, probabilities in float32, BERT's attention dropout.

  q, k, v: [batch, length, heads, head_dim]; mask: [batch, 1, 1, length] bool (True = key
  is a real token). Returns (output [batch, length, heads, head_dim], probs [b, h, q, k]).
  """
  scale = 1.0 / math.sqrt(q.shape[-1])
  scores = jnp.einsum('bqhd,bkhd->bhqk', q, k, preferred_element_type=jnp.float32) * scale
  # finfo.min (as in Hugging Face BERT) makes exp() exactly 0 at padded keys.
  scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1)
  if not deterministic and dropout_rate > 0.0:
    keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, probs.shape)
    probs = jnp.where(keep, probs / (1.0 - dropout_rate), 0.0)
  out = jnp.einsum('bhqk,bkhd->bqhd', probs.astype(dtype), v)
  return out, probs


def fused_attention(q, k, v, mask, *, dtype):
  """`jax.nn.dot_product_attention`: cuDNN flash attention on GPU where it applies."""
  del dtype
  return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=1.0 / math.sqrt(q.shape[-1]))


class SelfAttention(nn.Module):
  """BERT self-attention plus output projection, with a switchable score function."""
  hidden_size: int
  num_heads: int
  attention: str = 'standard'
  attention_impl: str = 'auto'
  attention_dropout_rate: float = 0.1
  initializer_range: float = 0.02
  pairwise_init_std: float = 1.0
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, mask, *, deterministic: bool, return_weights: bool = False):
    if self.attention not in VARIANTS:
      raise ValueError(f'model.attention={self.attention!r}; use one of {VARIANTS}.')
    if self.attention_impl not in IMPLEMENTATIONS:
      raise ValueError(f'model.attention_impl={self.attention_impl!r}; use one of {IMPLEMENTATIONS}.')
    head_dim = self.hidden_size // self.num_heads

    def projection(name, init_rng=None):
      kernel_init = dense_init(self.initializer_range)
      if init_rng is not None:   # draw from a given key, whatever the module path
        kernel_init = lambda _, shape, dtype, init=kernel_init: init(init_rng, shape, dtype)
      return nn.DenseGeneral(
          features=(self.num_heads, head_dim), dtype=self.dtype, name=name,
          kernel_init=nn.with_logical_partitioning(kernel_init, ('embed', 'heads', 'kv')),
          bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ('heads', 'kv')))

    # ---- The paper's equation: the only lines where the variants differ. ----
    shared_init = None
    if self.attention == 'standard_syminit' and self.is_initializing():
      shared_init = self.make_rng('params')                  # W_k starts equal to W_q
    query = projection('query', shared_init)(x)
    if self.attention in FREE_KEY_VARIANTS:
      key = projection('key', shared_init)(x)                # S = Q K^T
    else:
      key = query                                            # S = Q Q^T (symmetric)
    if self.attention == 'pairwise':
      pairwise = self.param(
          'pairwise', nn.with_logical_partitioning(
              nn.initializers.normal(self.pairwise_init_std), ('heads', 'kv', None)),
          (self.num_heads, head_dim, head_dim))
      # q' = Q_h P_h, so q' k^T = Q_h P_h Q_h^T.
      query = jnp.einsum('blhd,hde->blhe', query, pairwise.astype(self.dtype))
    if self.attention == 'pairwise_diagonal':
      diagonal = self.param(
          'pairwise_diagonal', nn.with_logical_partitioning(
              nn.initializers.normal(self.pairwise_init_std), ('heads', 'kv')),
          (self.num_heads, head_dim))
      query = query * diagonal.astype(self.dtype)            # q' = Q_h diag(p_h)
    # --------------------------------------------------------------------------
    value = projection('value')(x)

    use_dropout = not deterministic and self.attention_dropout_rate > 0.0
    impl = self.attention_impl
    if impl == 'auto':
      # The fused path has no attention-probability dropout and hides the weights.
      impl = 'xla' if (use_dropout or return_weights) else 'fused'
    if impl == 'fused' and (use_dropout or return_weights):
      raise ValueError(
          'attention_impl="fused" cannot apply attention dropout or return attention '
          'weights; set model.attention_impl=xla (or auto), or attention_dropout_rate=0.')

    weights = None
    if impl == 'xla':
      rng = self.make_rng('dropout') if use_dropout else None
      out, weights = xla_attention(
          query, key, value, mask, dropout_rate=self.attention_dropout_rate,
          dropout_rng=rng, deterministic=deterministic, dtype=self.dtype)
    else:
      out = fused_attention(query, key, value, mask, dtype=self.dtype)

    out = nn.DenseGeneral(
        features=self.hidden_size, axis=(-2, -1), dtype=self.dtype, name='output',
        kernel_init=nn.with_logical_partitioning(
            dense_init(self.initializer_range), ('heads', 'kv', 'embed')),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ('embed',)))(out)
    return (out, weights) if return_weights else out

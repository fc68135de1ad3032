"""Self-attention with the three compatibility functions of Courtois et al. (2024).

For head h, with Q = X Wq + bq, K = X Wk + bk and d_h the head size:

  standard   S_h = Q_h K_h^T   / sqrt(d_h)
  symmetric  S_h = Q_h Q_h^T   / sqrt(d_h)      (one shared projection, no Wk/bk)
  pairwise   S_h = Q_h P_h Q_h^T / sqrt(d_h)    (P_h: a learned d_h x d_h matrix)

Two ablations beyond the paper, each a line below:

  pairwise_diagonal  S_h = Q_h diag(p_h) Q_h^T / sqrt(d_h)   (d_h parameters per head)
  standard_syminit   standard, with W_k, b_k initialised equal to W_q, b_q (symmetric
                     initialisation, Saponati et al., ICML 2025); they train apart after

All reduce to "softmax(q k^T / sqrt(d_h)) v" with k = Q_h and q = Q_h P_h for the new
variants, so one core serves every variant and no custom kernel is needed. The core is the
config switch `model.attention_impl` (xla | cudnn | pallas | splash | auto; README,
"Attention kernels and recipes"; bert_sym.kernel_choice picks the one that runs).

Attention dropout inside cuDNN flash attention (`cudnn`, model.attention_dropout_rate > 0)
draws its mask in the kernel from cuDNN's Philox generator: a static seed, and an offset XLA
advances on every execution (CuDnnThunk), so masks change from step to step and a layer's
backward call meets its forward's offset. Hence (GPU tests in tests/test_cudnn_dropout.py):
the mask is not a function of the run's key (a resume restarts the offsets; data-parallel
devices share a pattern); each layer gets its own seed (its module path); and
model.scan_layers=True is refused (the scanned backward would meet other offsets). On an
H100 with jax 0.11.2 its backward aborted the process: `auto` does not take it (kernel_choice).
"""

import functools
import math
import zlib

import flax.linen as nn
import jax
import jax.numpy as jnp

from bert_sym import kernel_choice
from bert_sym import sharding
from bert_sym.lean_backward import dropout_attention, softmax_as

VARIANTS = ('standard', 'symmetric', 'pairwise', 'pairwise_diagonal', 'standard_syminit')
# Variants with their own key projection (the others use k = Q_h).
FREE_KEY_VARIANTS = ('standard', 'standard_syminit')
dense_init = nn.initializers.normal   # BERT's N(0, initializer_range) for every weight


def xla_attention(q, k, v, mask, *, dropout_rate, dropout_rng, deterministic, dtype,
                  lean_backward=True):
  """Reference core: explicit scores, softmax in float32, BERT's attention dropout.

  q, k, v: [batch, length, heads, head_dim]; mask: [batch, 1, 1, length] bool (True = key
  is a real token). Returns (output [batch, length, heads, head_dim], probs [b, h, q, k]).
  The probabilities are rounded to the compute dtype before dropout and the PV matmul
  (as the MXU / tensor cores consume them anyway); `probs` is returned in float32.
  """
  scale = 1.0 / math.sqrt(q.shape[-1])
  scores = jnp.einsum('bqhd,bkhd->bhqk', q, k, preferred_element_type=jnp.float32) * scale
  # finfo.min (as in Hugging Face BERT) makes exp() exactly 0 at padded keys.
  scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
  if not deterministic and dropout_rate > 0.0 and lean_backward:
    out = dropout_attention(scores, v, dropout_rng, dropout_rate, dtype)
    # Attention maps of a training pass (rare: dead code otherwise, which XLA removes),
    # differentiable through autodiff like the rest.
    probs = inverted_dropout(softmax_as(scores, dtype), dropout_rate, dropout_rng)
    return out, probs.astype(jnp.float32)
  probs = softmax_as(scores, dtype)
  if not deterministic and dropout_rate > 0.0:   # autodiff's: keeps mask and dropped probs
    probs = inverted_dropout(probs, dropout_rate, dropout_rng)
  out = jnp.einsum('bhqk,bkhd->bqhd', probs, v.astype(dtype))
  return out, probs.astype(jnp.float32)


def inverted_dropout(x, rate: float, rng):
  """Dropout dividing by 1 - rate in float32: flax's nn.Dropout divides bf16 values by
  bf16(0.9) = 0.8984375, +0.18% in training only (float32: flax's values, bit for bit)."""
  keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
  return jnp.where(keep, (x.astype(jnp.float32) / (1.0 - rate)).astype(x.dtype), 0)


def key_lengths(mask):
  """[batch, 1, 1, L] key mask -> [batch] int32 real lengths (padding on the right)."""
  return jnp.sum(mask[:, 0, 0, :], axis=-1, dtype=jnp.int32)


def cudnn_attention(q, k, v, mask, *, dtype, dropout_rate: float = 0.0, seed: int = 0):
  """cuDNN flash attention. Padding as lengths (cuDNN rejects a [B,1,1,L] mask), so it
  assumes right padding, as every iterator of this project produces.

  With `dropout_rate` > 0 the kernel drops attention probabilities itself (BERT's
  attention dropout, scaled by 1/(1-rate)); `seed` is static and the masks advance with
  every execution (module docstring). jax.nn.dot_product_attention has no dropout, so that
  case calls JAX's cuDNN entry point directly (checked by kernel_choice.cudnn_dropout_missing).
  """
  bf16 = jnp.bfloat16
  q, k, v = q.astype(bf16), k.astype(bf16), v.astype(bf16)
  scale = 1.0 / math.sqrt(q.shape[-1])
  if dropout_rate <= 0.0:
    out = jax.nn.dot_product_attention(
        q, k, v, scale=scale, key_value_seq_lengths=key_lengths(mask),
        implementation='cudnn')
    return out.astype(dtype)
  missing = kernel_choice.cudnn_dropout_missing()
  if missing:
    raise ValueError(f'attention dropout inside cuDNN flash attention: {missing}. Upgrade '
                     'jax[cuda] or use model.attention_impl=xla.')
  # pylint: disable-next=g-import-not-at-top
  from jax._src.cudnn import fused_attention_stablehlo as fused
  batch, length = q.shape[0], q.shape[1]
  out = fused.dot_product_attention(
      q, k, v, q_seqlen=jnp.full((batch,), length, jnp.int32),
      kv_seqlen=key_lengths(mask), scale=scale, mask_type=fused.MaskType.PADDING,
      seed=int(seed), dropout_rate=float(dropout_rate), qkv_layout='BTNH')
  return out.astype(dtype)


def pallas_attention(q, k, v, mask, *, dtype, dropout_rate: float = 0.0, dropout_rng=None,
                     interpret: bool = False):
  """Our flash attention with BERT's attention dropout inside the kernel (GPU;
  bert_sym.flash_dropout). Its seed is drawn from the layer's dropout key, so masks are a
  function of the run's key. Under a mesh it runs in `jax.shard_map`, as splash does, each
  device on its own examples and heads, with its shard's index folded into the seed."""
  from bert_sym import flash_dropout  # pylint: disable=g-import-not-at-top  (Pallas Triton: on demand)
  seed = (jax.random.bits(dropout_rng, (), jnp.uint32) if dropout_rate > 0.0
          else jnp.uint32(0))
  attend = functools.partial(flash_dropout.attention, dtype=dtype, dropout_rate=dropout_rate,
                             interpret=interpret)

  def attend_shard(q, k, v, mask, axes):
    shard_seed = seed
    for axis in axes:
      shard_seed = flash_dropout.fold(shard_seed, jax.lax.axis_index(axis))
    return attend(q, k, v, mask, seed=shard_seed)
  return _on_each_shard(attend_shard, ('batch', None, 'heads', None), q, k, v, mask)


def _on_each_shard(attend, layout, q, k, v, keys):
  """`attend(q, k, v, keys, axes)` for a Pallas kernel: on one device, or on a mesh (the
  step traced under `sharding.kernel_mesh`) in `jax.shard_map`, each device on its own
  examples and heads, as MaxText does: a Pallas call is opaque to the SPMD partitioner,
  which would otherwise gather q, k and v onto every device. `layout`: q's logical axes;
  `keys` is split as q's first axis; `axes`: the mesh axes a device's shard is split over
  (() on one device)."""
  context = sharding.current_kernel_mesh()
  if context is None or context[0].size == 1:
    return attend(q, k, v, keys, ())
  mesh, rules = context
  qkv = kernel_partition_spec(layout, q.shape, mesh, rules)
  axes = tuple(a for part in qkv if part for a in ((part,) if isinstance(part, str) else part))
  rows = jax.sharding.PartitionSpec(qkv[0], *[None] * (keys.ndim - 1))
  return jax.shard_map(lambda *args: attend(*args, axes), mesh=mesh,
                       in_specs=(qkv, qkv, qkv, rows), out_specs=qkv,
                       check_vma=False)(q, k, v, keys)


def static_dropout_seed(module_path) -> int:
  """A per-layer static cuDNN dropout seed (31-bit CRC of the module path): layers differ."""
  return zlib.crc32('/'.join(map(str, module_path)).encode()) & 0x7FFFFFFF


def kernel_partition_spec(logical_axes, shape, mesh, rules) -> jax.sharding.PartitionSpec:
  """The mesh axes of each dimension under the logical axis `rules`, dropped for a
  dimension they do not divide evenly."""
  spec = nn.logical_to_mesh_axes(logical_axes, rules)
  dims = []
  for size, axes in zip(shape, spec):
    names = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    dims.append(axes if size % math.prod(mesh.shape[a] for a in names) == 0 else None)
  return jax.sharding.PartitionSpec(*dims)


def splash_attention(q, k, v, mask, *, dtype, interpret=False):
  """Pallas splash attention (TPU), one kernel call per example (vmapped over the batch).

  Padding as segment ids (1 = real token, 0 = padding): a real query sees exactly the real
  keys, as in xla_attention. A padded query sees only padded keys (xla: the real ones);
  nothing reads padded positions, so losses and gradients are the same.

  On a mesh of several devices it runs per shard (`_on_each_shard`).
  """
  # pylint: disable=g-import-not-at-top
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
  # pylint: enable=g-import-not-at-top

  def attend(q, k, v, segments, _):   # [b, h, L, d] and [b, L], on one device's shard
    _, heads, length, _ = q.shape
    block = math.gcd(length, 512)
    blocks = sk.BlockSizes(
        block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
        block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    kernel = sk.make_splash_mha(
        mask=sm.MultiHeadMask([sm.FullMask((length, length))] * heads), block_sizes=blocks,
        head_shards=1, q_seq_shards=1, interpret=interpret)
    return jax.vmap(lambda q, k, v, s: kernel(q, k, v, segment_ids=sk.SegmentIds(s, s)))(
        q, k, v, segments)

  segments = mask[:, 0, 0, :].astype(jnp.int32)
  heads_major = lambda t: jnp.swapaxes(t.astype(dtype), 1, 2)   # [b, h, L, d]
  q = q * jnp.asarray(1.0 / math.sqrt(q.shape[-1]), q.dtype)   # splash does not scale
  q, k, v = heads_major(q), heads_major(k), heads_major(v)
  out = _on_each_shard(attend, ('batch', 'heads', None, None), q, k, v, segments)
  return jnp.swapaxes(out, 1, 2).astype(dtype)


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
  kernel_interpret: bool = False   # Pallas kernels in interpret mode (CPU tests)
  scanned: bool = False            # inside nn.scan over layers (model.scan_layers)
  lean_backward: bool = True       # xla + dropout: the backward draws the mask again

  @nn.compact
  def __call__(self, x, mask, *, deterministic: bool, return_weights: bool = False):
    if self.attention not in VARIANTS:
      raise ValueError(f'model.attention={self.attention!r}; use one of {VARIANTS}.')
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
    heads = lambda t: sharding.constrain(t, ('batch', None, 'heads', None))   # as projected
    query, key, value = heads(query), heads(key), heads(projection('value')(x))
    out, weights = self._attend(query, key, value, mask, deterministic, return_weights)
    out = nn.DenseGeneral(
        features=self.hidden_size, axis=(-2, -1), dtype=self.dtype, name='output',
        kernel_init=nn.with_logical_partitioning(
            dense_init(self.initializer_range), ('heads', 'kv', 'embed')),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ('embed',)))(out)
    return (out, weights) if return_weights else out

  def _attend(self, query, key, value, mask, deterministic, return_weights):
    """(softmax(q k^T / sqrt(d)) v, its weights or None) on the kernel chosen for it."""
    use_dropout = not deterministic and self.attention_dropout_rate > 0.0
    as_trained = self.attention_impl == 'auto' and self.attention_dropout_rate > 0.0
    impl = kernel_choice.resolve_implementation(   # auto's eval: the kernel of training, that the trainer names
        self.attention_impl, training_dropout=use_dropout or as_trained,
        return_weights=return_weights, seq_len=query.shape[-3],
        interpret=self.kernel_interpret, dtype=self.dtype, scanned=self.scanned,
        head_dim=query.shape[-1])
    if impl == 'xla':
      rng = self.make_rng('dropout') if use_dropout else None
      return xla_attention(
          query, key, value, mask, dropout_rate=self.attention_dropout_rate,
          dropout_rng=rng, deterministic=deterministic, dtype=self.dtype,
          lean_backward=self.lean_backward)
    if impl == 'pallas':
      return pallas_attention(
          query, key, value, mask, dtype=self.dtype,
          dropout_rate=self.attention_dropout_rate if use_dropout else 0.0,
          dropout_rng=self.make_rng('dropout') if use_dropout else None,
          interpret=self.kernel_interpret), None
    if impl == 'cudnn':
      return cudnn_attention(
          query, key, value, mask, dtype=self.dtype,
          dropout_rate=self.attention_dropout_rate if use_dropout else 0.0,
          seed=static_dropout_seed(self.scope.path)), None
    return splash_attention(query, key, value, mask, dtype=self.dtype,
                            interpret=self.kernel_interpret), None

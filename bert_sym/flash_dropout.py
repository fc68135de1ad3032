"""Flash attention with BERT's attention dropout inside the kernel, for NVIDIA GPUs: the
`pallas` attention kernel (Pallas, lowered through Triton).

Why a kernel of our own: the paper trains with attention dropout 0.1. The xla path
writes [batch, heads, L, L] scores, probabilities and masks to memory (0.91x Hugging Face
on an H100), and cuDNN's in-kernel dropout aborted its backward pass on an H100 with jax
0.11.2 (benchmarks/RESULTS.md). FlashAttention-2 drops probabilities inside the kernel
and regenerates the same mask in the backward pass, so nothing [L, L] is stored.

The kernels are JAX's Pallas GPU flash attention (jax.experimental.pallas.ops.gpu.attention:
online softmax forward, backward from the saved log-sum-exp) with dropout added as in
FlashAttention-2. With Z the keep mask scaled by 1 / (1 - rate) and P the softmax:

  forward   O = (P * Z) V                      (the normaliser from the undropped P)
  backward  dV = (P * Z)^T dO,  dP = (dO V^T) * Z,  dS = P * (dP - rowsum(dO * O))

Z comes from a counter-based hash of (seed, batch, head, query, key) (`keep_mask`), so the
backward pass recomputes the forward's mask. The seed is an input drawn from the layer's
dropout key each step: masks are a function of the run's key, as on the xla path (cuDNN's
are not). Padding is a key mask given as segment ids (1 real, 0 padding): real queries
attend to real keys, padded queries to padded keys (their outputs are never read), so no
row is empty, an all-padding example included.

JAX 0.11 deprecates Pallas's Triton backend (Mosaic GPU is its successor): the kernels
name it (plgpu.CompilerParams), and a port waits for this one to be measured.
"""

import functools
import math

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
import jax.numpy as jnp

BLOCK = 64   # queries and keys per tile; sequence lengths must be multiples of it
_LOG2E = math.log2(math.e)
_MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)
_SEED_SPEC = pl.BlockSpec((1,), lambda *_: (0,))   # the int32[1] seed, whole, in every program


def _mix(x):
  """A 32-bit integer hash with good avalanche (lowbias32, C. Wellons): uint32 -> uint32."""
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x7FEB352D)
  x = x ^ (x >> 15)
  x = x * jnp.uint32(0x846CA68B)
  return x ^ (x >> 16)


def keep_mask(seed, batch_head, rows, cols, length: int, rate: float):
  """True where the probability of (query `rows`, key `cols`) is kept: one independent
  draw per (seed, batch * heads + head, query, key), the same in every kernel and in the
  plain-JAX reference. `rows` and `cols` broadcast against each other (int32)."""
  threshold = jnp.uint32(min(round(rate * 2.0 ** 32), 2 ** 32 - 1))
  stream = fold(seed, batch_head)
  position = (rows * length + cols).astype(jnp.uint32)
  return _mix(_mix(stream ^ position) + stream) >= threshold


def _scores(q, k, q_segments, k_segments, scale):
  """Scaled scores in log2 units, padding masked (a segment sees its own segment only)."""
  s = plgpu.dot(q, k.T) * (scale * _LOG2E)
  return jnp.where(q_segments[:, None] == k_segments[None, :], s, _MASKED)


def _forward_kernel(seed_ref, q_ref, k_ref, v_ref, segments_ref, o_ref, lse_ref, *,
                    scale, rate, num_heads):
  length = k_ref.shape[0]
  start_q, batch, head = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  rows_slice = pl.ds(start_q * BLOCK, BLOCK)
  q, q_segments = q_ref[...], segments_ref[rows_slice]
  rows = start_q * BLOCK + lax.broadcasted_iota(jnp.int32, (BLOCK, BLOCK), 0)
  batch_head = batch * num_heads + head

  def body(block, carry):
    o, m, l = carry
    keys = pl.ds(block * BLOCK, BLOCK)
    s = _scores(q, k_ref[keys, :], q_segments, segments_ref[keys], scale)
    m_next = jnp.maximum(m, jnp.max(s, axis=-1))
    correction = jnp.exp2(m - m_next)
    p = jnp.exp2(s - m_next[:, None])
    l = correction * l + jnp.sum(p, axis=-1)   # the softmax's normaliser: undropped
    if rate > 0.0:
      cols = block * BLOCK + lax.broadcasted_iota(jnp.int32, (BLOCK, BLOCK), 1)
      p = jnp.where(keep_mask(seed_ref[0], batch_head, rows, cols, length, rate), p, 0.0)
    v = v_ref[keys, :]
    return correction[:, None] * o + plgpu.dot(p.astype(v.dtype), v), m_next, l

  init = (jnp.zeros(q.shape, jnp.float32), jnp.full((BLOCK,), -jnp.inf, jnp.float32),
          jnp.zeros((BLOCK,), jnp.float32))
  o, m, l = lax.fori_loop(0, length // BLOCK, body, init)
  o = o / (l[:, None] * (1.0 - rate))
  o_ref[...] = o.astype(o_ref.dtype)
  lse_ref[...] = m + jnp.log2(l)


def _backward_kernel(seed_ref, q_ref, k_ref, v_ref, segments_ref, do_ref, lse_ref,
                     delta_ref, dq_ref, dk_ref, dv_ref, *, scale, rate, num_heads):
  length = q_ref.shape[0]
  batch, head, block = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  batch_head = batch * num_heads + head
  iota = lambda axis: lax.broadcasted_iota(jnp.int32, (BLOCK, BLOCK), axis)

  def tile(q_start, k_start, q, k, v, do):
    """(P * Z, dS) of one tile: the softmax P from the saved log-sum-exp, Z the scaled
    mask, and the scores' gradient (module docstring)."""
    rows_slice, keys = pl.ds(q_start, BLOCK), pl.ds(k_start, BLOCK)
    s = _scores(q, k, segments_ref[rows_slice], segments_ref[keys], scale)
    p = jnp.exp2(s - lse_ref[rows_slice][:, None])
    dp, dropped = plgpu.dot(do, v.T), p
    if rate > 0.0:
      keep = keep_mask(seed_ref[0], batch_head, q_start + iota(0), k_start + iota(1),
                       length, rate)
      z = jnp.where(keep, 1.0 / (1.0 - rate), 0.0)
      dp, dropped = dp * z, p * z
    return dropped, p * (dp - delta_ref[rows_slice][:, None]) * scale

  # dK and dV of this block of keys, over every block of queries.
  k_start = block * BLOCK
  k, v = k_ref[pl.ds(k_start, BLOCK), :], v_ref[pl.ds(k_start, BLOCK), :]

  def dk_dv(q_block, carry):
    dk, dv = carry
    q_start = q_block * BLOCK
    rows_slice = pl.ds(q_start, BLOCK)
    q, do = q_ref[rows_slice, :], do_ref[rows_slice, :]
    dropped, ds = tile(q_start, k_start, q, k, v, do)
    dv = dv + plgpu.dot(dropped.astype(do.dtype).T, do)
    return dk + plgpu.dot(ds.astype(q.dtype).T, q), dv

  zeros = jnp.zeros(k.shape, jnp.float32)
  dk, dv = lax.fori_loop(0, length // BLOCK, dk_dv, (zeros, zeros))
  dk_ref[...] = dk.astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)

  # dQ of this block of queries, over every block of keys.
  q_start = block * BLOCK
  rows_slice = pl.ds(q_start, BLOCK)
  q, do = q_ref[rows_slice, :], do_ref[rows_slice, :]

  def dq_step(k_block, dq):
    k_start = k_block * BLOCK
    k, v = k_ref[pl.ds(k_start, BLOCK), :], v_ref[pl.ds(k_start, BLOCK), :]
    _, ds = tile(q_start, k_start, q, k, v, do)
    return dq + plgpu.dot(ds.astype(k.dtype), k)

  dq = lax.fori_loop(0, length // BLOCK, dq_step, jnp.zeros(q.shape, jnp.float32))
  dq_ref[...] = dq.astype(dq_ref.dtype)


def _specs(length, head_dim, *blocks):
  """BlockSpecs over [batch, length, heads, head_dim] inputs for a (i, j, k) grid."""
  return [pl.BlockSpec((None, length, None, head_dim), index) for index in blocks]


def _forward(q, k, v, segments, seed, rate, scale, interpret):
  batch, length, heads, head_dim = q.shape
  out, lse = pl.pallas_call(
      functools.partial(_forward_kernel, scale=scale, rate=rate, num_heads=heads),
      grid=(length // BLOCK, batch, heads),
      in_specs=[_SEED_SPEC,
                pl.BlockSpec((None, BLOCK, None, head_dim), lambda i, b, h: (b, i, h, 0)),
                *_specs(length, head_dim, lambda i, b, h: (b, 0, h, 0),
                        lambda i, b, h: (b, 0, h, 0)),
                pl.BlockSpec((None, length), lambda i, b, h: (b, 0))],
      out_specs=[pl.BlockSpec((None, BLOCK, None, head_dim), lambda i, b, h: (b, i, h, 0)),
                 pl.BlockSpec((None, None, BLOCK), lambda i, b, h: (b, h, i))],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((batch, heads, length), jnp.float32)],
      compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
      interpret=interpret, name='flash_dropout_forward',
  )(seed, q, k, v, segments)
  return out, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _flash(q, k, v, segments, seed, rate, scale, interpret):
  return _forward(q, k, v, segments, seed, rate, scale, interpret)[0]


def _flash_fwd(q, k, v, segments, seed, rate, scale, interpret):
  out, lse = _forward(q, k, v, segments, seed, rate, scale, interpret)
  return out, (q, k, v, segments, seed, out, lse)


def _flash_bwd(rate, scale, interpret, residuals, do):
  q, k, v, segments, seed, out, lse = residuals
  batch, length, heads, head_dim = q.shape
  # rowsum(dO * O) per query: FlashAttention-2's D, the same with dropout (module docstring).
  delta = jnp.einsum('blhd,blhd->bhl', do.astype(jnp.float32), out.astype(jnp.float32))
  whole = lambda b, h, _: (b, 0, h, 0)
  tile = lambda b, h, i: (b, i, h, 0)
  row = pl.BlockSpec((None, None, length), lambda b, h, _: (b, h, 0))
  dq, dk, dv = pl.pallas_call(
      functools.partial(_backward_kernel, scale=scale, rate=rate, num_heads=heads),
      grid=(batch, heads, length // BLOCK),
      in_specs=[_SEED_SPEC, *_specs(length, head_dim, whole, whole, whole),
                pl.BlockSpec((None, length), lambda b, h, _: (b, 0)),
                *_specs(length, head_dim, whole), row, row],
      out_specs=[pl.BlockSpec((None, BLOCK, None, head_dim), tile)] * 3,
      out_shape=[jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (q, k, v)],
      compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
      interpret=interpret, name='flash_dropout_backward',
  )(seed, q, k, v, segments, do.astype(q.dtype), lse, delta)
  return dq, dk, dv, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def problem(seq_len: int, head_dim: int | None) -> str | None:
  """Why the kernel cannot take these shapes (None: it can; head_dim None: not checked)."""
  if seq_len % BLOCK:
    return f'the sequence length {seq_len} is not a multiple of {BLOCK}'
  if head_dim is not None and (head_dim < 16 or head_dim & (head_dim - 1)):
    return f'the head size {head_dim} is not a power of 2 of at least 16'
  return None


def fold(seed, index):
  """Another seed (uint32) for `index`: each (batch, head) of `keep_mask`, and each shard
  under jax.shard_map (devices holding other examples or heads must not repeat each
  other's masks: their local indices coincide)."""
  # Mixed after the xor: a bare xor per mesh axis would cancel (shards (0, 0) and (1, 1)
  # of two axes would share a seed).
  return _mix(jnp.asarray(seed).astype(jnp.uint32) ^ _mix(
      jnp.asarray(index).astype(jnp.uint32) * jnp.uint32(0x85EBCA6B) + jnp.uint32(0x27D4EB2F)))


def attention(q, k, v, mask, *, dtype, dropout_rate: float = 0.0, seed=None,
              interpret: bool = False):
  """softmax(q k^T / sqrt(d)) v with attention dropout inside the kernel, on one device.

  q, k, v: [batch, length, heads, head_dim]; mask: the [batch, 1, 1, length] key mask of
  bert_sym.attention (True or 1 = a real token); `seed`: a uint32 scalar (needed when
  `dropout_rate` > 0), e.g. drawn from the layer's dropout key. Computes in bfloat16 with
  float32 accumulation; returns `dtype`."""
  bf16 = jnp.bfloat16
  if why_not := problem(q.shape[1], q.shape[-1]):
    raise ValueError(f'model.attention_impl=pallas: {why_not}.')
  segments = mask.reshape(mask.shape[0], mask.shape[-1]).astype(jnp.int32)
  seed = jnp.uint32(0) if seed is None else jnp.asarray(seed, jnp.uint32)
  seed = lax.bitcast_convert_type(seed, jnp.int32).reshape(1)
  out = _flash(q.astype(bf16), k.astype(bf16), v.astype(bf16), segments, seed,
               float(dropout_rate), 1.0 / math.sqrt(q.shape[-1]), interpret)
  return out.astype(dtype)


def reference(q, k, v, mask, *, dropout_rate: float, seed):
  """The same attention in plain JAX, float32, with the kernels' mask (`keep_mask`):
  the tests' reference for outputs and gradients."""
  batch, length, heads, _ = q.shape
  segments = mask.reshape(batch, length).astype(jnp.int32)
  s = jnp.einsum('bqhd,bkhd->bhqk', q.astype(jnp.float32), k.astype(jnp.float32))
  s = s / math.sqrt(q.shape[-1])
  same = segments[:, None, :, None] == segments[:, None, None, :]
  p = jax.nn.softmax(jnp.where(same, s, -jnp.inf), axis=-1)
  if dropout_rate > 0.0:
    batch_head = (jnp.arange(batch)[:, None] * heads + jnp.arange(heads)[None, :])
    rows = jnp.arange(length)[:, None]
    cols = jnp.arange(length)[None, :]
    keep = keep_mask(jnp.asarray(seed, jnp.uint32), batch_head[:, :, None, None], rows, cols,
                     length, dropout_rate)
    p = jnp.where(keep, p / (1.0 - dropout_rate), 0.0)
  return jnp.einsum('bhqk,bkhd->bqhd', p, v.astype(jnp.float32))

"""The `pallas` attention kernel (bert_sym.flash_dropout): flash attention with BERT's
attention dropout inside the kernel.

On CPU the Pallas kernels run in interpret mode, against a plain-JAX reference that
applies the kernels' own mask (`keep_mask`): outputs and gradients of the real positions,
with and without dropout, padding of every length (an all-padding example included).
The mask itself is checked for its rate and independence by counting. On a GPU (marked
`gpu`) the compiled Triton kernels are checked against the same reference.
"""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bert_sym import attention as attention_lib
from bert_sym import flash_dropout
from bert_sym import kernel_choice
from tests.train_fixtures import REPO_ROOT, cpu_devices_flags

ON_GPU = jax.default_backend() == 'gpu'
RATE, BATCH, LENGTH, HEADS, HEAD_DIM = 0.1, 4, 128, 2, 32


def _inputs(lengths=(LENGTH, 100, 65, 0), seed=0):
  q, k, v = (jax.random.normal(jax.random.key(seed + i), (BATCH, LENGTH, HEADS, HEAD_DIM))
             for i in range(3))
  valid = np.arange(LENGTH)[None, :] < np.asarray(lengths)[:, None]
  return q, k, v, jnp.asarray(valid)[:, None, None, :], valid


def _check_against_reference(rate, interpret):
  q, k, v, mask, valid = _inputs()
  seed = jnp.uint32(123456789)
  cotangent = jax.random.normal(jax.random.key(9), q.shape) * valid[:, :, None, None]
  bf16 = lambda t: t.astype(jnp.bfloat16).astype(jnp.float32)   # the kernel's inputs

  def loss(fn, q, k, v):
    out = fn(q, k, v)
    return jnp.sum(out * cotangent), out
  kernel = lambda q, k, v: flash_dropout.attention(q, k, v, mask, dtype=jnp.float32,
                                                   dropout_rate=rate, seed=seed,
                                                   interpret=interpret)
  reference = lambda q, k, v: flash_dropout.reference(bf16(q), bf16(k), bf16(v), mask,
                                                      dropout_rate=rate, seed=seed)
  (_, got), got_grads = jax.jit(jax.value_and_grad(
      lambda *a: loss(kernel, *a), argnums=(0, 1, 2), has_aux=True))(q, k, v)
  (_, want), want_grads = jax.value_and_grad(
      lambda *a: loss(reference, *a), argnums=(0, 1, 2), has_aux=True)(q, k, v)
  np.testing.assert_allclose(np.asarray(got)[valid], np.asarray(want)[valid], atol=2e-2)
  for g, w in zip(got_grads, want_grads):   # bf16 tiles: about 1% of the largest entry
    g, w = np.asarray(g), np.asarray(w)
    assert np.isfinite(g).all()
    np.testing.assert_allclose(g, w, atol=0.02 * np.abs(w).max())
  return np.asarray(got), valid


@pytest.mark.parametrize('rate', [0.0, RATE])
def test_outputs_and_gradients_equal_the_reference(rate):
  got, valid = _check_against_reference(rate, interpret=True)
  if rate:   # dropout really applied: the output is not the undropped one
    q, k, v, mask, _ = _inputs()
    undropped = flash_dropout.reference(q, k, v, mask, dropout_rate=0.0, seed=0)
    assert np.abs(got[valid] - np.asarray(undropped)[valid]).max() > 0.1


def test_padding_anywhere_not_only_on_the_right():
  """Segment ids, not lengths: left padding and a hole in the middle are masked too."""
  q, k, v, _, _ = _inputs()
  valid = np.ones((BATCH, LENGTH), bool)
  valid[0, :70] = False          # left padding, past the first tile
  valid[1, 40:90] = False        # a hole
  mask = jnp.asarray(valid)[:, None, None, :]
  got = flash_dropout.attention(q, k, v, mask, dtype=jnp.float32, dropout_rate=RATE,
                                seed=jnp.uint32(5), interpret=True)
  bf16 = lambda t: t.astype(jnp.bfloat16).astype(jnp.float32)
  want = flash_dropout.reference(bf16(q), bf16(k), bf16(v), mask, dropout_rate=RATE, seed=5)
  np.testing.assert_allclose(np.asarray(got)[valid], np.asarray(want)[valid], atol=2e-2)


def test_the_reference_comparison_sees_another_mask():
  """Not vacuous: the kernel with another seed is far from the reference's mask."""
  q, k, v, mask, valid = _inputs()
  got = flash_dropout.attention(q, k, v, mask, dtype=jnp.float32, dropout_rate=RATE,
                                seed=jnp.uint32(1), interpret=True)
  want = flash_dropout.reference(q, k, v, mask, dropout_rate=RATE, seed=2)
  assert np.abs(np.asarray(got)[valid] - np.asarray(want)[valid]).max() > 0.1


def test_the_mask_drops_the_rate_independently_everywhere():
  """Counted over 2 x 12 x 512 x 512 draws: the rate, no position bias (rows, columns),
  and independence between seeds, heads and examples (both dropped: rate squared)."""
  length, heads = 512, 12
  rows, cols = np.arange(length)[:, None], np.arange(length)[None, :]
  batch_head = (np.arange(2)[:, None] * heads + np.arange(heads)[None, :])[..., None, None]
  draw = lambda seed: np.asarray(flash_dropout.keep_mask(
      jnp.uint32(seed), jnp.asarray(batch_head), jnp.asarray(rows), jnp.asarray(cols),
      length, RATE))
  keep = draw(7)
  n = keep.size
  dropped = 1 - keep.mean()
  assert abs(dropped - RATE) < 4 * np.sqrt(RATE * (1 - RATE) / n), dropped
  per_row, per_col = 1 - keep.mean(axis=(0, 1, 3)), 1 - keep.mean(axis=(0, 1, 2))
  sigma = np.sqrt(RATE * (1 - RATE) / (n / length))
  assert np.abs(per_row - RATE).max() < 5 * sigma and np.abs(per_col - RATE).max() < 5 * sigma
  pairs = [(keep, draw(8)), (keep[:, 0], keep[:, 1]), (keep[0], keep[1])]
  for a, b in pairs:
    both = ((~a) & (~b)).mean()
    assert abs(both - RATE ** 2) < 5 * np.sqrt(RATE ** 2 / a.size), both


def test_the_seed_comes_from_the_layers_dropout_key():
  """The same key gives the same masks, another key others: masks follow the run's key."""
  q, k, v, mask, valid = _inputs()
  run = lambda key: np.asarray(attention_lib.pallas_attention(
      q, k, v, mask, dtype=jnp.float32, dropout_rate=RATE, dropout_rng=key,
      interpret=True))[valid]
  first = run(jax.random.key(3))
  np.testing.assert_array_equal(first, run(jax.random.key(3)))
  assert np.abs(first - run(jax.random.key(4))).max() > 0.1


def test_named_pallas_is_checked_like_the_other_kernels():
  resolve = lambda **kw: kernel_choice.resolve_implementation('pallas', **{
      'training_dropout': True, 'return_weights': False, 'seq_len': 128, **kw})
  with pytest.raises(ValueError, match="'pallas' needs a GPU"):
    resolve(backend='cpu')
  assert resolve(backend='cpu', interpret=True) == 'pallas'
  assert resolve(backend='gpu', head_dim=64) == 'pallas'   # attention dropout: yes
  with pytest.raises(ValueError, match='not a multiple of 64'):
    resolve(backend='gpu', seq_len=100)
  with pytest.raises(ValueError, match='not a power of 2'):
    resolve(backend='gpu', head_dim=48)
  with pytest.raises(ValueError, match='cannot return attention weights'):
    resolve(backend='gpu', return_weights=True)
  # auto does not take it until a GPU has measured it.
  assert kernel_choice.resolve_implementation(
      'auto', training_dropout=True, return_weights=False, seq_len=128,
      backend='gpu') == 'xla'


_ON_A_MESH = '''
import jax, jax.numpy as jnp, ml_collections, numpy as np
from bert_sym import attention, flash_dropout, sharding
mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=2, fsdp=2, tensor=2)))
rules = (('batch', ('data', 'fsdp')), ('heads', 'tensor'))
x = jax.random.normal(jax.random.key(0), (1, 128, 2, 32))
q = k = v = jnp.concatenate([x] * 4)              # four identical examples
mask = jnp.ones((4, 1, 1, 128), bool)
run = lambda rate: jax.jit(lambda q, k, v: attention.pallas_attention(
    q, k, v, mask, dtype=jnp.float32, dropout_rate=rate, dropout_rng=jax.random.key(1),
    interpret=True))(q, k, v)
with sharding.kernel_mesh(mesh, rules):
  sharded, sharded_dropped = run(0.0), run(0.1)
alone = flash_dropout.attention(q, k, v, mask, dtype=jnp.float32, interpret=True)
np.testing.assert_allclose(np.asarray(sharded), np.asarray(alone), atol=1e-5)
out = np.asarray(sharded_dropped)
# Each example on its own device: the same local index, yet other masks.
assert all(np.abs(out[0] - out[i]).max() > 0.1 for i in (1, 2, 3)), 'masks repeat'
assert np.abs(out[0, :, 0] - out[0, :, 1]).max() > 0.1   # heads on two devices
print('PALLAS ON A MESH OK')
'''


def test_on_a_mesh_each_device_draws_its_own_masks():
  """Under a mesh the kernel runs per shard (jax.shard_map); without the shard's index in
  the seed, four devices holding four identical examples drew four identical masks."""
  env = dict(os.environ, XLA_FLAGS=cpu_devices_flags(8), JAX_PLATFORMS='cpu',
             PYTHONPATH=str(REPO_ROOT))
  result = subprocess.run([sys.executable, '-c', _ON_A_MESH], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'PALLAS ON A MESH OK' in result.stdout


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason='the Triton kernels need a GPU')
@pytest.mark.parametrize('rate', [0.0, RATE])
def test_gpu_kernels_equal_the_reference(rate):
  _check_against_reference(rate, interpret=False)

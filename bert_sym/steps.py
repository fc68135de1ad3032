"""The device side of every training loop: state creation, the update step, the eval step.

Pre-training (bert_sym.train) and GLUE fine-tuning (bert_sym.glue) build their steps here,
so that both get the same sharded init, gradient accumulation, non-finite guard and
donation. A state is the dict {'params', 'opt_state', 'step', 'rng'} (rng = raw key data:
dropout at step s is a function of (rng, s), so a resumed run draws the same masks); its
layout is the checkpoint format (bert_sym.checkpoint).

The dropout keys' PRNG implementation is a knob (config.prng_impl, PRNG_IMPLS): threefry
(JAX's default, the same bits on every backend), rbg or unsafe_rbg (XLA's RngBitGenerator,
as MaxText and axlearn set on accelerators; unsafe_rbg also derives fold_in/split keys
with it). Each step uses one key per dropout layer for the whole batch, never a vmap over
per-example keys. The key data's shape differs (threefry 2 words, rbg 4), so a checkpoint
says which implementation wrote it.
"""

import dataclasses
import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from bert_sym import sharding

# (params, batch, dropout key) -> (sum of the per-target losses, {name: sum}); the step
# divides both by `weight_fn(batch)` (the whole batch's, not a micro-batch's).
LossFn = Callable[[Any, dict, jax.Array], tuple[jax.Array, dict]]

# config.prng_impl -> JAX's name of the implementation.
PRNG_IMPLS = {'threefry': 'threefry2x32', 'rbg': 'rbg', 'unsafe_rbg': 'unsafe_rbg'}


def jax_prng_impl(name: str) -> str:
  if name not in PRNG_IMPLS:
    raise ValueError(f'prng_impl={name!r}; use one of {sorted(PRNG_IMPLS)} (threefry is '
                     "JAX's default; rbg and unsafe_rbg use XLA's RngBitGenerator).")
  return PRNG_IMPLS[name]


def dropout_key(key: jax.Array, prng_impl: str = 'threefry') -> jax.Array:
  """A key of implementation `prng_impl` drawn from the threefry `key` (itself if threefry),
  so that the parameters' initialisation does not depend on the dropout RNG."""
  impl = jax_prng_impl(prng_impl)
  if impl == str(jax.random.key_impl(key)):
    return key
  words = jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0, impl=impl))).shape
  return jax.random.wrap_key_data(jax.random.bits(key, words, jnp.uint32), impl=impl)


@dataclasses.dataclass
class StateSpec:
  """Shapes and shardings of a state, known before anything is allocated."""
  init: Callable[..., dict]        # jitted (init key, dropout key) -> state, created sharded
  init_params: Callable[..., Any]  # jitted init key -> params, created sharded
  from_params: Callable[..., dict]  # jitted (params, dropout key) -> state at step 0
  abstract: Any                    # ShapeDtypeStruct tree of the state, with .sharding
  shardings: dict                  # NamedSharding tree of the state
  abstract_params: Any             # unboxed ShapeDtypeStruct tree of the params
  param_shardings: Any


def create_state(init_params: Callable[[jax.Array], Any], tx, mesh, rules,
                 prng_impl: str = 'threefry') -> StateSpec:
  """Shapes first (jax.eval_shape), then jitted inits that create the state sharded.

  `init_params(key)` returns the (logically boxed) params of a flax module. Parameters
  follow the logical-axis `rules`; Adam's moments shard like their parameters; step and
  rng are replicated. `from_params` starts from given params instead (e.g. a classifier
  with a pre-trained encoder, bert_sym.checkpoint.with_pretrained_encoder). `prng_impl`:
  the dropout key's implementation (the state's rng has its key data shape).
  """
  replicated = sharding.replicated(mesh)
  boxed = jax.eval_shape(init_params, jax.random.key(0))
  param_shardings = sharding.logical_to_shardings(boxed, mesh, rules)
  abstract_params = nn.meta.unbox(boxed)
  opt_shardings = sharding.opt_state_shardings(tx, abstract_params, param_shardings, mesh)
  shardings = {'params': param_shardings, 'opt_state': opt_shardings,
               'step': replicated, 'rng': replicated}

  def state_from(params, dropout_key):
    return {'params': params, 'opt_state': tx.init(params), 'step': jnp.int32(0),
            'rng': jax.random.key_data(dropout_key)}

  params_only = lambda key: nn.meta.unbox(init_params(key))
  init = jax.jit(lambda key, dropout_key: state_from(params_only(key), dropout_key),
                 out_shardings=shardings)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          jax.eval_shape(init, jax.random.key(0), jax.random.key(
                              0, impl=jax_prng_impl(prng_impl))),
                          shardings)
  return StateSpec(init, jax.jit(params_only, out_shardings=param_shardings),
                   jax.jit(state_from, out_shardings=shardings), abstract, shardings,
                   abstract_params, param_shardings)


def micro_batch_key(rng, step, index, accum: int, fold_micro_index: bool = True):
  """The dropout key of micro-batch `index` at `step`: a different one for every pair.

  With accumulation, one fold of the pair's rank: unsafe_rbg's fold_in is an XOR, so the
  two folds fold_in(fold_in(rng, s), i) gave micro-batch i of step s the masks of
  micro-batch s of step i.
  """
  if accum > 1:
    return jax.random.fold_in(rng, step * accum + index)
  step_key = jax.random.fold_in(rng, step)
  return jax.random.fold_in(step_key, index) if fold_micro_index else step_key


def make_train_step(loss_fn: LossFn, tx: optax.GradientTransformation, schedule, *,
                    weight_fn: Callable[[dict], jax.Array], accum: int = 1, mesh=None,
                    batch_sharding=None, fold_micro_index: bool = True,
                    prng_impl: str = 'threefry'):
  """The update step (not yet jitted): (state, batch) -> (new state, metrics).

  - `accum` > 1 splits the batch into micro-batches (rows `accum` apart, so that each
    stays on the batch's devices) and adds their gradients in a `lax.scan`. The loss is
    normalised by the whole batch's `weight_fn`, so the sum is the big-batch gradient.
  - Dropout key of micro-batch i at step s (`micro_batch_key`): with accum > 1,
    fold_in(rng, s * accum + i); else fold_in(fold_in(rng, s), 0), or with
    `fold_micro_index=False` fold_in(rng, s) itself. `rng` holds key data of
    implementation `prng_impl` (PRNG_IMPLS).
  - A non-finite loss or gradient norm leaves params and Adam's moments as they were
    (decided on the device, before anything is applied); the schedule's counter still
    advances. `train/finite` tells the host, which stops or skips (bert_sym.loop).
  Metrics: train/loss, train/grad_norm, train/learning_rate, train/finite and
  train/<name> = sum / weight for every extra sum of `loss_fn`.
  """
  impl = jax_prng_impl(prng_impl)

  def train_step(state, batch):
    params, step = state['params'], state['step']
    rng = jax.random.wrap_key_data(state['rng'], impl=impl)
    total_weight = weight_fn(batch)

    def micro_grads(micro_batch, index):
      key = micro_batch_key(rng, step, index, accum, fold_micro_index)

      def scaled_loss(p):
        loss_sum, sums = loss_fn(p, micro_batch, key)
        return loss_sum / total_weight, sums
      (loss, sums), grads = jax.value_and_grad(scaled_loss, has_aux=True)(params)
      return grads, loss, sums

    if accum == 1:
      grads, loss, sums = micro_grads(batch, 0)
    else:
      grads, loss, sums = _summed_over_micro_batches(micro_grads, batch, accum, mesh,
                                                     batch_sharding)
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    new_params, new_opt_state = _update_if_finite(tx, grads, state, finite)
    new_state = {'params': new_params, 'opt_state': new_opt_state, 'step': step + 1,
                 'rng': state['rng']}
    metrics = {'train/loss': loss, **{f'train/{k}': v / total_weight for k, v in sums.items()},
               'train/learning_rate': schedule(step), 'train/grad_norm': grad_norm,
               'train/finite': finite.astype(jnp.float32)}
    return new_state, metrics
  return train_step


def _summed_over_micro_batches(micro_grads, batch, accum, mesh, batch_sharding):
  """`micro_grads(micro_batch, index)` summed over `accum` micro-batches in a lax.scan."""
  # [B, ...] -> [accum, B/accum, ...] taking rows accum apart, so that every micro-batch
  # stays split over the same devices as the batch (no resharding).
  def split(x):
    x = jnp.swapaxes(x.reshape((x.shape[0] // accum, accum) + x.shape[1:]), 0, 1)
    if mesh is None or batch_sharding is None:
      return x
    return jax.lax.with_sharding_constraint(x, jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec(None, *batch_sharding.spec)))
  micro_batches = jax.tree.map(split, batch)

  def body(carry, inputs):
    micro_batch, index = inputs
    return jax.tree.map(jnp.add, carry, micro_grads(micro_batch, index)), None

  zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(
      lambda: micro_grads(jax.tree.map(lambda x: x[0], micro_batches), 0)))
  summed, _ = jax.lax.scan(body, zeros, (micro_batches, jnp.arange(accum)))
  return summed


def _update_if_finite(tx, grads, state, finite):
  """(params, opt_state) after applying `grads`, or as they were where not `finite`."""
  params = state['params']
  updates, new_opt_state = tx.update(grads, state['opt_state'], params)
  new_params = optax.apply_updates(params, updates)
  keep_if_bad = lambda new, old: jnp.where(finite, new, old)

  def keep_opt_state_if_bad(new, old):
    # The learning-rate schedule's counter still advances on a skipped step: the
    # schedule is a function of the training step, so the lr applied at step s stays
    # schedule(s) (what we log) and reaches 0 at total_steps. Adam's moments and its
    # bias-correction count stay as they were, as if the bad batch had not been seen.
    if isinstance(new, optax.ScaleByScheduleState):
      return new
    return jax.tree.map(keep_if_bad, new, old)

  return (jax.tree.map(keep_if_bad, new_params, params),
          jax.tree.map(keep_opt_state_if_bad, new_opt_state, state['opt_state'],
                       is_leaf=lambda x: isinstance(x, optax.ScaleByScheduleState)))


def in_mesh_context(fn, mesh, rules):
  """`fn` traced with `mesh` and the logical axis `rules` in context: what a kernel that
  must run in shard_map (splash attention) reads to split its work as its inputs are split."""
  @functools.wraps(fn)
  def traced(*args):
    with sharding.kernel_mesh(mesh, rules):
      return fn(*args)
  return traced


def jit_train_step(train_step, state_shardings, batch_sharding, metrics_sharding, rules):
  """One jit, the state donated: its buffers are reused for the new state."""
  return jax.jit(in_mesh_context(train_step, batch_sharding.mesh, rules),
                 in_shardings=(state_shardings, batch_sharding),
                 out_shardings=(state_shardings, metrics_sharding), donate_argnums=(0,))


def make_eval_step(fn, param_shardings, batch_sharding, out_sharding, rules):
  """jitted (params, batch) -> fn(params, batch), e.g. MLM sums or GLUE predictions."""
  return jax.jit(in_mesh_context(fn, batch_sharding.mesh, rules),
                 in_shardings=(param_shardings, batch_sharding), out_shardings=out_sharding)


# ---- Several independent runs (GLUE seeds) in one step: a leading axis on everything ----

def stacked(shardings):
  """The shardings of a tree stacked on a new leading (unsharded) axis."""
  return jax.tree.map(lambda s: jax.sharding.NamedSharding(
      s.mesh, jax.sharding.PartitionSpec(None, *s.spec)), shardings)


def stack(trees):
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def unstack(tree, n: int):
  return [jax.tree.map(lambda x, i=i: x[i], tree) for i in range(n)]

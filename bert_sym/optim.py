"""The paper's optimizer: AdamW, linear warm-up then linear decay to 0, global-norm clip.

Every value comes from `config.optimizer`. Weight decay follows the reference (Hugging
Face) recipe: every parameter but biases and LayerNorm, so the pairwise matrices P_h and
the embeddings ARE decayed.
"""

import jax
import jax.numpy as jnp
import ml_collections
import optax

# Leaf names that are not decayed: Dense/LayerNorm/MLM biases and LayerNorm scales.
_NO_DECAY_LEAVES = ('bias', 'scale')


def learning_rate_schedule(opt: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """0 -> lr over warmup_steps, then linearly to 0 at total_steps (HF 'linear').

  Written as Hugging Face's `get_linear_schedule_with_warmup` formula rather than joined
  optax schedules, so it matches at every step including the edge warmup_steps >=
  total_steps (joined schedules would still give the full lr at total_steps there).
  """
  lr, warmup = float(opt.learning_rate), int(opt.warmup_steps)

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    warm = step / max(warmup, 1)
    decay = jnp.maximum(0.0, (total_steps - step) / max(total_steps - warmup, 1))
    return lr * jnp.where(step < warmup, warm, decay)
  return schedule


def weight_decay_mask(params):
  """True where weight decay applies (kernels, embeddings, pairwise P), by leaf name."""
  def decayed(path, _):
    return str(getattr(path[-1], 'key', path[-1])) not in _NO_DECAY_LEAVES
  return jax.tree_util.tree_map_with_path(decayed, params)


def make_optimizer(opt: ml_collections.ConfigDict, total_steps: int):
  """Returns (optax transformation, schedule). Gradient accumulation lives in the step."""
  schedule = learning_rate_schedule(opt, total_steps)
  parts = []
  if opt.grad_clip_norm:
    parts.append(optax.clip_by_global_norm(opt.grad_clip_norm))
  parts.append(optax.adamw(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps,
                           weight_decay=opt.weight_decay, mask=weight_decay_mask))
  return optax.chain(*parts), schedule

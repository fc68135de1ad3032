"""What the update steps and evals minimise and measure: masked-LM sums (pre-training) and
the sequence-classification / regression loss and predictions (GLUE).

Every function returns *sums* over the batch (or a mean over the rows with weight > 0), so
that gradient accumulation over micro-batches adds up to the big-batch value. Sums are
taken with `weighted_sum`: a position of weight 0 contributes 0 even when its value is
NaN (a padded row with an all-zero attention mask may come out of a fused attention
kernel as NaN, and NaN x 0 is NaN).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bert_sym import lean_backward


def weighted_sum(values, weights):
  """sum(values * weights) over the positions with weight > 0 only (NaN-proof padding)."""
  return jnp.sum(jnp.where(weights > 0, values * weights, 0.0))


# ---- Masked LM ----

def masked_positions(mlm_weights, num_predictions: int):
  """The first `num_predictions` positions with weight > 0, in order, per row.

  top_k on (weight - small position penalty) keeps selected positions first and in
  sequence order; rows with fewer selected positions pad with weight-0 positions.
  """
  length = mlm_weights.shape[-1]
  score = (mlm_weights > 0).astype(jnp.float32) - jnp.arange(length) / (2.0 * length)
  _, positions = jax.lax.top_k(score, num_predictions)
  return positions


def host_mlm_positions(batch, num_predictions: int):
  """Adds original BERT's sparse MLM features, computed on the host in NumPy:

  mlm_positions [B, P] int32 (the first P positions with weight > 0, in order, then 0),
  mlm_position_targets / mlm_position_weights [B, P] (0 at the padding), P =
  num_predictions. The same selection as `masked_positions`, so the update step needs no
  top_k or gather to find its targets. The dense features stay (total weight, evals).
  """
  weights = np.asarray(batch['mlm_weights'])
  length = weights.shape[-1]
  selected = weights > 0
  # Stable sort of "not selected": selected positions first, each group in order.
  order = np.argsort(~selected, axis=-1, kind='stable')[:, :num_predictions]
  if order.shape[-1] < num_predictions:   # P > L: pad with weight-0 slots
    order = np.pad(order, ((0, 0), (0, num_predictions - length)))
  keep = np.take_along_axis(selected, order, axis=-1) & (np.arange(num_predictions) < length)
  out = dict(batch)
  out['mlm_positions'] = np.where(keep, order, 0).astype(np.int32)
  out['mlm_position_targets'] = np.where(
      keep, np.take_along_axis(np.asarray(batch['mlm_targets']), order, axis=-1),
      0).astype(np.int32)
  out['mlm_position_weights'] = np.where(
      keep, np.take_along_axis(weights, order, axis=-1), 0).astype(np.float32)
  return out


def mlm_sums(model, params, batch, *, sparse: bool, num_predictions: int, dropout_key=None):
  """(sum of weighted cross-entropy, sum of weighted correct, sum of weights)."""
  targets, weights = batch['mlm_targets'], batch['mlm_weights']
  positions = None
  if sparse and 'mlm_positions' in batch:   # computed on the host (host_mlm_positions)
    positions = batch['mlm_positions']
    targets, weights = batch['mlm_position_targets'], batch['mlm_position_weights']
  elif sparse:   # fallback for batches without them: found on the device
    positions = masked_positions(weights, num_predictions)
    targets = jnp.take_along_axis(targets, positions, axis=1)
    weights = jnp.take_along_axis(weights, positions, axis=1)
  logits = model.apply(
      {'params': params}, batch['input_ids'], batch['token_type_ids'],
      batch['attention_mask'], masked_positions=positions,
      deterministic=dropout_key is None,
      rngs=None if dropout_key is None else {'dropout': dropout_key})
  cross_entropy = lean_backward.cross_entropy(logits, targets,
                                              lean=model.cfg.get('lean_backward', True))
  correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
  return (weighted_sum(cross_entropy, weights), weighted_sum(correct, weights),
          jnp.sum(weights))


def mlm_loss_fn(model, *, sparse: bool, num_predictions: int):
  """`loss_fn` for steps.make_train_step: (params, batch, dropout key) -> sums."""
  def loss_fn(params, batch, dropout_key):
    loss_sum, correct, _ = mlm_sums(model, params, batch, sparse=sparse,
                                    num_predictions=num_predictions, dropout_key=dropout_key)
    return loss_sum, {'mlm_accuracy': correct}
  return loss_fn


def mlm_weight(batch):
  """What the MLM loss is normalised by: the number of targets of the whole batch."""
  return jnp.maximum(jnp.sum(batch['mlm_weights']), 1.0)


# ---- Sequence classification and regression (GLUE) ----

def classifier_logits(model, params, batch, dropout_key=None):
  return model.apply(
      {'params': params}, batch['input_ids'], batch['token_type_ids'],
      batch['attention_mask'], deterministic=dropout_key is None,
      rngs=None if dropout_key is None else {'dropout': dropout_key})


def per_example_loss(logits, labels, regression: bool):
  if regression:   # STS-B: MSE on the single output, as Hugging Face's num_labels=1 head
    return jnp.square(logits[:, 0] - labels)
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def classifier_loss_fn(model, *, regression: bool):
  """`loss_fn` for steps.make_train_step: the weighted sum of per-example losses.

  Padded rows of a last partial batch have weight 0; divided by `example_weight`, the loss
  is the mean over the real examples, as with a smaller final batch.
  """
  def loss_fn(params, batch, dropout_key):
    logits = classifier_logits(model, params, batch, dropout_key)
    loss = per_example_loss(logits, batch['labels'], regression)
    return weighted_sum(loss, batch['weights']), {}
  return loss_fn


def example_weight(batch):
  return jnp.maximum(jnp.sum(batch['weights']), 1.0)


def predictions(logits, regression: bool):
  """The dev-set prediction: the regressor's output, or the most likely class."""
  return logits[:, 0] if regression else jnp.argmax(logits, axis=-1)

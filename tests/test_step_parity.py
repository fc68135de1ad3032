"""The whole training step against PyTorch: 20 updates from the same weights, same batches.

Ours: `train.build_mlm_step` (sparse MLM loss normalised by the batch's targets, global-
norm clipping, AdamW with the weight-decay mask, warm-up then linear decay), jitted as the
trainer jits it. Reference: Hugging Face `BertForMaskedLM` loaded from our export, with
`torch.optim.AdamW` over the Trainer's two parameter groups (no decay on biases and
LayerNorm weights), `clip_grad_norm_` and `get_linear_schedule_with_warmup`: the recipe of
the reference run. Dropout off, float32. The pieces (schedule, decay mask, forward) have
their own tests; this one fails if any of them, or how they are put together, drifts.
"""

import flax.linen as nn
import jax
import numpy as np
import pytest
from sklearn import metrics as sklearn_metrics
import torch
import transformers

from bert_sym import hf_export as export
from bert_sym import model as model_lib
from bert_sym import objectives
from bert_sym import sharding
from bert_sym import train
from configs import tiny
from hf_reference import padded_batch

STEPS = 20
BATCH, LENGTH, VOCAB = 8, 16, 512


def _config(attention='standard'):
  c = tiny.get_config()
  c.model.update(attention=attention, attention_impl='xla', vocab_size=VOCAB, hidden_size=64,
                 num_heads=4, mlp_dim=128, max_position_embeddings=LENGTH, dropout_rate=0.0,
                 attention_dropout_rate=0.0)
  c.data.max_seq_len = LENGTH
  c.data.max_predictions_per_seq = LENGTH   # every masked position reaches the head
  c.batch_size = BATCH
  c.total_steps = STEPS
  # Warm-up and decay both inside the 20 steps; a clip norm the early gradients exceed.
  c.optimizer.update(learning_rate=3e-3, warmup_steps=5, weight_decay=0.1, grad_clip_norm=0.5,
                     eps=1e-6)
  return c


def _batches(seed=0, distinct=4):
  """Identical MLM batches for both sides: ids, two segments, padding, ~15% targets; a
  few distinct ones in turn, so that 20 steps visibly lower the loss."""
  rng = np.random.default_rng(seed)
  out = []
  for step in range(distinct):
    input_ids, token_type_ids, attention_mask = padded_batch(VOCAB, BATCH, LENGTH,
                                                             seed=seed + step)
    weights = ((rng.random(input_ids.shape) < 0.15) & (attention_mask == 1))
    weights[:, 1] = True   # at least one target per row
    out.append(dict(input_ids=np.where(weights, 3, input_ids).astype(np.int32),
                    token_type_ids=token_type_ids, attention_mask=attention_mask,
                    mlm_targets=np.where(weights, input_ids, 0).astype(np.int32),
                    mlm_weights=weights.astype(np.float32)))
  return [out[step % distinct] for step in range(STEPS)]


def _ours(config, batches):
  """(per-step losses, final params) from the trainer's own step."""
  mesh = sharding.make_mesh(config.mesh)
  mlm = train.build_mlm_step(config, mesh)
  train_step, rules = mlm.train_step, mlm.rules
  state = mlm.spec.init(jax.random.key(0), jax.random.key(1))
  initial = jax.device_get(state['params'])
  losses, logged = [], []
  for batch in batches:
    batch = objectives.host_mlm_positions(batch, config.data.max_predictions_per_seq)
    batch = sharding.host_batch_to_global(batch, mesh, BATCH, rules)
    state, metrics = train_step(state, batch)
    losses.append(float(metrics['train/loss']))
    logged.append({k: float(metrics[f'train/{k}'])
                   for k in ('learning_rate', 'mlm_accuracy', 'grad_norm')})
  return initial, losses, jax.device_get(state['params']), logged


def _reference(config, initial_params, batches):
  """The same 20 updates in PyTorch, from our exported initial weights."""
  torch.manual_seed(0)
  kwargs = export.hf_bert_config_kwargs(config.model)
  hf = transformers.BertForMaskedLM(transformers.BertConfig(**kwargs))
  hf.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in
                      export.mlm_params_to_hf(initial_params, config.model).items()},
                     strict=True)
  hf.train()   # dropout probabilities are 0: train mode changes nothing else in BERT
  opt = config.optimizer
  decay = [p for n, p in hf.named_parameters() if 'bias' not in n and 'LayerNorm' not in n]
  no_decay = [p for n, p in hf.named_parameters() if 'bias' in n or 'LayerNorm' in n]
  adamw = torch.optim.AdamW([{'params': decay, 'weight_decay': opt.weight_decay},
                             {'params': no_decay, 'weight_decay': 0.0}],
                            lr=opt.learning_rate, betas=(opt.b1, opt.b2), eps=opt.eps)
  scheduler = transformers.get_linear_schedule_with_warmup(adamw, opt.warmup_steps, STEPS)
  as_torch = lambda a: torch.from_numpy(np.asarray(a, np.int64))
  losses, logged = [], []
  for batch in batches:
    labels = np.where(batch['mlm_weights'] > 0, batch['mlm_targets'], -100)
    out = hf(input_ids=as_torch(batch['input_ids']),
             token_type_ids=as_torch(batch['token_type_ids']),
             attention_mask=as_torch(batch['attention_mask']), labels=as_torch(labels))
    targets = batch['mlm_weights'] > 0
    logged.append({   # what a step logs: the rate of its own update, accuracy on targets
        'learning_rate': scheduler.get_last_lr()[0],
        'mlm_accuracy': sklearn_metrics.accuracy_score(
            batch['mlm_targets'][targets], out.logits.detach().numpy().argmax(-1)[targets])})
    adamw.zero_grad()
    out.loss.backward()
    logged[-1]['grad_norm'] = float(   # the norm before clipping, as the step logs it
        torch.nn.utils.clip_grad_norm_(hf.parameters(), opt.grad_clip_norm))
    adamw.step()
    scheduler.step()
    losses.append(out.loss.item())
  return losses, {k: v.detach().numpy() for k, v in hf.state_dict().items()}, logged


def test_twenty_training_steps_match_pytorch():
  config = _config()
  batches = _batches()
  initial, our_losses, our_params, our_logged = _ours(config, batches)
  ref_losses, ref_params, ref_logged = _reference(config, initial, batches)
  np.testing.assert_allclose(our_losses, ref_losses, atol=1e-4, rtol=0)
  # The logged learning rate and MLM accuracy, step by step (torch's scheduler; sklearn).
  for key in ('learning_rate', 'mlm_accuracy'):
    np.testing.assert_allclose([r[key] for r in our_logged], [r[key] for r in ref_logged],
                               rtol=1e-5, atol=1e-7, err_msg=key)
  # Every step's gradient exceeds the clip norm, so clipping would hide a gradient off by a
  # constant factor (one that ignored the loss's 1 / targets): the norms themselves agree.
  np.testing.assert_allclose([r['grad_norm'] for r in our_logged],
                             [r['grad_norm'] for r in ref_logged], rtol=1e-4)
  assert len({r['mlm_accuracy'] for r in ref_logged}) > 3   # it changes: the check has teeth
  assert our_losses[-1] < our_losses[0] - 0.5   # it trained: the comparison has teeth
  ours = export.mlm_params_to_hf(our_params, config.model)
  assert ours.keys() == ref_params.keys()
  for name, value in ours.items():
    np.testing.assert_allclose(value, ref_params[name], atol=1e-4, rtol=0, err_msg=name)
  # Every tensor moved from its initial value, so "final params match" is not trivial;
  # but the key bias, which adds the same score to every key of a query (softmax ignores
  # it: zero gradient, and decay does not apply to biases).
  start = export.mlm_params_to_hf(initial, config.model)
  still = sorted(n for n in ours if np.abs(ours[n] - start[n]).max() < 1e-3)
  assert still == [f'bert.encoder.layer.{i}.attention.self.key.bias'
                   for i in range(config.model.num_layers)]


def test_pairwise_and_symmetric_mlm_loss_match_pytorch_through_the_folded_export():
  """Their MLM loss (the sparse objective the step minimises) equals HF's on the export's
  folded standard form: K = P Q (pairwise) or K = Q (symmetric)."""
  batch = _batches()[0]
  labels = np.where(batch['mlm_weights'] > 0, batch['mlm_targets'], -100)
  for attention in ('pairwise', 'symmetric'):
    config = _config(attention)
    model = model_lib.BertForMaskedLM(config.model)
    params = jax.device_get(nn.meta.unbox(
        model.init(jax.random.key(2), *model_lib.dummy_inputs(1, LENGTH))['params']))
    loss_sum, _, weight = objectives.mlm_sums(
        model, params, objectives.host_mlm_positions(batch, LENGTH), sparse=True,
        num_predictions=LENGTH)
    hf = transformers.BertForMaskedLM(transformers.BertConfig(
        **export.hf_bert_config_kwargs(config.model)))
    hf.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in
                        export.mlm_params_to_hf(params, config.model).items()}, strict=True)
    as_torch = lambda a: torch.from_numpy(np.asarray(a, np.int64))
    with torch.no_grad():
      ref = hf.eval()(input_ids=as_torch(batch['input_ids']),
                      token_type_ids=as_torch(batch['token_type_ids']),
                      attention_mask=as_torch(batch['attention_mask']),
                      labels=as_torch(labels)).loss.item()
    assert float(loss_sum / weight) == pytest.approx(ref, abs=1e-5), attention

"""GLUE's model and loss against Hugging Face `BertForSequenceClassification` (PyTorch,
fp32): the same weights give the same logits, the same loss (cross-entropy, or MSE for
STS-B's num_labels=1 head) and the same gradients. Ours: `model.BertForSequenceClassification`
and `objectives.classifier_loss_fn` / `example_weight`, with a padded row of weight 0 (a
last partial batch), which the reference simply does not see."""

import types

import jax
import numpy as np
import pytest
import torch
import transformers

from bert_sym import hf_export as export
from bert_sym import model as bert
from bert_sym import objectives
from configs.common import model_config
from hf_reference import padded_batch


def _noisy_params(module, cfg):
  """Every parameter random (biases and LayerNorm too), so a dropped or transposed copy
  cannot match by accident."""
  params = bert.abstract_params(module, length=16)
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(3), len(leaves))
  return jax.tree.unflatten(treedef, [
      np.asarray(0.05 * jax.random.normal(k, x.shape), np.float32) for x, k in zip(leaves, keys)])


def _hf_classifier(params, cfg, num_labels):
  """Our classifier's params in a HF BertForSequenceClassification (strict load)."""
  hidden = cfg.hidden_size   # an MLM head only to reuse the export's encoder mapping
  mlm_head = {'transform': {'kernel': np.zeros((hidden, hidden)), 'bias': np.zeros(hidden)},
              'layer_norm': {'scale': np.ones(hidden), 'bias': np.zeros(hidden)},
              'bias': np.zeros(cfg.vocab_size)}
  state = {k: v for k, v in export.mlm_params_to_hf(
      {'encoder': params['bert']['encoder'], 'mlm_head': mlm_head}, cfg).items()
           if k.startswith('bert.')}
  linear = lambda dense: export._linear(dense['kernel'], dense['bias'])  # pylint: disable=protected-access
  state['bert.pooler.dense.weight'], state['bert.pooler.dense.bias'] = linear(
      params['bert']['pooler']['dense'])
  state['classifier.weight'], state['classifier.bias'] = linear(params['classifier'])
  model = transformers.BertForSequenceClassification(transformers.BertConfig(
      num_labels=num_labels, **export.hf_bert_config_kwargs(cfg)))
  model.load_state_dict(
      {k: torch.from_numpy(np.array(v, np.float32)) for k, v in state.items()}, strict=True)
  return model.eval()


@pytest.mark.parametrize('attention', ['standard', 'pairwise'])
@pytest.mark.parametrize('num_labels', [3, 1], ids=['classification', 'regression'])
def test_logits_loss_and_gradients_match_hugging_face(attention, num_labels):
  cfg = model_config('tiny', attention)
  cfg.update(vocab_size=500, dtype='float32', dropout_rate=0.0, attention_dropout_rate=0.0)
  module = bert.BertForSequenceClassification(cfg, num_labels=num_labels)
  params = _noisy_params(module, cfg)
  input_ids, token_type_ids, attention_mask = padded_batch(cfg.vocab_size, batch=4)
  rng = np.random.default_rng(0)
  labels = (rng.normal(size=4).astype(np.float32) if num_labels == 1
            else rng.integers(0, num_labels, 4).astype(np.int32))
  weights = np.array([1, 1, 1, 0], np.float32)   # the last row pads a partial batch
  batch = dict(input_ids=input_ids, token_type_ids=token_type_ids,
               attention_mask=attention_mask, labels=labels, weights=weights)
  loss_fn = objectives.classifier_loss_fn(module, regression=num_labels == 1)

  def loss(p):
    total, _ = loss_fn(p, batch, None)
    return total / objectives.example_weight(batch)

  ours_loss, ours_grads = jax.value_and_grad(loss)(params)
  ours_logits = objectives.classifier_logits(module, params, batch)

  reference = _hf_classifier(params, cfg, num_labels)
  real = slice(0, 3)
  as_torch = lambda a: torch.from_numpy(np.asarray(a[real], np.int64))
  out = reference(input_ids=as_torch(input_ids), token_type_ids=as_torch(token_type_ids),
                  attention_mask=as_torch(attention_mask),
                  labels=torch.from_numpy(labels[real].astype(
                      np.float32 if num_labels == 1 else np.int64)))
  out.loss.backward()
  np.testing.assert_allclose(np.asarray(ours_logits)[real], out.logits.detach().numpy(),
                             rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(float(ours_loss), out.loss.item(), rtol=1e-5)
  grad = lambda name: dict(reference.named_parameters())[name].grad.numpy()
  np.testing.assert_allclose(np.asarray(ours_grads['classifier']['kernel']).T,
                             grad('classifier.weight'), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(np.asarray(ours_grads['bert']['pooler']['dense']['bias']),
                             grad('bert.pooler.dense.bias'), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(
      np.asarray(ours_grads['bert']['encoder']['embeddings']['word_embeddings']['embedding']),
      grad('bert.embeddings.word_embeddings.weight'), rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize('attention', ['standard', 'pairwise'])
def test_train_mode_matches_hugging_face_given_the_same_dropout_masks(attention, monkeypatch):
  """Where dropout sits is seen only in train mode: after the embeddings' LayerNorm, on
  the attention probabilities, on each sublayer's output before its residual add, and on
  the pooled output. The masks our model draws are replayed, in call order, into torch's
  dropout; HF (eager attention, train mode) must then give our logits and gradients. A
  dropout moved after a residual add, dropped, or put on the scores fails here."""
  from bert_sym import attention as attention_lib  # pylint: disable=g-import-not-at-top
  cfg = model_config('tiny', attention)
  cfg.update(vocab_size=500, dtype='float32', dropout_rate=0.1, attention_dropout_rate=0.1,
             attention_impl='xla')
  module = bert.BertForSequenceClassification(cfg, num_labels=3)
  params = _noisy_params(module, cfg)
  input_ids, token_type_ids, attention_mask = padded_batch(cfg.vocab_size, batch=3)
  labels = np.array([0, 2, 1], np.int32)

  masks, real_dropout = [], attention_lib.inverted_dropout

  def recording(x, rate, rng):   # the same draw as the real one: same key, same shape
    masks.append(np.asarray(jax.random.bernoulli(rng, 1.0 - rate, x.shape)))
    return real_dropout(x, rate, rng)
  monkeypatch.setattr(attention_lib, 'inverted_dropout', recording)
  monkeypatch.setattr(bert, 'inverted_dropout', recording)

  def loss(p):
    logits = module.apply({'params': p}, input_ids, token_type_ids, attention_mask,
                          deterministic=False, rngs={'dropout': jax.random.key(7)})
    log_probs = jax.nn.log_softmax(logits)
    return -np.mean(log_probs[np.arange(3), labels]), logits

  with jax.disable_jit():   # eager: the masks are concrete arrays as they are drawn
    (ours_loss, ours_logits), ours_grads = jax.value_and_grad(loss, has_aux=True)(params)
  assert len(masks) == 2 + 3 * cfg.num_layers   # embeddings, 3 a layer, pooled output
  assert sum(m.size for m in masks) > 0 and 0.85 < np.mean(np.concatenate(
      [m.ravel() for m in masks])) < 0.95

  replay = list(masks)

  def replayed_dropout(x, p=0.5, training=True, inplace=False):
    del inplace
    if not training or p == 0.0:
      return x
    keep = replay.pop(0)
    assert keep.shape == tuple(x.shape), (keep.shape, tuple(x.shape))
    return x * torch.from_numpy(keep.copy()).to(x.dtype) / (1.0 - p)
  monkeypatch.setattr(torch.nn.functional, 'dropout', replayed_dropout)
  reference = _hf_classifier(params, cfg, 3)
  reference.config._attn_implementation = 'eager'   # pylint: disable=protected-access
  reference.train()
  as_torch = lambda a: torch.from_numpy(np.asarray(a, np.int64))
  out = reference(input_ids=as_torch(input_ids), token_type_ids=as_torch(token_type_ids),
                  attention_mask=as_torch(attention_mask), labels=as_torch(labels))
  assert not replay   # every mask used, in order
  out.loss.backward()
  np.testing.assert_allclose(np.asarray(ours_logits), out.logits.detach().numpy(),
                             rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(float(ours_loss), out.loss.item(), rtol=1e-5)
  grad = lambda name: dict(reference.named_parameters())[name].grad.numpy()
  np.testing.assert_allclose(
      np.asarray(ours_grads['bert']['encoder']['embeddings']['word_embeddings']['embedding']),
      grad('bert.embeddings.word_embeddings.weight'), rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize('total_steps', [37, 10, 1])
def test_fine_tuning_learning_rates_are_hugging_faces(total_steps):
  """GLUE's schedule is the Trainer's: warm-up over ceil(warmup_ratio x steps) steps
  (TrainingArguments.get_warmup_steps), then linear decay to 0. At 37 steps, 10% is 3.7:
  a floor would warm up over 3 steps, HF does over 4. Every step's rate is compared."""
  from bert_sym import optim  # pylint: disable=g-import-not-at-top
  from bert_sym.glue import finetune  # pylint: disable=g-import-not-at-top
  from configs import glue as glue_config  # pylint: disable=g-import-not-at-top
  config = glue_config.get_config('runlocal')
  opt = finetune._optimizer_config(config, total_steps)  # pylint: disable=protected-access
  _, schedule = optim.make_optimizer(opt, total_steps)
  # The Trainer's own rule (building TrainingArguments would need `accelerate`):
  # transformers 5 takes the ratio as a warmup_steps below 1, 4.x as warmup_ratio.
  warmup = transformers.TrainingArguments.get_warmup_steps(types.SimpleNamespace(
      warmup_steps=config.warmup_ratio, warmup_ratio=config.warmup_ratio), total_steps)
  if not isinstance(warmup, int):
    warmup = transformers.TrainingArguments.get_warmup_steps(types.SimpleNamespace(
        warmup_steps=0, warmup_ratio=config.warmup_ratio), total_steps)
  adamw = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=config.learning_rate)
  scheduler = transformers.get_linear_schedule_with_warmup(adamw, warmup, total_steps)
  theirs = []
  for _ in range(total_steps):
    theirs.append(scheduler.get_last_lr()[0])
    adamw.step()
    scheduler.step()
  np.testing.assert_allclose([float(schedule(step)) for step in range(total_steps)], theirs,
                             rtol=1e-6, atol=1e-12)

"""Hugging Face `transformers` BERT (PyTorch, CPU, fp32) as an independent reference."""

import numpy as np
import torch
import transformers

from bert_sym import hf_export as export


def random_hf_mlm(cfg, seed=0, perturb=0.05):
  """A HF `BertForMaskedLM` in eval mode with every parameter random.

  HF initialises biases to 0 and LayerNorm to 1/0; a copy that drops or transposes those
  would still match. Noise on every tensor (tied decoder included) makes them count.
  """
  torch.manual_seed(seed)
  model = transformers.BertForMaskedLM(
      transformers.BertConfig(**export.hf_bert_config_kwargs(cfg)))
  with torch.no_grad():
    for p in model.parameters():   # tied tensors appear once
      p.add_(perturb * torch.randn_like(p))
  return model.eval()


def hf_mlm_forward(model, input_ids, token_type_ids, attention_mask):
  """Returns (last hidden states, MLM logits) as float32 NumPy arrays."""
  as_torch = lambda a: torch.from_numpy(np.asarray(a, np.int64))
  with torch.no_grad():
    out = model(input_ids=as_torch(input_ids), token_type_ids=as_torch(token_type_ids),
                attention_mask=as_torch(attention_mask), output_hidden_states=True)
  return out.hidden_states[-1].numpy(), out.logits.numpy()


def padded_batch(vocab_size, batch=3, length=16, seed=0):
  """Token ids, two segments (token types 0 and 1) and right padding of varying length."""
  rng = np.random.default_rng(seed)
  input_ids = rng.integers(1, vocab_size, (batch, length)).astype(np.int32)
  lengths = np.linspace(length, length // 3, batch).astype(int)   # first row unpadded
  attention_mask = (np.arange(length)[None, :] < lengths[:, None]).astype(np.int32)
  token_type_ids = (np.arange(length)[None, :] >= (lengths[:, None] // 2)).astype(np.int32)
  input_ids = np.where(attention_mask == 1, input_ids, 0).astype(np.int32)
  token_type_ids = token_type_ids * attention_mask
  return input_ids, token_type_ids, attention_mask

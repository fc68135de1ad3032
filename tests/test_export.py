"""Symmetric and pairwise models written out as standard Hugging Face BERT."""

import flax.linen as nn
import jax
import numpy as np
import pytest
import torch
import transformers

from bert_sym import export
from bert_sym import model as bert
from configs.common import model_config
from hf_reference import hf_mlm_forward, padded_batch


def tiny_config(attention):
  cfg = model_config('tiny', attention)
  cfg.vocab_size, cfg.dtype = 1000, 'float32'
  return cfg


def random_params(cfg, batch):
  params = nn.meta.unbox(bert.BertForMaskedLM(cfg).init(jax.random.key(0), *batch)['params'])
  # Non-zero biases and LayerNorm parameters, so a dropped or misplaced one shows.
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  noisy = [leaf + 0.05 * jax.random.normal(k, leaf.shape) for leaf, k in zip(leaves, keys)]
  return jax.tree.unflatten(treedef, noisy)


def load_hf(cfg, state_dict):
  hf = transformers.BertForMaskedLM(transformers.BertConfig(**export.hf_bert_config_kwargs(cfg)))
  hf.load_state_dict({k: torch.from_numpy(np.array(v, np.float32))
                      for k, v in state_dict.items()}, strict=True)
  return hf.eval()


@pytest.mark.parametrize('attention', ['standard', 'symmetric', 'pairwise', 'pairwise_diagonal',
                                       'standard_syminit'])
def test_exported_standard_bert_reproduces_our_logits(attention):
  cfg = tiny_config(attention)
  batch = padded_batch(cfg.vocab_size, length=20)
  params = random_params(cfg, batch)
  ours = np.asarray(bert.BertForMaskedLM(cfg).apply({'params': params}, *batch))
  _, hf_logits = hf_mlm_forward(load_hf(cfg, export.mlm_params_to_hf(params, cfg)), *batch)
  # P ~ N(0, 1) makes the pairwise scores large, so allow float32 rounding of the fold.
  np.testing.assert_allclose(hf_logits, ours, atol=1e-4, rtol=1e-5)


def test_standard_round_trip_is_exact():
  cfg = tiny_config('standard')
  params = random_params(cfg, padded_batch(cfg.vocab_size))
  back = export.mlm_params_from_hf(export.mlm_params_to_hf(params, cfg), cfg)
  assert jax.tree.structure(back) == jax.tree.structure(params)
  jax.tree.map(np.testing.assert_array_equal, back, params)


def test_save_hf_pretrained_loads_with_from_pretrained(tmp_path):
  cfg = tiny_config('pairwise')
  batch = padded_batch(cfg.vocab_size, length=12)
  params = random_params(cfg, batch)
  export.save_hf_pretrained(params, cfg, str(tmp_path))
  hf = transformers.BertForMaskedLM.from_pretrained(str(tmp_path)).eval()
  _, hf_logits = hf_mlm_forward(hf, *batch)
  ours = np.asarray(bert.BertForMaskedLM(cfg).apply({'params': params}, *batch))
  np.testing.assert_allclose(hf_logits, ours, atol=1e-4, rtol=1e-5)


def test_non_standard_import_is_refused():
  with pytest.raises(ValueError, match='attention=standard'):
    export.mlm_params_from_hf({}, tiny_config('pairwise'))

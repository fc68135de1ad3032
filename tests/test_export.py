"""Symmetric and pairwise models written out as standard Hugging Face BERT."""

import flax.linen as nn
import jax
import numpy as np
import pytest
import safetensors
import torch
import transformers

from bert_sym import files as export_files
from bert_sym import hf_export as export
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


def test_out_dir_is_new_empty_or_an_earlier_export_which_is_replaced_whole(tmp_path,
                                                                          monkeypatch):
  """--out_dir=WORKDIR overwrote the training config.json (later commands on the workdir
  then failed); an earlier directory's tokenizer.json won over the exported vocabulary;
  and a re-export interrupted midway kept the earlier config.json, so looked finished."""
  workdir = tmp_path / 'workdir'
  (workdir / 'checkpoints').mkdir(parents=True)
  (workdir / 'config.json').write_text('{"model": {}, "data": {}}')
  with pytest.raises(ValueError, match='is a bert_sym training workdir'):
    export.check_out_dir(str(workdir))
  (tmp_path / 'other').mkdir()
  (tmp_path / 'other' / 'notes.txt').write_text('mine')
  with pytest.raises(ValueError, match=r'not empty \(notes.txt\) and holds no earlier export'):
    export.check_out_dir(str(tmp_path / 'other'))
  export.check_out_dir(str(tmp_path / 'new'))   # new, or empty: fine
  for name in ('notes', 'vocab.txt'):   # a file: it was listed as its own content, and
    (tmp_path / name).write_text('mine')   # one named as an export file passed the check
    with pytest.raises(ValueError, match=f'--out_dir={tmp_path / name} is a file, not a dir'):
      export.check_out_dir(str(tmp_path / name))
  cfg = tiny_config('standard')
  params = random_params(cfg, padded_batch(cfg.vocab_size, length=12))
  out = tmp_path / 'hf'
  export.save_hf_pretrained(params, cfg, str(out))
  (out / 'tokenizer.json').write_text('{"stale": true}')   # another save_pretrained's
  export.check_out_dir(str(out))                               # an earlier export: replaced
  real_write = export_files.write_atomically

  def fail_on_weights(path, data):
    if str(path).endswith('model.safetensors'):
      raise KeyboardInterrupt
    real_write(path, data)
  monkeypatch.setattr(export_files, 'write_atomically', fail_on_weights)
  with pytest.raises(KeyboardInterrupt):
    export.save_hf_pretrained(params, cfg, str(out))
  assert not (out / 'config.json').exists() and not (out / 'tokenizer.json').exists()
  # What is left is the export's own files: rerunning the same command replaces them (it
  # was refused as 'holds no earlier export'), as after a SIGKILL mid-write.
  (out / '.model.safetensors.tmp-0123abcd').write_bytes(b'partial')
  export.check_out_dir(str(out))
  (out / 'notes.txt').write_text('mine')
  with pytest.raises(ValueError, match='holds no earlier export'):
    export.check_out_dir(str(out))
  (out / 'notes.txt').unlink()
  monkeypatch.setattr(export_files, 'write_atomically', real_write)
  export.save_hf_pretrained(params, cfg, str(out))
  # ... and removes the temporary copy the killed write left (it stayed for good, and an
  # upload of the folder carried it).
  assert sorted(p.name for p in out.iterdir()) == [
      'config.json', 'model.safetensors', 'special_tokens_map.json', 'tokenizer_config.json']
  # A finished export's model and tokenizer files are replaced, a file of the user's is
  # not deleted (the README says which).
  (out / 'README.md').write_text('my model card')
  export.check_out_dir(str(out))
  export.save_hf_pretrained(params, cfg, str(out))
  assert (out / 'README.md').read_text() == 'my model card'


def test_the_exported_pad_token_is_the_vocabularys(tmp_path):
  """A user vocabulary may hold [PAD] anywhere (its special ids are looked up by name);
  config.json said 0, so HF froze the embedding of token 0 (a real word) instead."""
  cfg = tiny_config('symmetric')
  tokens = [f'w{i}' for i in range(cfg.vocab_size)]
  tokens[:6] = ['the', '[UNK]', '[CLS]', '[SEP]', '[MASK]', '[PAD]']
  params = random_params(cfg, padded_batch(cfg.vocab_size, length=12))
  export.save_hf_pretrained(params, cfg, str(tmp_path), vocab_bytes='\n'.join(tokens).encode())
  hf = transformers.BertForMaskedLM.from_pretrained(str(tmp_path))
  tokenizer = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
  assert hf.config.pad_token_id == tokenizer.pad_token_id == 5
  assert hf.bert.embeddings.word_embeddings.padding_idx == 5


def test_non_standard_import_is_refused():
  with pytest.raises(ValueError, match='attention=standard'):
    export.mlm_params_from_hf({}, tiny_config('pairwise'))


# The export command as a user runs it after `make demo`: a venv with the runtime
# requirements only, so torch and transformers are made unimportable.
_EXPORT_WITHOUT_TORCH = """
import runpy, sys
class NotInstalled:
  def find_spec(self, name, path=None, target=None):
    if name.split('.')[0] in ('torch', 'transformers'):
      raise ModuleNotFoundError(f'No module named {name!r}')
sys.meta_path.insert(0, NotInstalled())
sys.argv = ['bert_sym.hf_export'] + sys.argv[1:]
runpy.run_module('bert_sym.hf_export', run_name='__main__', alter_sys=True)
"""


def test_export_command_without_torch_then_fill_mask_pipeline(tmp_path, tmp_path_factory):
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  from tests import train_fixtures  # pylint: disable=g-import-not-at-top
  from tests.train_fixtures import REPO_ROOT  # pylint: disable=g-import-not-at-top
  # A real-vocabulary tiny model with a real checkpoint and config.json: the session's
  # 4-step run on the embedded corpus, which the GLUE tests fine-tune (read only; a
  # trainer run of its own here cost ~8 s).
  workdir, _ = train_fixtures.real_pretrained(tmp_path_factory)
  positions = train_fixtures.REAL_TINY['model.max_position_embeddings']
  out_dir = tmp_path / 'hf'
  result = subprocess.run(
      [sys.executable, '-c', _EXPORT_WITHOUT_TORCH, f'--checkpoint={workdir}',
       f'--out_dir={out_dir}'], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
      env=dict(__import__('os').environ, PYTHONPATH=REPO_ROOT, JAX_PLATFORMS='cpu'))
  assert result.returncode == 0, result.stderr[-3000:]
  # Which step a workdir stood for, and that BertModel's pooler is not in it (the README's).
  assert f'of step 4 ({workdir / "checkpoints" / "4"}) to {out_dir}.' in result.stdout
  assert sorted(p.name for p in out_dir.iterdir()) == [
      'config.json', 'model.safetensors', 'special_tokens_map.json',
      'tokenizer_config.json', 'vocab.txt']
  with safetensors.safe_open(out_dir / 'model.safetensors', 'np') as weights:
    assert not [k for k in weights.keys() if 'pooler' in k]
  tokenizer = transformers.AutoTokenizer.from_pretrained(str(out_dir))
  assert tokenizer.model_max_length == positions   # the position table's length
  fill = transformers.pipeline('fill-mask', model=str(out_dir), device='cpu')
  short = fill('Paris is the [MASK] of France.')
  assert len(short) == 5 and all(np.isfinite(p['score']) for p in short)
  long_text = 'The capital [MASK] is here. ' + ' '.join(['word'] * 600)
  assert len(tokenizer(long_text)['input_ids']) > positions
  long = fill(long_text, tokenizer_kwargs={'truncation': True})
  assert len(long) == 5
  # Same weights as ours: the exported model reproduces the checkpoint's logits.
  from bert_sym import checkpoint  # pylint: disable=g-import-not-at-top
  config, params = checkpoint.load_pretrained(workdir)
  batch = padded_batch(30522, length=12)
  hf = transformers.BertForMaskedLM.from_pretrained(str(out_dir)).eval()
  _, hf_logits = hf_mlm_forward(hf, *batch)
  ours = np.asarray(bert.BertForMaskedLM(config.model).apply({'params': params}, *batch))
  np.testing.assert_allclose(hf_logits, ours, atol=1e-4, rtol=1e-5)


def test_shape_mismatches_name_every_differing_parameter():
  cfg = tiny_config('pairwise')
  params = bert.abstract_params(bert.BertForMaskedLM(cfg))
  assert export.shape_mismatches(params, cfg) == []
  wider = tiny_config('pairwise')
  wider.mlp_dim = cfg.mlp_dim * 2
  found = export.shape_mismatches(params, wider)
  # Per layer: intermediate kernel and bias, output kernel.
  assert len(found) == 3 * cfg.num_layers, found
  assert ("['encoder']['layer_0']['intermediate']['kernel']: checkpoint "
          f"({cfg.hidden_size}, {cfg.mlp_dim}), config ({cfg.hidden_size}, {2 * cfg.mlp_dim})"
          in found)
  standard = tiny_config('standard')   # a key projection the checkpoint does not have
  assert any("['attention']['key']['kernel']: checkpoint absent" in f
             for f in export.shape_mismatches(params, standard))


def test_export_to_an_object_store_lands_there(tmp_path, monkeypatch):
  """--out_dir=gs://...: pathlib made it gs:/..., a local folder, and said 'Wrote'. Here an
  fsspec memory:// bucket stands in for gs://; the files are read back and loaded by HF."""
  import fsspec  # pylint: disable=g-import-not-at-top
  monkeypatch.chdir(tmp_path)
  cfg = tiny_config('standard')
  batch = padded_batch(cfg.vocab_size, length=12)
  params = random_params(cfg, batch)
  export.save_hf_pretrained(params, cfg, f'memory://bucket/{tmp_path.name}/hf/')
  assert not list(tmp_path.iterdir())   # nothing local
  fs = fsspec.filesystem('memory')
  local = tmp_path / 'copy'
  fs.get(f'/bucket/{tmp_path.name}/hf/', str(local), recursive=True)
  hf = transformers.BertForMaskedLM.from_pretrained(str(local)).eval()
  _, hf_logits = hf_mlm_forward(hf, *batch)
  ours = np.asarray(bert.BertForMaskedLM(cfg).apply({'params': params}, *batch))
  np.testing.assert_allclose(hf_logits, ours, atol=1e-4, rtol=1e-5)


def test_a_checkpoint_trained_with_a_named_kernel_exports_on_a_cpu():
  """A run with attention_impl=splash (TPU) or cudnn (GPU) is exported anywhere: only
  shapes are compared, and the kernel is not needed for them."""
  cfg = tiny_config('pairwise')
  params = bert.abstract_params(bert.BertForMaskedLM(cfg))
  for kernel in ('splash', 'cudnn'):
    cfg.attention_impl = kernel
    assert export.shape_mismatches(params, cfg) == []


@pytest.mark.parametrize('flag', ['--out_dir', '--checkpoint'])
def test_an_empty_directory_flag_is_refused_and_the_root_never_written(tmp_path, flag):
  """`--out_dir=$OUT` with OUT unset: the export's files went to the root directory
  (f'{out}/config.json' with out ''), after its check had looked at the current one."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  from tests.train_fixtures import REPO_ROOT  # pylint: disable=g-import-not-at-top
  given = {'--checkpoint': 'absent', '--out_dir': 'out', flag: ''}
  result = subprocess.run([sys.executable, '-m', 'bert_sym.hf_export',
                           *(f'{k}={v}' for k, v in given.items())], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120,
                          env=dict(__import__('os').environ, PYTHONPATH=REPO_ROOT))
  assert result.returncode == 1
  assert result.stderr == (f'bert_sym.hf_export: error: {flag} is empty. Fix: {flag}=DIR '
                           '(see --help).\n')
  for out_dir in ('', '/'):   # callers other than the command line (notebooks) too
    with pytest.raises(ValueError, match='names no directory to export into'):
      export.save_hf_pretrained({}, tiny_config('pairwise'), out_dir)

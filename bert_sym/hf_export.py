"""Write a trained model of any variant as a standard Hugging Face BERT, and read one back.

Symmetric and pairwise attention are standard attention with a constrained key
projection. For head h, with Q_h = X Wq_h + bq_h,

  Q_h P_h Q_h^T = Q_h (X Wq_h P_h^T + bq_h P_h^T)^T,

so Wk_h := Wq_h P_h^T and bk_h := bq_h P_h^T give a `BertForMaskedLM` whose logits equal
ours (symmetric is the case P_h = I). Everything here works on NumPy arrays keyed by
Hugging Face's `state_dict` names; the export needs neither PyTorch nor `transformers`
(README.md, "Exporting to Hugging Face", lists the files it writes).

  python -m bert_sym.hf_export --checkpoint=WORKDIR_or_STEP_DIR --out_dir=hf_model
"""

import contextlib
import hashlib
import json
import posixpath
from typing import Any, Mapping

import numpy as np

_LAYER_NORM = (('weight', 'scale'), ('bias', 'bias'))


def hf_bert_config_kwargs(cfg) -> dict[str, Any]:
  """`transformers.BertConfig` arguments describing the same architecture as `cfg`."""
  return dict(
      vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
      num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
      intermediate_size=cfg.mlp_dim, hidden_act='gelu',
      hidden_dropout_prob=cfg.dropout_rate,
      attention_probs_dropout_prob=cfg.attention_dropout_rate,
      max_position_embeddings=cfg.max_position_embeddings,
      type_vocab_size=cfg.type_vocab_size, initializer_range=cfg.initializer_range,
      layer_norm_eps=cfg.layer_norm_eps)


def folded_key_projection(query_kernel, query_bias, pairwise=None):
  """Standard-attention key weights equivalent to a shared query (and optional P).

  query_kernel [d, heads, head_dim], query_bias [heads, head_dim], pairwise
  [heads, head_dim, head_dim], its diagonal [heads, head_dim] (pairwise_diagonal), or
  None (symmetric). Returns (key_kernel, key_bias) with
  Wk_h = Wq_h P_h^T and bk_h = bq_h P_h^T, computed in float64 so the fold adds no
  rounding beyond the final cast.
  """
  kernel = np.asarray(query_kernel, np.float64)
  bias = np.asarray(query_bias, np.float64)
  if pairwise is None:
    return kernel.astype(np.float32), bias.astype(np.float32)
  p = np.asarray(pairwise, np.float64)
  if p.ndim == 2:
    p = np.einsum('he,ef->hef', p, np.eye(p.shape[-1]))   # diag(p_h)
  key_kernel = np.einsum('dhe,hfe->dhf', kernel, p)
  key_bias = np.einsum('he,hfe->hf', bias, p)
  return key_kernel.astype(np.float32), key_bias.astype(np.float32)


def _linear(kernel, bias):
  """Flax kernel [in..., out...] -> torch Linear (weight [out, in], bias [out])."""
  kernel = np.asarray(kernel, np.float32)
  bias = np.asarray(bias, np.float32)
  return kernel.reshape(-1, bias.size).T, bias.reshape(-1)


def mlm_params_to_hf(params: Mapping[str, Any], cfg) -> dict[str, np.ndarray]:
  """`BertForMaskedLM` params of any variant -> a standard HF `BertForMaskedLM` state dict.

  `params` is the 'params' collection (boxes removed) with 'encoder' and 'mlm_head'.
  The tied decoder weight is written too, so the dict loads with `strict=True`.
  """
  enc, head = params['encoder'], params['mlm_head']
  if 'layers' in enc:   # model.scan_layers=True: stacked layers, as a list of layers here
    from bert_sym.model import unstack_layers  # pylint: disable=g-import-not-at-top
    enc = unstack_layers(enc)
  out: dict[str, np.ndarray] = {}

  def put(name, dense):
    out[f'{name}.weight'], out[f'{name}.bias'] = _linear(dense['kernel'], dense['bias'])

  def put_layer_norm(name, tree):
    for hf_name, our_name in _LAYER_NORM:
      out[f'{name}.{hf_name}'] = np.asarray(tree[our_name], np.float32)

  emb = enc['embeddings']
  for name in ('word_embeddings', 'position_embeddings', 'token_type_embeddings'):
    out[f'bert.embeddings.{name}.weight'] = np.asarray(emb[name]['embedding'], np.float32)
  put_layer_norm('bert.embeddings.LayerNorm', emb['layer_norm'])

  for i in range(cfg.num_layers):
    layer, prefix = enc[f'layer_{i}'], f'bert.encoder.layer.{i}'
    attn = layer['attention']
    if 'key' not in attn:
      kernel, bias = folded_key_projection(
          attn['query']['kernel'], attn['query']['bias'],
          attn.get('pairwise', attn.get('pairwise_diagonal')))
      attn = dict(attn, key={'kernel': kernel, 'bias': bias})
    for name in ('query', 'key', 'value'):
      put(f'{prefix}.attention.self.{name}', attn[name])
    put(f'{prefix}.attention.output.dense', attn['output'])
    put_layer_norm(f'{prefix}.attention.output.LayerNorm', layer['attention_layer_norm'])
    put(f'{prefix}.intermediate.dense', layer['intermediate'])
    put(f'{prefix}.output.dense', layer['output'])
    put_layer_norm(f'{prefix}.output.LayerNorm', layer['output_layer_norm'])

  put('cls.predictions.transform.dense', head['transform'])
  put_layer_norm('cls.predictions.transform.LayerNorm', head['layer_norm'])
  out['cls.predictions.bias'] = np.asarray(head['bias'], np.float32)
  out['cls.predictions.decoder.weight'] = out['bert.embeddings.word_embeddings.weight']
  out['cls.predictions.decoder.bias'] = out['cls.predictions.bias']
  return out


def mlm_params_from_hf(state_dict: Mapping[str, Any], cfg) -> dict[str, Any]:
  """A HF `BertForMaskedLM` state dict -> our `standard` `BertForMaskedLM` params.

  Values may be torch tensors or arrays. Only `standard` can hold an arbitrary key
  projection; for the other variants the key is tied to the query by construction.
  """
  if cfg.attention not in ('standard', 'standard_syminit'):
    raise ValueError(f'model.attention={cfg.attention!r}: a Hugging Face BERT has a free key '
                     'projection, which only model.attention=standard can hold.')
  sd = {k: np.asarray(v.detach().cpu().numpy() if hasattr(v, 'detach') else v, np.float32)
        for k, v in state_dict.items()}
  d, heads = cfg.hidden_size, cfg.num_heads
  head_dim = d // heads

  def dense(name):
    return {'kernel': sd[f'{name}.weight'].T, 'bias': sd[f'{name}.bias']}

  def heads_in(name):   # query/key/value: kernel [d, heads, head_dim]
    return {'kernel': sd[f'{name}.weight'].T.reshape(d, heads, head_dim),
            'bias': sd[f'{name}.bias'].reshape(heads, head_dim)}

  def layer_norm(name):
    return {our: sd[f'{name}.{hf}'] for hf, our in _LAYER_NORM}

  encoder: dict[str, Any] = {'embeddings': {
      name: {'embedding': sd[f'bert.embeddings.{name}.weight']}
      for name in ('word_embeddings', 'position_embeddings', 'token_type_embeddings')}}
  encoder['embeddings']['layer_norm'] = layer_norm('bert.embeddings.LayerNorm')
  for i in range(cfg.num_layers):
    prefix = f'bert.encoder.layer.{i}'
    attention = {name: heads_in(f'{prefix}.attention.self.{name}')
                 for name in ('query', 'key', 'value')}
    output = attention['output'] = dense(f'{prefix}.attention.output.dense')
    output['kernel'] = output['kernel'].reshape(heads, head_dim, d)
    encoder[f'layer_{i}'] = {
        'attention': attention,
        'attention_layer_norm': layer_norm(f'{prefix}.attention.output.LayerNorm'),
        'intermediate': dense(f'{prefix}.intermediate.dense'),
        'output': dense(f'{prefix}.output.dense'),
        'output_layer_norm': layer_norm(f'{prefix}.output.LayerNorm'),
    }
  mlm_head = {'transform': dense('cls.predictions.transform.dense'),
              'layer_norm': layer_norm('cls.predictions.transform.LayerNorm'),
              'bias': sd['cls.predictions.bias']}
  return {'encoder': encoder, 'mlm_head': mlm_head}


SPECIAL_TOKENS = {'unk_token': '[UNK]', 'sep_token': '[SEP]', 'pad_token': '[PAD]',
                  'cls_token': '[CLS]', 'mask_token': '[MASK]'}


def hf_config_json(cfg, pad_token_id: int = 0) -> dict[str, Any]:
  """What `BertConfig.save_pretrained` writes for this architecture (transformers-free).
  `pad_token_id`: the vocabulary's [PAD] (HF gives that embedding row no gradient)."""
  return dict(architectures=['BertForMaskedLM'], model_type='bert', pad_token_id=pad_token_id,
              position_embedding_type='absolute', torch_dtype='float32',
              **hf_bert_config_kwargs(cfg))


def hf_tokenizer_config(cfg) -> dict[str, Any]:
  """bert-base-uncased's tokenizer settings, with the model's real length limit, so that
  `truncation=True` cuts at max_position_embeddings (without it HF assumes 1e30)."""
  return dict(tokenizer_class='BertTokenizer', do_lower_case=True, do_basic_tokenize=True,
              tokenize_chinese_chars=True, strip_accents=None,
              clean_up_tokenization_spaces=True,
              model_max_length=int(cfg.max_position_embeddings), **SPECIAL_TOKENS)


def save_hf_pretrained(params: Mapping[str, Any], cfg, out_dir: str,
                       vocab_bytes: bytes | None = None) -> None:
  """Writes `params` (any variant) as a standard `BertForMaskedLM` directory.

  Every file is written to a temporary name and renamed, so an interrupted export never
  leaves a complete-looking model with missing weights.
  """
  from safetensors.numpy import save  # pylint: disable=g-import-not-at-top
  from bert_sym.files import write_atomically  # pylint: disable=g-import-not-at-top

  out = str(out_dir).rstrip('/')   # a string: pathlib would turn gs://b/x into gs:/b/x
  if not out.strip():   # '' or '/': f'{out}/config.json' is a file of the root directory
    raise ValueError(f'out_dir={out_dir!r} names no directory to export into.')
  tensors = mlm_params_to_hf(params, cfg)
  # The decoder is tied to the word embeddings (and its bias to cls.predictions.bias):
  # like save_pretrained, store each tensor once; from_pretrained re-ties them.
  tensors = {k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()
             if k not in ('cls.predictions.decoder.weight', 'cls.predictions.decoder.bias')}
  _clear_earlier_export(out)
  files = {'model.safetensors': save(tensors, metadata={'format': 'pt'}),
           'tokenizer_config.json': _json_bytes(hf_tokenizer_config(cfg)),
           'special_tokens_map.json': _json_bytes(SPECIAL_TOKENS)}
  pad_token_id = 0   # bert-base-uncased's; a user vocabulary may hold [PAD] elsewhere
  if vocab_bytes is not None:
    from bert_sym.input import tokenizer  # pylint: disable=g-import-not-at-top
    files['vocab.txt'] = vocab_bytes
    where = f'{out}/vocab.txt'
    pad_token_id = tokenizer.special_ids(tokenizer.parse_vocab(vocab_bytes, where), where).pad
  # config.json last: its presence marks a finished export.
  files['config.json'] = _json_bytes(hf_config_json(cfg, pad_token_id))
  for name, data in files.items():
    write_atomically(f'{out}/{name}', lambda f, data=data: f.write(data))   # makes the dir


# Files of a Hugging Face model directory that this export does not write: left from an
# earlier save_pretrained into the same directory, they would win over ours (a stale
# tokenizer.json is what AutoTokenizer loads first).
_OTHER_HF_FILES = ('tokenizer.json', 'added_tokens.json', 'pytorch_model.bin',
                   'model.safetensors.index.json', 'pytorch_model.bin.index.json',
                   'tf_model.h5', 'flax_model.msgpack', 'generation_config.json')


_EXPORT_FILES = ('model.safetensors', 'tokenizer_config.json', 'special_tokens_map.json',
                 'vocab.txt', 'config.json')


def check_out_dir(out_dir: str) -> None:
  """Raises ValueError unless `out_dir` is new, empty, or an earlier Hugging Face export
  (which the export replaces): never a training workdir, whose config.json it would
  overwrite, nor a directory of other files."""
  import fsspec  # pylint: disable=g-import-not-at-top
  fs, root = fsspec.core.url_to_fs(str(out_dir).rstrip('/'))
  if not fs.exists(root):
    return
  if not fs.isdir(root):   # (fs.ls of a file lists the file: it read as its own content)
    raise ValueError(f'--out_dir={out_dir} is a file, not a directory. Fix: --out_dir=a new '
                     'or empty directory.')
  names = {posixpath.basename(p.rstrip('/')) for p in fs.ls(root, detail=False)}
  if not names:
    return
  config = {}
  if 'config.json' in names:
    with contextlib.suppress(ValueError, OSError):
      config = json.loads(fs.cat_file(f'{root}/config.json'))
  if 'checkpoints' in names or ('config.json' in names and 'model' in config):
    raise ValueError(f'--out_dir={out_dir} is a bert_sym training workdir: the export would '
                     'overwrite its config.json. Fix: --out_dir=a new directory.')
  # An export interrupted before its config.json (written last): only its own files, and
  # the temporary ones of a write cut short.
  interrupted = 'config.json' not in names and all(
      name.lstrip('.').split('.tmp-')[0] in _EXPORT_FILES for name in names)
  if config.get('model_type') != 'bert' and not interrupted:
    raise ValueError(f'--out_dir={out_dir} is not empty ({", ".join(sorted(names)[:4])}'
                     f'{", ..." if len(names) > 4 else ""}) and holds no earlier export. '
                     'Fix: --out_dir=a new or empty directory.')


def _clear_earlier_export(out: str) -> None:
  """An earlier export in `out` loses its config.json first (the mark of a finished export:
  the directory then looks finished again only when this export is), then the files this
  export does not write."""
  import fsspec  # pylint: disable=g-import-not-at-top
  from bert_sym import files  # pylint: disable=g-import-not-at-top
  fs, root = fsspec.core.url_to_fs(out)
  for name in ('config.json',) + _OTHER_HF_FILES:
    if fs.exists(f'{root}/{name}'):
      fs.rm(f'{root}/{name}')
  # An export killed mid-write left a hidden temporary copy (of the weights: the model's
  # size), which the rerun never removed and an upload of the folder carried along.
  for name in _EXPORT_FILES:
    files.remove_leftover_temporaries(f'{out}/{name}')


def _json_bytes(value) -> bytes:
  return (json.dumps(value, indent=2) + '\n').encode()


def shape_mismatches(params: Mapping[str, Any], cfg) -> list[str]:
  """'name: checkpoint (shape), config (shape)' for each parameter whose shape (or
  presence) differs from what `cfg` (the checkpoint's config.json) builds; [] if none."""
  import jax  # pylint: disable=g-import-not-at-top
  from bert_sym import model as model_lib  # pylint: disable=g-import-not-at-top
  # Shapes only: the kernel the run trained with (splash, cudnn) need not exist here.
  cfg = cfg.copy_and_resolve_references()
  cfg.attention_impl = 'xla'
  want = {jax.tree_util.keystr(p): tuple(x.shape) for p, x in
          jax.tree_util.tree_leaves_with_path(
              model_lib.abstract_params(model_lib.BertForMaskedLM(cfg)))}
  have = {jax.tree_util.keystr(p): tuple(np.shape(x))
          for p, x in jax.tree_util.tree_leaves_with_path(params)}
  return [f'{name}: checkpoint {have.get(name, "absent")}, config {want.get(name, "absent")}'
          for name in sorted(set(want) | set(have)) if want.get(name) != have.get(name)]


def main(argv):
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  from bert_sym import metrics_writer  # pylint: disable=g-import-not-at-top
  from bert_sym.cli import UserError  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  metrics_writer.quiet_logs(flags.FLAGS['verbosity'].present)   # before TF is imported
  from bert_sym import checkpoint  # pylint: disable=g-import-not-at-top
  from bert_sym import config_check  # pylint: disable=g-import-not-at-top
  from bert_sym.input import tokenizer  # pylint: disable=g-import-not-at-top
  from etils import epath  # pylint: disable=g-import-not-at-top
  for flag, value in (('checkpoint', _CHECKPOINT.value), ('out_dir', _OUT_DIR.value)):
    if not value.strip():   # --out_dir=$OUT with OUT unset: the export went to / (its files)
      raise UserError(f'--{flag} is empty. Fix: --{flag}=DIR (see --help).')
  try:
    check_out_dir(_OUT_DIR.value)   # before the checkpoint is read: seconds, not minutes
  except ValueError as e:
    raise UserError(str(e)) from None
  try:
    step_dir, config, params = checkpoint.load_pretrained_step(_CHECKPOINT.value)
  except (FileNotFoundError, ValueError) as e:   # the reader's line may name its fix itself
    raise UserError(str(e) if 'Fix:' in str(e) else f'{e} Fix: --checkpoint=WORKDIR (a '
                    'bert_sym.train workdir: its latest step) or WORKDIR/checkpoints/STEP.'
                    ) from None
  # A model whose arrays disagree with its config.json would be written as a model that
  # Hugging Face cannot load: refuse before anything is written. config.json may have been
  # edited by hand (the README says to, for vocab_path): its values checked as the trainer's.
  try:
    config_check.check_model(config.model)
  except (ValueError, AttributeError, KeyError) as e:   # a bad value, a deleted key
    raise UserError(f'the config.json of {_CHECKPOINT.value}: {str(e).split(" Fix:")[0]} '
                    'Fix: correct that value in config.json, as the run that wrote the '
                    'checkpoint had it.') from None
  mismatches = shape_mismatches(params, config.model)
  if mismatches:
    raise UserError(
        f'the checkpoint {_CHECKPOINT.value} does not match its config.json in '
        f'{len(mismatches)} parameter(s): {"; ".join(mismatches[:4])}'
        f'{"; ..." if len(mismatches) > 4 else ""}. Nothing was written. Fix: export the '
        'checkpoint with the config.json of the run that wrote it.')
  # The tokenizer travels with the model so `from_pretrained(out_dir)` works end to end.
  vocab_file = config.data.get('vocab_path', '') or tokenizer.default_vocab_file()
  try:
    vocab_bytes = epath.Path(vocab_file).read_bytes()
  except FileNotFoundError:
    raise UserError(f'{vocab_file}: the vocabulary named by config.data.vocab_path of the '
                    'checkpoint\'s config.json is missing. Fix: restore that file, or edit '
                    'vocab_path in config.json.') from None
  try:
    checkpoint.check_trained_vocab(
        step_dir, vocab_file, hashlib.md5(vocab_bytes).hexdigest(),
        'restore that file as it was when the run trained, or set data.vocab_path in the '
        'run\'s config.json to the vocab.txt it trained with. Nothing was written.')
  except ValueError as e:
    raise UserError(str(e)) from None
  save_hf_pretrained(params, config.model, _OUT_DIR.value, vocab_bytes=vocab_bytes)
  # The step, as a workdir stands for its newest: which one a user shares must be on record.
  # No pooler: pre-training is MLM only, so BertModel (AutoModel) starts its pooler random.
  print(f'Wrote a standard Hugging Face BertForMaskedLM ({config.model.attention} attention '
        f'folded into W_k) of step {step_dir.name} ({step_dir}) to {_OUT_DIR.value}. It has '
        'no pooler (MLM pre-training trains none): AutoModel starts one at random, for a '
        'task head to train.')


if __name__ == '__main__':
  from absl import flags  # pylint: disable=g-import-not-at-top
  from bert_sym import cli  # pylint: disable=g-import-not-at-top
  _CHECKPOINT = flags.DEFINE_string(
      'checkpoint', None, 'Trainer workdir (latest step) or a step directory.', required=True)
  _OUT_DIR = flags.DEFINE_string(
      'out_dir', None, 'Where to write config.json, model weights and vocab.txt.',
      required=True)
  cli.run(main, prog='bert_sym.hf_export')

"""BERT (Devlin et al., 2019) in Flax, with the attention variant as a config switch.

Post-LayerNorm blocks, exact-erf GELU, learned absolute positions and token types, an MLM
head tied to the word embeddings: the original architecture, so that `standard` matches
Hugging Face `BertForMaskedLM` weight for weight. Mixed precision as under PyTorch AMP:
parameters, LayerNorms, the residual stream and the logits are float32; matmuls run in the
compute dtype (`model.dtype`, bfloat16 on accelerators). Parameters carry logical axis
names (`vocab`, `embed`, `mlp`, `heads`, `kv`); the trainer maps those to a mesh. This
file knows nothing about meshes, files or flags.
"""

import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bert_sym import lean_backward
from bert_sym import sharding
from bert_sym.attention import SelfAttention, dense_init, inverted_dropout
from bert_sym.kernel_choice import current_backend, target_backend


def compute_dtype(name: str) -> jnp.dtype:
  """'auto' is bfloat16 on accelerators (MXU/tensor-core native) and float32 on CPU."""
  if name == 'auto':
    return jnp.float32 if current_backend() == 'cpu' else jnp.bfloat16
  return jnp.dtype(name)


def _dense(features, axes, cfg, dtype, name):
  return nn.Dense(
      features, dtype=dtype, name=name,
      kernel_init=nn.with_logical_partitioning(dense_init(cfg.initializer_range), axes),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, axes[-1:]))


def _layer_norm(cfg, name):
  # Statistics in float32 whatever the compute dtype: bf16 variance is too coarse.
  return nn.LayerNorm(
      epsilon=cfg.layer_norm_eps, dtype=jnp.float32, name=name,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones, ('embed',)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ('embed',)))


# The residual stream [batch, length, hidden]: split over the batch rule's axes, whole
# along the hidden size (sharding.constrain; 'embed' names the weights' axis, not this).
ACTIVATION = ('batch', None, None)


class Dropout(nn.Module):
  """nn.Dropout's masks, its scale applied in float32 (see attention.inverted_dropout)."""
  rate: float

  @nn.compact
  def __call__(self, x, deterministic: bool):
    if deterministic or self.rate == 0.0:
      return x
    return inverted_dropout(x, self.rate, self.make_rng('dropout'))


class Embeddings(nn.Module):
  cfg: Any

  def setup(self):
    cfg = self.cfg
    # Lookups stay float32: the three embeddings are summed before a LayerNorm.
    emb = lambda n, axes: nn.Embed(
        n, cfg.hidden_size, embedding_init=nn.with_logical_partitioning(
            dense_init(cfg.initializer_range), axes))
    self.word_embeddings = emb(cfg.vocab_size, ('vocab', 'embed'))
    self.position_embeddings = emb(cfg.max_position_embeddings, (None, 'embed'))
    self.token_type_embeddings = emb(cfg.type_vocab_size, (None, 'embed'))
    self.layer_norm = _layer_norm(cfg, 'layer_norm')
    self.dropout = Dropout(cfg.dropout_rate)

  def __call__(self, input_ids, token_type_ids, *, deterministic):
    positions = jnp.arange(input_ids.shape[-1])[None, :]
    # Each table whole before its lookup, as FSDP gathers every weight before use: a lookup
    # in a table split along `embed` gives activations split along the hidden size (an
    # all-to-all each way), and with data x fsdp its gradient could not be scattered back
    # without replicating it first (XLA's "Involuntary full rematerialization").
    lookup = lambda embed, ids: jnp.take(
        sharding.constrain(embed.embedding, (None, None)), ids, axis=0)
    x = (lookup(self.word_embeddings, input_ids) + lookup(self.position_embeddings, positions)
         + lookup(self.token_type_embeddings, token_type_ids))
    return self.dropout(self.layer_norm(x), deterministic=deterministic)

  def attend(self, hidden):
    """Logits against the word embeddings: the MLM decoder shares them (weight tying).

    Operands in the compute dtype (on accelerators the largest matmul of a small BERT),
    accumulated and returned in float32 so the cross-entropy sees unrounded logits.
    """
    return lean_backward.decoder_logits(hidden, self.word_embeddings.embedding,
                                        compute_dtype(self.cfg.dtype),
                                        lean=self.cfg.get('lean_backward', True))


class Layer(nn.Module):
  """One post-LN transformer block: x = LN(x + Attn(x)); x = LN(x + FFN(x))."""
  cfg: Any

  @nn.compact
  def __call__(self, x, mask, deterministic, return_weights=False):
    cfg, dtype = self.cfg, compute_dtype(self.cfg.dtype)
    dropout = Dropout(cfg.dropout_rate)
    attn = SelfAttention(
        hidden_size=cfg.hidden_size, num_heads=cfg.num_heads, attention=cfg.attention,
        attention_impl=cfg.attention_impl, attention_dropout_rate=cfg.attention_dropout_rate,
        initializer_range=cfg.initializer_range, pairwise_init_std=cfg.pairwise_init_std,
        dtype=dtype, kernel_interpret=cfg.get('kernel_interpret', False),
        scanned=bool(cfg.get('scan_layers', False)),
        lean_backward=cfg.get('lean_backward', True), name='attention')(
            x, mask, deterministic=deterministic, return_weights=return_weights)
    attn, weights = attn if return_weights else (attn, None)
    x = _layer_norm(cfg, 'attention_layer_norm')(
        x + dropout(attn, deterministic=deterministic))
    h = lean_backward.gelu(_dense(cfg.mlp_dim, ('embed', 'mlp'), cfg, dtype, 'intermediate')(x),
                           lean=cfg.get('lean_backward', True))
    h = sharding.constrain(h, ('batch', None, 'mlp'))
    h = _dense(cfg.hidden_size, ('mlp', 'embed'), cfg, dtype, 'output')(h)
    x = _layer_norm(cfg, 'output_layer_norm')(x + dropout(h, deterministic=deterministic))
    return sharding.constrain(x, ACTIVATION), weights


REMAT_POLICIES = {   # full: keep each layer's input alone; dots: keep matmul outputs too
    'full': None, 'dots': jax.checkpoint_policies.dots_with_no_batch_dims_saveable}


def remat_policy(cfg):
  """(model.remat, model.remat_policy) -> False (no remat) or a jax.checkpoint policy."""
  if not cfg.remat:
    return False
  name = cfg.get('remat_policy', 'full')
  if name not in REMAT_POLICIES:
    raise ValueError(f'model.remat_policy={name!r}; use one of {sorted(REMAT_POLICIES)}.')
  return REMAT_POLICIES[name]


def stack_layers(tree, num_layers=None):
  """Per-layer parameters ({'layer_0': ..., 'layer_{n-1}': ...}) -> scanned layout
  ({'layers': leaves with a leading [n] axis}), wherever they occur in `tree` (MLM, GLUE
  and Adam-moment trees alike). Exact: leaves are stacked, never cast."""
  if not isinstance(tree, dict):
    return tree
  names = [k for k in tree if isinstance(k, str) and k.startswith('layer_')
           and k[len('layer_'):].isdigit()]
  out = {k: stack_layers(v, num_layers) for k, v in tree.items() if k not in names}
  if names:
    n = len(names)
    if sorted(names) != sorted(f'layer_{i}' for i in range(n)) or (
        num_layers is not None and n != num_layers):
      raise ValueError(f'Cannot stack layers {sorted(names)}: expected layer_0 .. '
                       f'layer_{(num_layers or n) - 1}.')
    if 'layers' in tree:
      raise ValueError("Both 'layers' and 'layer_{i}' entries: the tree is half converted.")
    layers = [stack_layers(tree[f'layer_{i}'], num_layers) for i in range(n)]
    out['layers'] = jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs])
                                 if not isinstance(xs[0], jax.Array)
                                 else jnp.stack(xs), *layers)
  return out


def unstack_layers(tree):
  """The scanned layout ({'layers': stacked leaves}) -> {'layer_0': ..., ...}; the exact
  inverse of stack_layers. Export, GLUE and attention maps read this layout."""
  if not isinstance(tree, dict):
    return tree
  out = {k: unstack_layers(v) for k, v in tree.items() if k != 'layers'}
  if 'layers' in tree:
    stacked = tree['layers']
    n = jax.tree.leaves(stacked)[0].shape[0]
    for i in range(n):
      out[f'layer_{i}'] = jax.tree.map(lambda x, i=i: x[i], stacked)
  return out


class Encoder(nn.Module):
  """Embeddings and the stack of layers; returns the last hidden states."""
  cfg: Any

  def setup(self):
    cfg = self.cfg
    self.embeddings = Embeddings(cfg)
    policy = remat_policy(cfg)
    layer = Layer
    if policy is not False:
      # (self, x, mask, deterministic, return_weights): the two flags are Python bools.
      layer = nn.remat(Layer, static_argnums=(3, 4), policy=policy,
                       prevent_cse=not cfg.get('scan_layers', False))
    if cfg.get('scan_layers', False):
      # One traced layer applied num_layers times: compile time independent of depth.
      # Parameters gain a leading [num_layers] axis under 'layers' (see stack_layers).
      self.layers = nn.scan(
          layer, variable_axes={'params': 0}, split_rngs={'params': True, 'dropout': True},
          in_axes=(nn.broadcast, nn.broadcast, nn.broadcast), length=cfg.num_layers,
          metadata_params={nn.PARTITION_NAME: 'layers'})(cfg, name='layers')
    else:
      self.layers = [layer(cfg, name=f'layer_{i}') for i in range(cfg.num_layers)]

  def __call__(self, input_ids, token_type_ids, attention_mask, *, deterministic=True,
               return_weights=False):
    hidden_size, num_heads = self.cfg.hidden_size, self.cfg.num_heads
    if hidden_size % num_heads:
      raise ValueError(f'model.hidden_size={hidden_size} is not divisible by '
                       f'model.num_heads={num_heads}.')
    if input_ids.shape[-1] > self.cfg.max_position_embeddings:
      raise ValueError(f'Sequence length {input_ids.shape[-1]} exceeds '
                       f'model.max_position_embeddings={self.cfg.max_position_embeddings}.')
    x = sharding.constrain(
        self.embeddings(input_ids, token_type_ids, deterministic=deterministic), ACTIVATION)
    mask = attention_mask.astype(bool)[:, None, None, :]   # [batch, 1, 1, key]
    if self.cfg.get('scan_layers', False):
      x, stacked = self.layers(x, mask, deterministic, return_weights)
      all_weights = [stacked[i] for i in range(self.cfg.num_layers)] if return_weights else []
    else:
      all_weights = []
      for layer in self.layers:
        x, weights = layer(x, mask, deterministic, return_weights)
        all_weights.append(weights)
    return (x, all_weights) if return_weights else x

  def attend(self, hidden):
    return self.embeddings.attend(hidden)


class MLMHead(nn.Module):
  """Dense -> GELU -> LayerNorm -> decoder tied to the word embeddings, plus a bias."""
  cfg: Any

  @nn.compact
  def __call__(self, hidden, decoder):
    cfg, dtype = self.cfg, compute_dtype(self.cfg.dtype)
    h = lean_backward.gelu(
        _dense(cfg.hidden_size, ('embed', 'embed_out'), cfg, dtype, 'transform')(hidden),
        lean=cfg.get('lean_backward', True))
    h = _layer_norm(cfg, 'layer_norm')(h)
    bias = self.param('bias', nn.with_logical_partitioning(nn.initializers.zeros, ('vocab',)),
                      (cfg.vocab_size,))
    return decoder(h).astype(jnp.float32) + bias


class BertForMaskedLM(nn.Module):
  """The pre-training model: encoder + MLM head (no NSP, no pooler, as in the paper)."""
  cfg: Any

  def setup(self):
    self.encoder = Encoder(self.cfg)
    self.mlm_head = MLMHead(self.cfg)

  def __call__(self, input_ids, token_type_ids, attention_mask, *, masked_positions=None,
               deterministic=True):
    """Returns MLM logits [batch, length, vocab], or [batch, P, vocab] at `masked_positions`.

    Sparse prediction (`masked_positions` [batch, P]) gathers the ~15% of positions that
    carry a loss before the vocabulary projection, the largest matmul of a small BERT.
    """
    hidden = self.encoder(input_ids, token_type_ids, attention_mask, deterministic=deterministic)
    if masked_positions is not None:
      hidden = jnp.take_along_axis(hidden, masked_positions[..., None], axis=1)
    return self.mlm_head(hidden, self.encoder.attend)


class Pooler(nn.Module):
  cfg: Any

  @nn.compact
  def __call__(self, hidden):
    dense = _dense(self.cfg.hidden_size, ('embed', 'embed_out'), self.cfg,
                   compute_dtype(self.cfg.dtype), 'dense')
    return jnp.tanh(dense(hidden[:, 0]))   # the [CLS] token


class BertModel(nn.Module):
  """Encoder + pooler: Hugging Face's `BertModel`, the paper's parameter-count convention."""
  cfg: Any

  @nn.compact
  def __call__(self, input_ids, token_type_ids, attention_mask, *, deterministic=True):
    hidden = Encoder(self.cfg, name='encoder')(
        input_ids, token_type_ids, attention_mask, deterministic=deterministic)
    return hidden, Pooler(self.cfg, name='pooler')(hidden)


class BertForSequenceClassification(nn.Module):
  """GLUE: pooler + dropout + linear head (num_labels=1 is STS-B's regressor)."""
  cfg: Any
  num_labels: int

  @nn.compact
  def __call__(self, input_ids, token_type_ids, attention_mask, *, deterministic=True):
    _, pooled = BertModel(self.cfg, name='bert')(
        input_ids, token_type_ids, attention_mask, deterministic=deterministic)
    pooled = Dropout(self.cfg.dropout_rate)(pooled, deterministic=deterministic)
    logits = _dense(self.num_labels, ('embed', 'classes'), self.cfg,
                    compute_dtype(self.cfg.dtype), 'classifier')(pooled)
    return logits.astype(jnp.float32)


# ---- Sizes and cost, computed from shapes only (jax.eval_shape: nothing is allocated) ----

def dummy_inputs(batch=1, length=8):
  ids = jnp.zeros((batch, length), jnp.int32)
  return ids, ids, jnp.ones((batch, length), jnp.int32)


def abstract_params(module: nn.Module, *, length=8):
  """Parameter shapes of `module` (ShapeDtypeStructs, logical-axis boxes removed)."""
  variables = jax.eval_shape(lambda: module.init(jax.random.key(0), *dummy_inputs(1, length)))
  return nn.meta.unbox(variables['params'])


def count_params(tree) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(tree))


def params_per_module(tree, depth=2) -> dict[str, int]:
  """Parameter counts grouped by the first `depth` levels of the parameter path."""
  counts: dict[str, int] = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    name = '/'.join(str(getattr(p, 'key', p)) for p in path[:depth])
    counts[name] = counts.get(name, 0) + int(leaf.size)
  return counts


def encoder_plus_pooler_params(cfg) -> int:
  """The paper's (and Hugging Face BertModel's) count: encoder + pooler, no MLM head.

  Shapes only, so counted with the xla kernel for the CPU: asking JAX for its default
  backend started it, and in a notebook (ablate.run) that took the GPU or TPU its trainers
  then need; a kernel named for another backend (cudnn, splash) need not build here."""
  cfg = cfg.copy_and_resolve_references()
  cfg.attention_impl = 'xla'
  with target_backend('cpu'):
    return count_params(abstract_params(BertModel(cfg)))


FLOPS_FORMULA = (
    'train FLOPs/token = 3 x forward, forward = 2 x (matmul weights touched per token) '
    '+ 4 x layers x seq_len x hidden (scores QK^T and weighted sum PV) '
    '[+ 2 x layers x hidden x head_dim for pairwise q\'=QP] '
    '+ 2 x (hidden^2 + hidden x vocab) x (predicted fraction) for the MLM head')


def mlm_predicted_fraction(config) -> float:
  """Share of a training config's positions reaching the MLM head: P / L sparse, 1 dense."""
  if config.model.sparse_mlm:
    return min(config.data.max_predictions_per_seq / config.data.max_seq_len, 1.0)
  return 1.0


def train_flops_per_token(cfg, seq_len: int, predicted_fraction: float = 1.0) -> float:
  """Model FLOPs of one training step per input token (backward = 2 x forward).

  `predicted_fraction` is the share of positions that reach the MLM head: 1.0 for the
  dense head, max_predictions_per_seq / seq_len for the sparse one. Embedding lookups,
  softmax, LayerNorm and biases are not counted (the usual MFU convention).
  """
  d, layers, head_dim = cfg.hidden_size, cfg.num_layers, cfg.hidden_size // cfg.num_heads
  # Q, (K,) V, O. The diagonal P of pairwise_diagonal is elementwise, like biases: not
  # counted.
  projections = 4 if cfg.attention in ('standard', 'standard_syminit') else 3
  per_layer = 2 * (projections * d * d + 2 * d * cfg.mlp_dim) + 4 * seq_len * d
  if cfg.attention == 'pairwise':
    per_layer += 2 * d * head_dim
  head = 2 * (d * d + d * cfg.vocab_size) * predicted_fraction
  return 3.0 * (layers * per_layer + head)


def summary(config) -> str:
  """The dry run's report: size and cost of the MLM model from shapes only (nothing is
  allocated), with the paper's parameter-count convention beside the MLM model's."""
  cfg = config.model
  mlm_params = abstract_params(BertForMaskedLM(cfg))
  per_module = params_per_module(mlm_params, depth=2)
  seq_len = config.data.max_seq_len
  flops = train_flops_per_token(cfg, seq_len, mlm_predicted_fraction(config))
  width = max(len(k) for k in per_module)
  lines = [
      f'BertForMaskedLM, attention variant: {cfg.attention}',
      f'  layers {cfg.num_layers}, hidden {cfg.hidden_size}, heads {cfg.num_heads}, '
      f'mlp {cfg.mlp_dim}, vocab {cfg.vocab_size}, max positions '
      f'{cfg.max_position_embeddings}',
      'Parameters per module (MLM model):']
  natural = lambda name: [int(t) if t.isdigit() else t for t in re.split(r'(\d+)', name)]
  lines += [f'  {name:<{width}}  {per_module[name]:>13,}'
            for name in sorted(per_module, key=natural)]
  lines += [
      f'Total, encoder + pooler (paper / HF BertModel convention): '
      f'{encoder_plus_pooler_params(cfg):,}',
      f'Total, MLM model (encoder + MLM head, decoder tied to embeddings): '
      f'{count_params(mlm_params):,}',
      f'Training FLOPs per token: {flops:,.0f} (seq_len {seq_len}, '
      f'{"sparse" if cfg.sparse_mlm else "dense"} MLM head, predicted fraction '
      f'{mlm_predicted_fraction(config):.4f})',
      f'  = {flops * config.batch_size * seq_len:.3e} FLOPs per step at batch '
      f'{config.batch_size}',
      f'  formula: {FLOPS_FORMULA}',
  ]
  return '\n'.join(lines)

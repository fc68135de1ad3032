"""The one definition of every knob; experiment files only change values.

Every experiment config is `get_config(arg)` returning an `ml_collections.ConfigDict`
built from `base_config(...)`, so a key is spelled in exactly one place and
`--config.a.b=value` overrides work for every experiment alike.
"""

import ml_collections

# bert-base-uncased WordPiece size; the MLM decoder and GLUE tokenizer must agree on it.
BERT_UNCASED_VOCAB_SIZE = 30522

MODEL_SIZES = {
    # name: (layers, hidden, heads, mlp)
    'base': (12, 768, 12, 3072),
    'small': (4, 512, 8, 2048),
    # A CPU-sized model that still has several heads, so every code path is exercised.
    'tiny': (2, 128, 4, 512),
}


def model_config(size: str = 'base', attention: str = 'pairwise') -> ml_collections.ConfigDict:
  layers, hidden, heads, mlp = MODEL_SIZES[size]
  return ml_collections.ConfigDict(dict(
      attention=attention,          # 'standard' | 'symmetric' | 'pairwise' (paper); 'pairwise_diagonal' | 'standard_syminit' (ablations)
      attention_impl='auto',        # 'auto' | 'xla' | 'cudnn' (GPU) | 'pallas' (GPU, dropout in the kernel) | 'splash' (TPU); see bert_sym/kernel_choice.py
      vocab_size=BERT_UNCASED_VOCAB_SIZE,
      hidden_size=hidden,
      num_layers=layers,
      num_heads=heads,
      mlp_dim=mlp,
      max_position_embeddings=512,
      type_vocab_size=2,
      dropout_rate=0.1,
      attention_dropout_rate=0.1,
      layer_norm_eps=1e-12,
      initializer_range=0.02,       # N(0, 0.02) for every weight but P
      pairwise_init_std=1.0,        # P_h ~ N(0, 1) as in the reference code
      dtype='auto',                 # compute dtype; 'auto' = bfloat16 on TPU/GPU, float32 on CPU
      sparse_mlm=True,              # MLM logits only at masked positions
      remat=False,                  # rematerialise each layer's activations (saves memory)
      remat_policy='full',          # with remat: 'full' (save nothing) | 'dots' (keep matmul outputs)
      scan_layers=False,            # nn.scan over layers: compile time independent of depth; params under 'layers' with a leading [num_layers] axis (model.stack_layers converts)
      lean_backward=True,           # backward passes written by hand (bert_sym/lean_backward.py): GELU keeps x alone, xla attention dropout draws its mask again, the MLM decoder's matmuls in bf16, a one-pass cross-entropy gradient; False: JAX autodiff's (what the GPU runs up to 2026-12-06 measured)
      kernel_interpret=False,       # Pallas kernels (splash, pallas) in interpret mode: tests on CPU only
  ))


# Attention dropout vs fused attention kernels (cuDNN / splash have no dropout on the
# attention probabilities), as a recipe name: `--config=configs/sym_base.py:fast`.
RECIPES = {
    # The paper's recipe exactly: BERT's attention dropout 0.1, on the explicit-scores xla path.
    'paper': dict(attention_impl='xla', attention_dropout_rate=0.1),
    # MosaicBERT / ModernBERT: no attention dropout, so `auto` runs the fused kernel
    # (cudnn on GPU, splash on TPU). Hidden-state dropout 0.1 stays.
    'fast': dict(attention_impl='auto', attention_dropout_rate=0.0),
}


def apply_recipe(c: ml_collections.ConfigDict, recipe: str) -> ml_collections.ConfigDict:
  if recipe not in RECIPES:
    raise ValueError(f'Unknown recipe {recipe!r}; use one of {sorted(RECIPES)} '
                     f'(e.g. --config=configs/sym_base.py:fast).')
  c.model.update(RECIPES[recipe])
  return c


def base_config(size: str = 'base', attention: str = 'pairwise',
                recipe: str = 'paper') -> ml_collections.ConfigDict:
  """The paper's pre-training recipe (Courtois et al., Findings of ACL 2024) at the given
  model size; recipe='fast' drops attention dropout for the fused attention kernels (see
  RECIPES)."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.prng_impl = 'threefry'          # dropout masks' PRNG: 'threefry' | 'rbg' | 'unsafe_rbg' (bert_sym/steps.py); a run resumes only with the one that wrote it
  c.model = model_config(size, attention)

  c.data = ml_collections.ConfigDict(dict(
      source='seqio',               # 'seqio' (TF input pipeline) | 'shards' (exported, TF-free) | 'streaming' (exported, any size, local or gs://)
      task='bert_sym_mlm_embedded', # a registered seqio task (see bert_sym/input/seqio_tasks.py)
      text_files='',                # glob(s), comma separated, for task 'bert_sym_mlm_text_files'
      validation_files='',          # its validation glob(s); '' = every 100th document held out
      shards_dir='',                # output of `python -m bert_sym.shards export`: local or gs:// ('streaming'), local ('shards')
      vocab_path='',                # '' = bert-base-uncased WordPiece rebuilt offline
      max_seq_len=512,
      mask_rate=0.15,
      whole_word_masking=False,
      max_predictions_per_seq=80,   # >= 15% of 512 plus slack; caps the sparse MLM head
      shuffle=True,                 # train split: a fresh exact permutation every epoch
  ))

  c.batch_size = 256                # global, in sequences
  c.total_steps = 200_000
  c.optimizer = ml_collections.ConfigDict(dict(
      learning_rate=1e-4,
      b1=0.9,
      b2=0.999,
      eps=1e-12,
      weight_decay=0.01,            # not on biases and LayerNorm
      warmup_steps=10_000,          # then linear decay to 0 at total_steps
      grad_clip_norm=1.0,           # Hugging Face Trainer's default, used by the reference run
      grad_accum_steps=1,
  ))

  # Mesh axes; -1 takes the devices left over. Logical parameter axes map to mesh axes
  # through `sharding_rules` (t5x style): changing parallelism never touches the model.
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  # A tuple, not a list: ml_collections can override tuples from the command line
  # (--config.sharding_rules="(('batch', 'data'), ...)"), lists not at all.
  c.sharding_rules = (
      ('batch', ('data', 'fsdp')),
      ('vocab', 'tensor'),
      ('embed', 'fsdp'),
      ('mlp', 'tensor'),
      ('heads', 'tensor'),
      ('kv', None),
      ('layers', None),             # the stacked axis of scan_layers=True
  )

  c.log_every_steps = 50
  c.eval_every_steps = 250
  c.eval_steps = 20
  c.checkpoint = ml_collections.ConfigDict(dict(
      every_steps=1000,
      keep_last=3,                  # 0 = keep all; plus the newest good one (README: failures)
      keep_every=10_000,            # also keep every K-th step forever (0 = off)
      async_save=True,
      # A host whose background save fails or stalls stops every host after this long (the
      # others wait for it at orbax's barrier); orbax's default is 1200. Raise it for
      # checkpoints that take longer to write.
      save_timeout_s=600,
  ))
  c.on_nonfinite = 'stop'           # 'stop' | 'skip'
  c.max_consecutive_nonfinite = 10  # 'skip' stops (exit 1) after this many in a row
  c.peak_flops_per_device = 0.0     # 0 = look up by device kind (for MFU)
  c.xla_gpu_flags = True            # on NVIDIA GPUs, set bert_sym/gpu_flags.py's XLA flags (cuDNN LayerNorm, cuBLASLt epilogues); False = XLA's defaults
  c.compilation_cache_dir = '~/.cache/bert_sym/jax'   # JAX persistent compilation cache; '' = off; under $BERT_SYM_CACHE or $XDG_CACHE_HOME when set (files.cache_dir)
  c.compilation_cache_max_gb = 10.0   # past this, JAX deletes the least recently used compiled steps there; 0 = no limit
  return apply_recipe(c, recipe)


# The paper pre-trained on OSCAR-2301 English (filtered Common Crawl; not in TFDS). C4 English
# is the TFDS corpus of the same kind, and large enough (~150B tokens) that the recipe's
# 200k x 256 x 512 = 26B tokens read it less than once, as the paper read OSCAR.
PRETRAINING_TASK = 'bert_sym_mlm_c4'


def pretraining_corpus(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Switches `c` to the real corpus, streamed from exported shards (bert_sym/input/shard_reader.py).

  shards_dir stays empty: the trainer then stops at once with the commands that prepare
  the corpus (`python -m bert_sym.shards export ...`), never training on something else.
  """
  c.data.update(dict(source='streaming', task=PRETRAINING_TASK, shards_dir=''))
  return c

"""GLUE fine-tuning: the paper's recipe (Courtois et al., Findings of ACL 2024) on every task, seeds 1-5.

  python -m bert_sym.glue --checkpoint=/path/to/workdir --output_dir=/tmp/glue

5 epochs, AdamW lr 1e-5, 10% linear warm-up then linear decay to 0, batch 16, max length
128, weight decay 0, dev score after the last epoch (no best-epoch pick). Everything the
paper does not state follows Hugging Face `run_glue.py`/`Trainer` defaults, which the
reference implementation ran on: Adam betas 0.9/0.999, eps 1e-8, gradient clipping 1.0,
keep the last partial batch, dropout 0.1 (hidden and attention, set here: the reference
loaded the pre-training config.json, whose rates are 0.1, while a `fast` checkpoint here
trained without attention dropout).

`--config=configs/glue.py:runlocal` is the same experiment shrunk for a laptop (slices of
256 train / 128 dev examples, 1 epoch, seed 1). The model itself (size, attention variant,
vocabulary) is never set here: it is read from the checkpoint's config.json.
"""

import ml_collections

ALL_TASKS = 'cola,sst2,mrpc,stsb,qqp,mnli,qnli,rte,wnli'


def get_config(arg=None):
  c = ml_collections.ConfigDict()
  c.tasks = ALL_TASKS           # comma-separated TFDS names; --tasks overrides
  c.seeds = '1,2,3,4,5'         # comma-separated; --seeds overrides

  # Data: TFDS glue/* unless glue_dir (GLUE download-script layout) is set.
  c.glue_dir = ''
  c.tfds_data_dir = ''          # '' = TFDS default (~/tensorflow_datasets)
  c.vocab_path = ''             # '' = the checkpoint's data.vocab_path (bert-base-uncased)
  c.max_seq_len = 128
  c.max_train_examples = 0      # > 0: first N training examples only (tests, smoke runs)
  c.max_eval_examples = 0       # > 0: first N examples of each dev set
  c.length_buckets = True       # pad each batch to a power of two <= max_seq_len (CPU speed)
  # A pair over max_seq_len: 'hf', Hugging Face's truncation='longest_first' (the paper's
  # tokenizers); 'bert', Google BERT's _truncate_seq_pair. They differ only where both
  # sentences are cut: which keeps the odd token.
  c.pair_truncation = 'hf'
  # WordPiece ids of each text set, kept for the next run on the same texts and vocabulary
  # (a sweep, an ablation grid, a rerun): it then starts without TensorFlow. '' = none. The
  # default moves under $BERT_SYM_CACHE or $XDG_CACHE_HOME when set (files.cache_dir).
  c.tokens_cache_dir = '~/.cache/bert_sym/glue_tokens'
  # The attention kernel (xla | cudnn | splash | auto). Not the checkpoint's: the kernel
  # named in pre-training may not exist here (splash off a TPU), or not tile GLUE's short
  # lengths; auto takes splash on a TPU where it can tile the lengths, xla elsewhere (not
  # cuDNN: its dropout masks ignore the seed, and it cannot batch over seeds trained
  # together).
  c.attention_impl = 'auto'
  # Dropout while fine-tuning (the paper's 0.1), whatever the checkpoint trained with.
  c.dropout_rate = 0.1
  c.attention_dropout_rate = 0.1

  # Optimisation (the paper's recipe).
  c.epochs = 5.0                # float: fractional epochs allowed for quick runs
  c.batch_size = 16             # global; split over the data-parallel mesh axis
  c.eval_batch_size = 64
  c.learning_rate = 1e-5
  c.warmup_ratio = 0.1          # of the total fine-tuning steps; then linear decay to 0
  c.weight_decay = 0.0          # when > 0, not on biases and LayerNorm (as in pre-training)
  c.b1 = 0.9
  c.b2 = 0.999
  c.eps = 1e-8
  c.grad_clip_norm = 1.0        # 0 = off
  c.grad_accum_steps = 1        # micro-batches per step (same update, less memory)

  # Mesh: data parallel over every device by default; parameters follow the logical-axis
  # rules of the checkpoint's training config (replicated unless fsdp/tensor > 1).
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))

  c.log_every_steps = 50        # TensorBoard train/loss and train/learning_rate
  c.progress_bar = True
  # Reuse the (task, seed) runs already finished in --output_dir for the same checkpoint
  # and recipe (a preempted or extended run redoes only what is missing).
  c.resume = True
  # Inside a task: a checkpoint in runs/<task>/checkpoints every N steps (0 = only when
  # stopped by SIGTERM / Ctrl-C); the rerun continues from it.
  c.checkpoint_every_steps = 1000
  # All seeds of a task in one vmapped step (True), or one by one (False): the same models
  # either way, up to float rounding (vmapped matmuls sum in another order). 'auto':
  # together on an accelerator from 10k steps per seed (MNLI, QQP, QNLI, SST-2 with the
  # paper's recipe), where the saved step time repays the longer compile; one by one
  # otherwise (benchmarks/RESULTS.md).
  c.parallel_seeds = 'auto'
  c.on_nonfinite = 'stop'       # 'skip': skip non-finite updates (never applied either way)
  c.max_consecutive_nonfinite = 10   # with 'skip': stop after this many in a row
  c.peak_flops_per_device = 0.0  # 0 = look up by device kind (for MFU), as in pre-training

  if arg == 'runlocal':
    c.seeds = '1'
    c.epochs = 1.0
    c.max_train_examples = 256
    c.max_eval_examples = 128
    c.log_every_steps = 4
  elif arg:
    raise ValueError(f'configs/glue.py takes no argument or "runlocal", got {arg!r}.')
  return c

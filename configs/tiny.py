"""A 2-layer, 128-wide pairwise BERT that trains in minutes on a 2-core CPU.

  python -m bert_sym.train --config=configs/tiny.py --workdir=/tmp/bert_sym_tiny

Same recipe as the paper, shrunk: short sequences, small batch, short warm-up. Pick the
variant with --config.model.attention=standard|symmetric|pairwise.
"""

from configs import common


def get_config(arg=None):
  if arg:   # ignoring it would run something other than what was asked
    raise ValueError(
        f'configs/tiny.py takes no argument, got {arg!r}. Fix: --config=configs/tiny.py '
        '(recipes such as :fast are for the small and base configs; here set '
        '--config.model.attention_dropout_rate=0 --config.model.attention_impl=auto).')
  c = common.base_config('tiny', 'pairwise')
  c.model.dtype = 'float32'
  # Sized so that a 2-core CPU sees the validation loss fall well below its initial
  # ~10.3 (ln 30522) within about five minutes, compilation included.
  c.data.max_seq_len = 64
  c.data.max_predictions_per_seq = 10   # 15% of 64 rounded up
  c.batch_size = 32
  c.total_steps = 300
  c.optimizer.learning_rate = 1e-3   # small models want a larger step
  c.optimizer.warmup_steps = 30
  c.log_every_steps = 10
  c.eval_every_steps = 50
  c.eval_steps = 4
  c.checkpoint.every_steps = 50
  c.checkpoint.keep_every = 0
  return c

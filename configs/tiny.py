"""A 2-layer, 128-wide pairwise BERT that trains in minutes on a 2-core CPU.

  python -m bert_sym.train --config=configs/tiny.py --workdir=/tmp/bert_sym_tiny

Same recipe as the paper, shrunk: short sequences, small batch, short warm-up. Pick the
variant with --config.model.attention=standard|symmetric|pairwise.
"""

from configs import common


def get_config(arg=None):
  del arg
  c = common.base_config('tiny', 'pairwise')
  c.model.dtype = 'float32'
  c.data.max_seq_len = 128
  c.data.max_predictions_per_seq = 24
  c.data.shuffle_buffer = 1000
  c.batch_size = 32
  c.total_steps = 600
  c.optimizer.learning_rate = 1e-3   # small models want a larger step
  c.optimizer.warmup_steps = 60
  c.log_every_steps = 20
  c.eval_every_steps = 100
  c.eval_steps = 5
  c.checkpoint.every_steps = 100
  c.checkpoint.keep_every = 0
  return c

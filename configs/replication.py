r"""Small-scale replication of the paper's comparison on real text (benchmarks/REPLICATION.md).

  python -m bert_sym.ablate --config=configs/replication.py:../shared/data/wikitext-2 \
      --variants=standard,symmetric,pairwise,pairwise_diagonal,standard_syminit \
      --seeds=1,2,3 --workdir=runs/replication

WikiText-2 (real Wikipedia text) through the text-files task, its own validation file;
a 4-layer, 256-wide, 4-head BERT at sequence length 128: the largest model whose 15-run
grid trains past the initial MLM plateau on a 2-core CPU within about 90 minutes. The
paper's recipe otherwise (AdamW, linear warm-up and decay, dropout 0.1).
The argument is the WikiText-2 directory (wiki.train.tokens, wiki.valid.tokens).
"""

import os

from configs import common


def get_config(arg=None):
  wikitext_dir = arg or '../shared/data/wikitext-2'
  c = common.base_config('tiny', 'pairwise')
  c.model.update(num_layers=4, hidden_size=128, num_heads=4, mlp_dim=512, dtype="float32")
  c.data.task = 'bert_sym_mlm_text_files'
  c.data.text_files = os.path.join(wikitext_dir, 'wiki.train.tokens')
  c.data.validation_files = os.path.join(wikitext_dir, 'wiki.valid.tokens')
  c.data.max_seq_len = 128
  c.data.max_predictions_per_seq = 20   # 15% of 128 rounded up
  c.batch_size = 16
  c.total_steps = 600
  c.optimizer.learning_rate = 1e-3
  c.optimizer.warmup_steps = 60
  c.log_every_steps = 50
  c.eval_every_steps = 50
  c.eval_steps = 8
  c.checkpoint.every_steps = 200
  c.checkpoint.keep_last = 1
  c.checkpoint.keep_every = 0
  return c

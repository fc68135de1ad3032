r"""Small-scale replication of the paper's comparison on real text (benchmarks/REPLICATION.md).

  python -m bert_sym.ablate --config=configs/replication.py:../shared/data/wikitext-2 \
      --variants=standard,symmetric,pairwise,pairwise_diagonal,standard_syminit \
      --seeds=1,2,3 --workdir=runs/replication

WikiText-2 (real Wikipedia text) through the text-files task, its own validation file;
a 4-layer, 128-wide, 4-head BERT at sequence length 64, batch 16, 2,000 steps. 400 steps
(the first grid, 2026-11-25) ended every variant on the unigram plateau (eval loss ~6.13,
MLM accuracy ~10%); a 2,000-step probe of standard left it after about 800 steps (accuracy
10% -> 15% by step 1,000). About 6 steps/s on an idle 2-core CPU: 6 minutes a run. The
paper's recipe otherwise (AdamW, linear warm-up and decay, dropout 0.1).
The argument is the WikiText-2 directory (wiki.train.tokens, wiki.valid.tokens).
"""

import os

from configs import tiny


def get_config(arg=None):
  wikitext_dir = arg or '../shared/data/wikitext-2'
  c = tiny.get_config()   # the demo's model family, length 64 and learning rate
  c.model.update(num_layers=4, num_heads=4)
  c.data.task = 'bert_sym_mlm_text_files'
  c.data.text_files = os.path.join(wikitext_dir, 'wiki.train.tokens')
  c.data.validation_files = os.path.join(wikitext_dir, 'wiki.valid.tokens')
  c.batch_size = 16
  c.total_steps = 2000
  c.optimizer.warmup_steps = 100
  c.log_every_steps = 100
  c.eval_every_steps = 100
  c.eval_steps = 8
  c.checkpoint.every_steps = 500
  c.checkpoint.keep_last = 1
  return c

r"""Small-scale replication of the paper's comparison on real text (benchmarks/REPLICATION.md).

  python -m bert_sym.ablate --config=configs/replication.py:/path/to/wikitext-2 \
      --variants=standard,symmetric,pairwise,pairwise_diagonal,standard_syminit \
      --seeds=1,2,3 --workdir=runs/replication

WikiText-2 (real Wikipedia text) through the text-files task, its own validation file;
a 4-layer, 128-wide, 4-head BERT at sequence length 64, batch 16, 2,000 steps. 400 steps
(the first grid) ended every variant on the unigram plateau (eval loss ~6.13, MLM accuracy
~10%); a 2,000-step probe of standard left it after about 800 steps. About 6 steps/s on an
idle 2-core CPU. The paper's recipe otherwise (AdamW, linear warm-up and decay, dropout
0.1). The argument is the WikiText-2 directory (wiki.train.tokens, wiki.valid.tokens).

Eval: 256 batches of 16 x 64 tokens, the first 262k tokens of wiki.valid.tokens (4,216
blocks: 263 whole batches) read once, every 200 steps (the steps-to-target statistic
interpolates between evals, so it does not need them dense).

The same text through exported shards (TF-free reading; the eval reads the same blocks):

  python -m bert_sym.shards export --task=bert_sym_mlm_text_files --max_seq_len=64 \
      --text_files=/path/to/wikitext-2/wiki.train.tokens \
      --validation_files=/path/to/wikitext-2/wiki.valid.tokens --out_dir=/tmp/wikitext2_64
  python -m bert_sym.ablate --config=configs/replication.py:/path/to/wikitext-2 ... \
      --config.data.source=shards --config.data.shards_dir=/tmp/wikitext2_64
"""

import os

from configs import tiny


def get_config(arg=None):
  wikitext_dir = arg or os.path.join('data', 'wikitext-2')
  c = tiny.get_config()   # the demo's model family, length 64 and learning rate
  c.model.update(num_layers=4, num_heads=4)
  c.data.task = 'bert_sym_mlm_text_files'
  c.data.text_files = os.path.join(wikitext_dir, 'wiki.train.tokens')
  c.data.validation_files = os.path.join(wikitext_dir, 'wiki.valid.tokens')
  c.data.max_predictions_per_seq = 10   # round(0.15 * 64) = 10: never truncates
  c.batch_size = 16
  c.total_steps = 2000
  c.optimizer.warmup_steps = 100
  c.log_every_steps = 100
  c.eval_every_steps = 200
  c.eval_steps = 256
  c.checkpoint.every_steps = 500
  c.checkpoint.keep_last = 1
  return c

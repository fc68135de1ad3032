r"""bert-small (4 layers, 512 hidden, 8 heads) with pairwise attention, paper recipe.

  python -m bert_sym.train --config=configs/sym_small.py --workdir=gs://BUCKET/sym_small \
      --config.data.shards_dir=gs://BUCKET/c4_512

Trains on C4 English streamed from exported shards (configs/common.py:
`pretraining_corpus`; prepare them with `python -m bert_sym.shards export`, see
bert_sym/input/shard_reader.py). Without shards_dir the run stops at once and prints how.

  python -m bert_sym.train --config=configs/sym_small.py:fast ...   # the fast recipe
"""

from configs import common


def get_config(arg=None):
  # arg: the recipe, 'paper' (default) or 'fast' (no attention dropout, fused kernel).
  return common.pretraining_corpus(
      common.base_config('small', 'pairwise', recipe=arg or 'paper'))

"""bert-small (4 layers, 512 hidden, 8 heads) with pairwise attention, paper recipe.

  python -m bert_sym.train --config=configs/sym_small.py --workdir=gs://BUCKET/sym_small
"""

from configs import common


def get_config(arg=None):
  del arg
  return common.base_config('small', 'pairwise')

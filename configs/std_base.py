"""The standard-attention bert-base baseline, same recipe as sym_base.

  python -m bert_sym.train --config=configs/std_base.py --workdir=gs://BUCKET/std_base

  python -m bert_sym.train --config=configs/std_base.py:fast ...   # the fast recipe
"""

from configs import common


def get_config(arg=None):
  # arg: the recipe, 'paper' (default) or 'fast' (no attention dropout, fused kernel).
  return common.base_config('base', 'standard', recipe=arg or 'paper')

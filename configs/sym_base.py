"""The paper's headline: pairwise symmetric attention, bert-base, the paper's recipe.

  python -m bert_sym.train --config=configs/sym_base.py --workdir=gs://BUCKET/sym_base

Other variants from the command line: --config.model.attention=symmetric.

  python -m bert_sym.train --config=configs/sym_base.py:fast ...   # the fast recipe
"""

from configs import common


def get_config(arg=None):
  # arg: the recipe, 'paper' (default) or 'fast' (no attention dropout, fused kernel).
  return common.base_config('base', 'pairwise', recipe=arg or 'paper')

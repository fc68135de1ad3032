"""The paper's headline: pairwise symmetric attention, bert-base, the paper's recipe.

  python -m bert_sym.train --config=configs/sym_base.py --workdir=gs://BUCKET/sym_base

Other variants from the command line: --config.model.attention=symmetric.
"""

from configs import common


def get_config(arg=None):
  del arg
  return common.base_config('base', 'pairwise')

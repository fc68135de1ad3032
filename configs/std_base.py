"""The standard-attention bert-base baseline, same recipe as sym_base.

  python -m bert_sym.train --config=configs/std_base.py --workdir=gs://BUCKET/std_base
"""

from configs import common


def get_config(arg=None):
  del arg
  return common.base_config('base', 'standard')

"""bert-small with standard attention, the small baseline.

  python -m bert_sym.train --config=configs/std_small.py --workdir=gs://BUCKET/std_small
"""

from configs import common


def get_config(arg=None):
  del arg
  return common.base_config('small', 'standard')

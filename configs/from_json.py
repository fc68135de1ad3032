"""Re-runs an experiment from the config.json that the trainer wrote into its workdir.

  python -m bert_sym.train --config=configs/from_json.py:/path/to/old_run/config.json \
      --workdir=/path/to/new_run

config.json holds every resolved value (command-line overrides included), so the new run
has exactly the old run's config; further --config.* overrides still apply on top.
"""

import json

from etils import epath
import ml_collections


def get_config(path):
  if not path:
    raise ValueError('Usage: --config=configs/from_json.py:/path/to/config.json')
  return ml_collections.ConfigDict(json.loads(epath.Path(path).read_text()))

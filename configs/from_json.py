"""Re-runs an experiment from the config.json that the trainer wrote into its workdir.

  python -m bert_sym.train --config=configs/from_json.py:/path/to/old_run/config.json \
      --workdir=/path/to/new_run

config.json holds every resolved value (command-line overrides included), so the new run
has exactly the old run's config; further --config.* overrides still apply on top.
"""

import json

from etils import epath
import ml_collections


def _tuples(value):
  return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def get_config(path=None):   # None: `--config=configs/from_json.py` without `:PATH`
  if not path:
    raise ValueError('Usage: --config=configs/from_json.py:/path/to/config.json')
  path = epath.Path(path)
  if path.is_dir():   # a workdir, as the trainer's own messages name runs
    path = path / 'config.json'
  if not path.exists():
    raise ValueError(f'{path} does not exist. Fix: --config=configs/from_json.py:'
                     'WORKDIR/config.json (the file the trainer wrote into the old run).')
  try:   # ml_collections re-raises type(e)(text), which a JSONDecodeError cannot take
    values = json.loads(path.read_text())
    why = '' if isinstance(values, dict) else f'JSON {json.dumps(values)[:40]}, not an object'
  except ValueError as e:   # also UnicodeDecodeError
    why = str(e)
  if why:
    raise ValueError(f'{path} is not a config.json ({why}). Fix: --config=configs/'
                     'from_json.py:WORKDIR/config.json (the file the trainer wrote into the '
                     'old run).')
  # JSON has no tuples; the config file's tuples go back to tuples, so that they can still
  # be overridden from the command line as the original run's could.
  if 'sharding_rules' in values:
    values['sharding_rules'] = _tuples(values['sharding_rules'])
  return ml_collections.ConfigDict(values)

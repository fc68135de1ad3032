"""Multi-host decisions: read the filesystem on process 0 only, share the answer."""

import json
from typing import Any

import jax
import numpy as np


def _broadcast_json_from_process_0(obj) -> Any:
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  primary = jax.process_index() == 0
  data = np.frombuffer(json.dumps(obj).encode(), np.uint8) if primary else None
  # broadcast_one_to_all needs one shape on every process: the length first, then bytes.
  size = int(multihost_utils.broadcast_one_to_all(
      np.array(data.size if primary else 0, np.int64)))
  buffer = data if primary else np.zeros(size, np.uint8)
  return json.loads(bytes(np.asarray(multihost_utils.broadcast_one_to_all(buffer))).decode())


def on_process_0(fn) -> Any:
  """`fn()` (JSON-serialisable) evaluated on process 0 only, returned on every process.

  For decisions read from the filesystem. Hosts may see different files (per-host local
  output dirs; a checkpoint finishing between two listings); hosts that decide differently
  enter different collectives, and the run hangs instead of failing. An error on process 0
  is raised on every process, for the same reason.
  """
  if jax.process_count() == 1:
    return fn()
  outcome, error = None, None
  if jax.process_index() == 0:
    try:
      outcome = {'value': fn()}
    except Exception as e:  # pylint: disable=broad-except
      error, outcome = e, {'error': f'{type(e).__name__}: {e}'}
  outcome = _broadcast_json_from_process_0(outcome)
  if error is not None:
    raise error
  if 'error' in outcome:
    raise RuntimeError(f'Process 0 failed, so process {jax.process_index()} stops too: '
                       f'{outcome["error"]}')
  return outcome['value']

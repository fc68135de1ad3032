"""Multi-host decisions: read the filesystem on process 0 only, share the answer."""

from typing import Any

import jax

from bert_sym import checkpoint
from bert_sym import cli


class Process0Stopped(cli.UserError, ValueError):
  """Process 0's decision stopped on the user's error (its message names the fix)."""


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
      # The others say a user's error in one line too, as process 0 does (they printed a
      # traceback); a bug stays one.
      user = isinstance(e, ValueError) or cli.user_error_message(e) is not None
      error, outcome = e, {'error': f'{type(e).__name__}: {e}', 'user': user}
  outcome = checkpoint.allgather_json(outcome)[0]   # process 0's, on every process
  if error is not None:
    raise error
  if 'error' in outcome:
    raise (Process0Stopped if outcome.get('user') else RuntimeError)(
        f'Process 0 failed, so process {jax.process_index()} stops too: {outcome["error"]}')
  return outcome['value']

"""Rotation: which old steps a save removes (keep_last, keep_every, the newest good one),
and how it removes them without leaving a half-deleted step that looks finished."""

from typing import Callable

from absl import logging
from etils import epath
import jax


# Locally, orbax renames a rotated-out step into this folder (CheckpointManagerOptions
# .todelete_subdir) instead of deleting it in place: a deletion killed half way left
# `checkpoints/<step>/` still listed as finished, with some of its files gone, for
# `--checkpoint=.../<step>` or a GLUE sweep to meet. The rename is atomic; what is under
# the folder is removed when no save is in flight (remove_rotated_out). On gs:// orbax
# ignores the option and deletes in place (its finished mark, commit_success.txt, can
# outlive the files), as before.
ROTATED_OUT = '.rotated-out'


def remove_rotated_out(directory) -> None:
  """Removes the steps that rotation moved out of `{workdir}/checkpoints` (process 0, which
  is the one orbax lets rotate). Call only when no save is in flight: a rotation renaming
  into the folder while it is removed would fail."""
  rotated_out = epath.Path(directory) / ROTATED_OUT
  if jax.process_index() == 0 and rotated_out.exists():
    try:
      rotated_out.rmtree(missing_ok=True)
    except OSError as e:   # e.g. EBUSY: a file held open on NFS. Out of the listing already,
      # so nothing reads it: stopping the run (this runs before each save) would blame a
      # save that never started.
      logging.warning('Could not remove %s (%s); the next save tries again, or remove it by '
                      'hand: it holds only rotated-out checkpoints.', rotated_out, e)


class KeepNewestGood:
  """An orbax preservation policy: rotation (keep_last) never deletes the newest checkpoint
  known to be good, the one a divergence's error points the rerun to.

  A checkpoint is good once the step after it was healthy (bert_sym.loop.StepHealth), so
  the newest one is not known to be good when the next save rotates. With keep_last=1, or
  a loss-spike streak longer than keep_last saves, orbax alone would keep only checkpoints
  that a divergence then sets aside, and the rerun would start from step 0. The training
  loop sets `good_below`: checkpoints at steps below what it returns are good (None: no
  judgement yet, nothing extra kept). A healthy run with keep_last >= 2 keeps no more than
  before; keep_last=1 keeps a second checkpoint until the step after the newest is judged.
  """

  def __init__(self):
    self.good_below: Callable[[], int | None] = lambda: None

  def should_preserve(self, checkpoints, *, context) -> list[bool]:
    del context
    bound = self.good_below()
    newest_good = max((c.step for c in checkpoints if bound is not None and c.step < bound),
                      default=None)
    return [c.step == newest_good for c in checkpoints]

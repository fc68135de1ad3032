"""Checkpoints: an orbax `CheckpointManager` under `{workdir}/checkpoints`, plus config.json.

Layout of one step directory `{workdir}/checkpoints/{step}/` (plain orbax, no project code
needed to read it; see `load_pretrained` and the README):

  state/       StandardSave of {'params', 'opt_state', 'step', 'rng'}  (rng = raw key data)
  data_iter/   JsonSave of {'process_count': N, 'states': [iterator.get_state() per process],
               'meter': the run's health and unlogged steps (bert_sym.pretrain_loop),
               'lineage': which start of the trainer wrote it and each earlier step}

How orbax marks a step complete depends on the filesystem:

  local / POSIX   the step is written into `{step}.orbax-checkpoint-tmp-<ts>/` and renamed
                  to `{step}/` once every item is complete;
  gs://           there is no atomic directory rename, so orbax writes straight into
                  `{step}/` and drops a `commit_success.txt` file in it when complete.

So on GCS an unfinished step *does* look like `checkpoints/{step}/state/`. Every reader
must therefore go through `finished_steps` (orbax's own finalization check), never a plain
directory listing. Unfinished steps are ignored, and the trainer's manager cleans up
local temporary directories at the next start.

The package in the order a run meets it: `core` (names, errors, config.json, the manager,
finished steps), `rotation` (which old steps go, and how), `locking` (one trainer per
workdir), `saving`, `restoring` (the trainer's restore rules), `pretrained` (GLUE's and
export's reads, by the same rules). Everything public is re-exported here: callers write
`checkpoint.save(...)`.
"""

from bert_sym.checkpoint.core import (  # noqa: F401
    STATE, DATA_ITER, CONFIG_FILE, IncompatibleCheckpoint, DamagedCheckpoint,
    CheckpointReadError, CheckpointSaveError, write_config, read_config, flat_config,
    config_differences, config_hint, absolute, checkpoint_dir, make_manager,
    allgather_json, key_path_str, describe_error, is_closed_loop_error, is_step_dir,
    checkpoints_root, finished_steps, written_at, read_json_item, lineage_of, run_id_of,
    extend_lineage, written_by, workdir_misplaced, data_config_hint,
    workdir_blocked, workdir_problem
)
from bert_sym.checkpoint.rotation import (  # noqa: F401
    KeepNewestGood, ROTATED_OUT, remove_rotated_out
)
from bert_sym.checkpoint.locking import (  # noqa: F401
    LOCK_FILE, GLUE_LOCK_FILE, WorkdirBusy, HostsDisagree, workdir_lock, check_same_config_on_every_host,
    inputs_checked_on_every_host, checked_on_every_host, inputs_read_alike_on_every_host
)
from bert_sym.checkpoint.saving import (  # noqa: F401
    save, check_saves, finish_saves, remove_unfinished_steps
)
from bert_sym.checkpoint.restoring import (  # noqa: F401
    DAMAGED_DIR, DIVERGED_SUFFIX, STARTED_OVER_SUFFIX, READ_ATTEMPTS, BACKOFF_SECONDS,
    failure_kind, read_state_metadata, check_compatible, restore,
    set_aside_diverged, damaged_steps_found, NothingRestored, restore_latest,
    check_same_prng_impl
)
from bert_sym.checkpoint.echoes import quiet_orbax_echoes  # noqa: F401
from bert_sym.checkpoint.pretrained import (  # noqa: F401
    candidate_step_dirs, resolve_step_dir, load_params, load_pretrained, load_pretrained_step,
    check_trained_vocab, check_encoder,
    with_pretrained_encoder
)

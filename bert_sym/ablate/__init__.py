r"""Ablation runner: one pre-training run per (attention variant, seed), then one report.

  python -m bert_sym.ablate --config=configs/tiny.py --variants=standard,symmetric,pairwise \
      --seeds=1,2,3 --workdir=runs/abl [--config.total_steps=600 ...]

  # Also fine-tune every final checkpoint on GLUE (bert_sym.glue, one subprocess per run):
  python -m bert_sym.ablate ... --glue_dir=/path/to/glue_data --glue_tasks=rte,mrpc \
      --glue_seeds=1 --glue_args='--config.epochs=1 --config.max_seq_len=64'

  # Only (re)build the report from the runs already in the workdir (trains nothing):
  python -m bert_sym.ablate ... --summarize_only

Every run is the real trainer, `python -m bert_sym.train`, in `{workdir}/{variant}/seed{S}`
with `--config.model.attention=V --config.seed=S` and every other `--config.*` flag passed
through unchanged, so a grid started by hand with that layout is picked up as is. A run is
finished when it has a config.json and a finalized checkpoint at the requested
`config.total_steps`; finished runs are skipped, unfinished ones resumed (the trainer
resumes from its latest checkpoint). Exit code 42 from the trainer (preempted) reruns it;
any other failure stops the grid with the run's name and log. SIGTERM to the runner is
passed to the running trainer, which saves; the runner then exits with code 42 too. On
Ctrl-C the trainer saves and exits with 130, and so does the runner.

The runner only starts trainers, which use every local accelerator, so the same command
runs on a laptop, a GPU machine or a single-host TPU VM (a gs:// --workdir works; the logs
then stay in ./ablate_logs). On a multi-host slice every worker must run it at once, as
launch/tpu_vm.sh does for the trainer; that path is untested. The outputs (summary.json,
summary.md, plots) are listed in the README and written by `bert_sym.ablate.report`;
the statistics are defined in `bert_sym.ablate.stats`.
"""

from bert_sym.ablate.report import (AblationError, REFERENCE_VARIANT, SUMMARY_JSON,
                                    SUMMARY_MD, summarize)
from bert_sym.ablate.runs import config_differences, load_run, run_dir, run_status
from bert_sym.ablate.runner import glue_run, parse_list, resolve_config, run, train_run

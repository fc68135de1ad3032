"""GLUE fine-tuning and scoring of the trainer's checkpoints (`python -m bert_sym.glue`).

  data.py      task specs, readers (TFDS glue/* or a local GLUE copy), packing
  metrics.py   the GLUE metrics and the paper's aggregates
  finetune.py  one task's seeds on the shared core (steps, loop): vmapped seeds, resume
  suite.py     tasks x seeds, reuse of finished runs, the sweep over checkpoints
  report.py    glue_results.{json,md}, predictions TSVs, glue_vs_step.{json,md,png}
  __main__.py  the command line
"""

from bert_sym.glue.suite import run_glue, run_sweep  # noqa: F401

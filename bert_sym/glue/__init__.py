"""GLUE fine-tuning and scoring of the trainer's checkpoints: `python -m bert_sym.glue`
(__main__.py). data.py reads and packs the tasks, metrics.py scores them, finetune.py
trains one task's seeds on the shared core (bert_sym.steps, bert_sym.loop), suite.py runs
tasks x seeds and the sweep, report.py writes the tables, predictions and plot.
"""

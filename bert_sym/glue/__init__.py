"""GLUE fine-tuning and scoring of the trainer's checkpoints: `python -m bert_sym.glue`
(one module per job: README.md, section Layout)."""

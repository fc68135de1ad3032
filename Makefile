# Two entry points, each creating .venv on first use:
#   make demo   pre-train the tiny pairwise BERT on the embedded Wikipedia corpus (CPU, minutes)
#   make test   the test suite (what CI runs)
# Then, on the demo's checkpoint:
#   make export       a standard Hugging Face BERT in runs/tiny_demo_hf
#   make glue-local   GLUE fine-tuning from a local GLUE copy (GLUE_DIR), short recipe
# Everything else: `source .venv/bin/activate`, then `python -m bert_sym.<train|glue|export>`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
WORKDIR ?= runs/tiny_demo
GLUE_DIR ?= ../shared/data/glue
ARGS ?=
# pytest-xdist workers: most tests wait on one single-threaded XLA compile or a subprocess,
# so two workers halve the suite on 2 cores (TEST_WORKERS=0 runs it in one process).
TEST_WORKERS ?= 2

.PHONY: demo test export glue-local dry-run benchmarks clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.runtime-installed: requirements.txt | $(BIN)/python
	$(BIN)/pip install -q -r requirements.txt
	touch $@

$(VENV)/.test-installed: requirements-test.txt requirements-tpu.txt $(VENV)/.runtime-installed
	$(BIN)/pip install -q -r requirements-test.txt -r requirements-tpu.txt
	touch $@

demo: $(VENV)/.runtime-installed
	$(BIN)/python -m bert_sym.train --config=configs/tiny.py --workdir=$(WORKDIR) $(ARGS)

export: $(VENV)/.runtime-installed
	$(BIN)/python -m bert_sym.export --checkpoint=$(WORKDIR) --out_dir=$(WORKDIR)_hf $(ARGS)

glue-local: $(VENV)/.runtime-installed
	$(BIN)/python -m bert_sym.glue --checkpoint=$(WORKDIR) --output_dir=$(WORKDIR)_glue \
	    --glue_dir=$(GLUE_DIR) --tasks=rte,mrpc --seeds=1 --config=configs/glue.py:runlocal \
	    --config.max_seq_len=64 $(ARGS)

dry-run: $(VENV)/.runtime-installed
	$(BIN)/python -m bert_sym.train --config=configs/sym_base.py --dry_run

test: $(VENV)/.test-installed
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadgroup tests $(ARGS)

benchmarks: $(VENV)/.test-installed
	$(BIN)/python benchmarks/attention_variants.py --size=small
	$(BIN)/python benchmarks/data_pipeline.py

clean:
	rm -rf $(VENV) runs .pytest_cache

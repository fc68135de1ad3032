# Two entry points, each creating .venv on first use:
#   make demo   pre-train the tiny pairwise BERT on the embedded Wikipedia corpus (CPU, minutes)
#   make test   the test suite (what CI runs)
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
WORKDIR ?= runs/tiny_demo
ARGS ?=

.PHONY: demo test dry-run benchmarks clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.runtime-installed: requirements.txt | $(BIN)/python
	$(BIN)/pip install -q -r requirements.txt
	touch $@

$(VENV)/.test-installed: requirements-test.txt $(VENV)/.runtime-installed
	$(BIN)/pip install -q -r requirements-test.txt
	touch $@

demo: $(VENV)/.runtime-installed
	$(BIN)/python -m bert_sym.train --config=configs/tiny.py --workdir=$(WORKDIR) $(ARGS)

dry-run: $(VENV)/.runtime-installed
	$(BIN)/python -m bert_sym.train --config=configs/sym_base.py --dry_run

test: $(VENV)/.test-installed
	$(BIN)/python -m pytest -q tests $(ARGS)

benchmarks: $(VENV)/.test-installed
	$(BIN)/python benchmarks/attention_variants.py --size=small
	$(BIN)/python benchmarks/data_pipeline.py

clean:
	rm -rf $(VENV) runs .pytest_cache

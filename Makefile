# Two entry points, each creating .venv on first use:
#   make demo   pre-train the tiny pairwise BERT on the embedded Wikipedia corpus (CPU, minutes)
#   make test   the test suite (what CI runs); skipped tests are listed with their reasons
# Then, on the demo's checkpoint:
#   make export       a standard Hugging Face BERT in runs/tiny_demo_hf
#   make glue-local   GLUE fine-tuning from a local GLUE copy (GLUE_DIR=...), short recipe
#   make benchmarks   CPU benchmarks into BENCH_OUT (RECORD=1: into the committed record instead)
# Everything else: `source .venv/bin/activate`, then `python -m bert_sym.<train|glue|hf_export>`
# from any directory (bert_sym is installed into the venv in editable mode).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
WORKDIR ?= runs/tiny_demo
GLUE_DIR ?=
ARGS ?=
BENCH_OUT ?= runs/benchmarks
RECORD ?= 0
# pytest-xdist workers: most tests wait on one single-threaded XLA compile or on a
# subprocess (whose start-up, sleeps and gloo handshakes leave a core idle), so on 2 cores a
# third worker fills those gaps: 990 s with 2 workers, 899 s with 3 (benchmarks/RESULTS.md,
# "Test suite wall time"). TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= 3

.PHONY: demo test export glue-local dry-run benchmarks clean gpu-compiler

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.runtime-installed: requirements.txt constraints.txt pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -r requirements.txt -c constraints.txt
	$(BIN)/pip install -q --no-deps -e .
	touch $@

# torch from PyTorch's CPU index where it can be reached (--retries 0: at once where it
# cannot; only torch is looked up there): PyPI's torch is the CUDA build, GBs of CUDA
# libraries and triton, whose C extension crashes a process that loaded TensorFlow's first.
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
$(VENV)/.test-installed: requirements-test.txt requirements-tpu.txt constraints.txt $(VENV)/.gpu-compiler-installed
	$(BIN)/pip install -q --no-deps --retries 0 --extra-index-url $(TORCH_CPU_INDEX) \
	    "$$(grep -E '^torch==' requirements-test.txt | cut -d' ' -f1)"
	$(BIN)/pip install -q -r requirements-test.txt -r requirements-tpu.txt -c constraints.txt
	touch $@

# The GPU compiler for `bert_sym.aot --topology=h100` on a machine without a GPU, kept out
# of the venv's packages (requirements-gpu-compiler.txt says why): PYTHONPATH=$(VENV)/gpu-compiler.
gpu-compiler: $(VENV)/.gpu-compiler-installed
$(VENV)/.gpu-compiler-installed: requirements-gpu-compiler.txt $(VENV)/.runtime-installed
	rm -rf $(VENV)/gpu-compiler
	$(BIN)/pip install -q --no-deps --target $(VENV)/gpu-compiler -r requirements-gpu-compiler.txt
	touch $@

demo: $(VENV)/.runtime-installed
	$(BIN)/python -m bert_sym.train --config=configs/tiny.py --workdir=$(WORKDIR) $(ARGS)

export: $(VENV)/.runtime-installed
	$(BIN)/python -m bert_sym.hf_export --checkpoint=$(WORKDIR) --out_dir=$(WORKDIR)_hf $(ARGS)

glue-local: $(VENV)/.runtime-installed
	@test -n "$(GLUE_DIR)" || { echo 'make glue-local: set GLUE_DIR to a GLUE copy in the download-script layout (CoLA/, MRPC/, RTE/, ...), e.g. make glue-local GLUE_DIR=/data/glue_data'; exit 2; }
	$(BIN)/python -m bert_sym.glue --checkpoint=$(WORKDIR) --output_dir=$(WORKDIR)_glue \
	    --glue_dir=$(GLUE_DIR) --tasks=rte,mrpc --seeds=1 --config=configs/glue.py:runlocal \
	    --config.max_seq_len=64 $(ARGS)

dry-run: $(VENV)/.runtime-installed
	$(BIN)/python -m bert_sym.train --config=configs/sym_base.py --dry_run

test: $(VENV)/.test-installed
	$(BIN)/python -m pytest -q -rs --durations=15 -n $(TEST_WORKERS) --dist loadgroup tests $(ARGS)

# Results go to BENCH_OUT; the committed record (benchmarks/results/*.json and a section of
# benchmarks/RESULTS.md) changes only with RECORD=1.
benchmarks: $(VENV)/.test-installed
	$(BIN)/python benchmarks/attention_variants.py --size=small --out_dir=$(BENCH_OUT) \
	    $(if $(filter 1,$(RECORD)),--record)
	$(BIN)/python benchmarks/data_pipeline.py --out_dir=$(BENCH_OUT) \
	    $(if $(filter 1,$(RECORD)),--record)

clean:
	rm -rf $(VENV) runs .pytest_cache

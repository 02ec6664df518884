# Two commands for a new machine:
#   make demo   # trains a small GPT with MTP (D=1) on CPU or GPU, about a minute on 2 cores
#   make test   # the whole test suite (CPU; GPU tests skip without CUDA)
# Both create .venv with Python 3.11 and the pinned dependencies on first use.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat setup.py | cksum | cut -d' ' -f1)

.PHONY: venv demo test lint clean

venv: $(STAMP)

$(STAMP): setup.py
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else "make: needs Python 3.11 (megatron-core 0.16.1); set PYTHON=/path/to/python3.11")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first and pinned: the CPU wheel here, never a newer CUDA build pulled in by a range.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	rm -f $(VENV)/.installed-*
	touch $@

demo: venv
	$(BIN)/torchrun --nproc-per-node 1 launch/pretrain_gpt_mtp.py --mtp-num-layers 1

test: venv
	$(BIN)/python -m pytest -q tests

lint: venv
	$(BIN)/ruff check mtp_megatron launch tests

clean:
	rm -rf $(VENV) runs

# Baseline vs MTP, like for like (docs/results.md); ~20-30 min on 2 CPU cores, resumable.
#   make compare COMPARE_ARGS="--seeds 3 --out-dir runs/compare3"
.PHONY: compare
compare: venv
	$(BIN)/python -m mtp_megatron.experiments.compare $(COMPARE_ARGS)

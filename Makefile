# Two commands for a new machine:
#   make demo        # trains a small GPT with MTP (D=1) on CPU or GPU, about two minutes on 2 cores
#   make test        # the whole test suite (CPU; GPU tests skip without CUDA)
# and, while developing:
#   make test-fast   # pure Python and single-process tests, under 2 minutes on 2 cores
#   make lint
# All create .venv with Python 3.11 and the versions pinned in constraints.txt on first use.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat setup.py constraints.txt | cksum | cut -d' ' -f1)
PYTEST_ARGS ?=
FAST := not multirank and not functional and not gpu

.PHONY: venv demo test test-fast lint clean

venv: $(STAMP)

$(STAMP): setup.py constraints.txt
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else "make: needs Python 3.11 (the version CI tests; constraints.txt is resolved for it); set PYTHON=/path/to/python3.11")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first and pinned: the CPU wheel here, never a newer CUDA build pulled in by a range.
	$(BIN)/python -m pip install -q -c constraints.txt torch
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	rm -f $(VENV)/.installed-*
	touch $@

demo: venv
	$(BIN)/torchrun --nproc-per-node 1 launch/pretrain_gpt_mtp.py --mtp-num-layers 1

test: venv
	$(BIN)/python -m pytest -q tests $(PYTEST_ARGS)

test-fast: venv
	$(BIN)/python -m pytest -q tests -m "$(FAST)" $(PYTEST_ARGS)

lint: venv
	$(BIN)/ruff check mtp_megatron launch tests

clean:
	rm -rf $(VENV) runs

# Baseline vs MTP, like for like (docs/results.md); ~20-30 min on 2 CPU cores, resumable.
#   make compare COMPARE_ARGS="--seeds 3 --out-dir runs/compare3"
.PHONY: compare
compare: venv
	$(BIN)/python -m mtp_megatron.experiments.compare $(COMPARE_ARGS)

# GPU validation, never part of `make test`: GPU-marked tests, every examples/*.yaml
# trained a few iterations, bf16 vs FP8 loss curves (MTP D=1/D=2), TP2/PP2 with >= 2 GPUs,
# the throughput benchmark; writes runs/gpu-check/report.md. On a GPU node (any Python
# with CUDA torch: MTP_PYTHON=...); in the NGC image: scripts/ngc_tests.sh docker gpu-check
.PHONY: gpu-check
gpu-check:
	scripts/gpu_check.sh $(GPU_CHECK_ARGS)

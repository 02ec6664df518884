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

# GPU validation, never part of `make test`: GPU-marked tests, every examples/*.yaml
# trained a few iterations, bf16 vs FP8 loss curves (MTP D=1/D=2), TP2/PP2 with >= 2 GPUs,
# the throughput benchmark; writes runs/gpu-check/report.md. On a GPU node (any Python
# with CUDA torch: MTP_PYTHON=...); in the NGC image: scripts/ngc_tests.sh docker gpu-check
.PHONY: gpu-check
gpu-check:
	scripts/gpu_check.sh $(GPU_CHECK_ARGS)

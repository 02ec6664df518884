# Two commands for a new machine:
#   make demo        # trains a small GPT with MTP (D=1) on CPU or GPU, about two minutes on 2 cores
#   make test        # the whole test suite (CPU; GPU tests skip without CUDA)
# and, while developing:
#   make test-fast   # pure Python and single-process tests, a few minutes on 2 cores
#   make test-compat # the tested floor: megatron-core 0.16.1 on Python 3.11 (a subset, see below)
#   make lint
# The main stack is Python 3.12 + megatron-core 0.19.2 + torch 2.13.0 (constraints.txt), in
# .venv; the floor is Python 3.11 + megatron-core 0.16.1 (constraints-compat.txt), in
# .venv-compat. Both are created on first use. The interpreters are found by
# scripts/find_python.sh (a pyenv shim that refuses to run is skipped); choose others with
#   make PYTHON=/path/to/python3.12 test      make COMPAT_PYTHON=/path/to/python3.11 test-compat

PYTHON ?= $(shell scripts/find_python.sh 3.12)
COMPAT_PYTHON ?= $(shell scripts/find_python.sh 3.11)
VENV := .venv
BIN := $(VENV)/bin
COMPAT_VENV := .venv-compat
COMPAT_BIN := $(COMPAT_VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat setup.py constraints.txt | cksum | cut -d' ' -f1)
COMPAT_STAMP := $(COMPAT_VENV)/.installed-$(shell cat setup.py constraints-compat.txt | cksum | cut -d' ' -f1)
PYTEST_ARGS ?=
FAST := not multirank and not functional and not gpu and not slurm
# The floor's tier: the fast tier plus the tests marked `compat` (the multirank layout
# equivalence, the bf16 / distributed-optimizer resume matrix, the mission command, and
# the checkpoints that cross the upgrade).
COMPAT := ($(FAST)) or (compat and not gpu)

.PHONY: venv venv-compat demo test test-fast test-compat lint clean

venv: $(STAMP)
venv-compat: $(COMPAT_STAMP)

# $(1): interpreter, $(2): venv, $(3): Python X.Y wanted, $(4): constraints file
define make_venv
	@test -n "$(1)" || { echo "make: no Python $(3) (see scripts/find_python.sh $(3))"; exit 2; }
	@$(1) -c 'import sys; sys.exit(0 if "%d.%d" % sys.version_info[:2] == "$(3)" else "make: $(1) is not Python $(3), which $(4) is resolved for")'
	$(1) -m venv $(2)
	$(2)/bin/python -m pip install -q --upgrade pip
	# torch first and pinned: never a newer build pulled in by a range.
	$(2)/bin/python -m pip install -q -c $(4) torch
	$(2)/bin/python -m pip install -q -c $(4) -e '.[dev]'
	rm -f $(2)/.installed-*
endef

$(STAMP): setup.py constraints.txt
	$(call make_venv,$(PYTHON),$(VENV),3.12,constraints.txt)
	touch $@

$(COMPAT_STAMP): setup.py constraints-compat.txt
	$(call make_venv,$(COMPAT_PYTHON),$(COMPAT_VENV),3.11,constraints-compat.txt)
	touch $@

demo: venv
	$(BIN)/torchrun --nproc-per-node 1 launch/pretrain_gpt_mtp.py --mtp-num-layers 1

test: venv
	$(BIN)/python -m pytest -q tests $(PYTEST_ARGS)

test-fast: venv
	$(BIN)/python -m pytest -q tests -m "$(FAST)" $(PYTEST_ARGS)

test-compat: venv-compat
	$(COMPAT_BIN)/python -m pytest -q tests -m "$(COMPAT)" $(PYTEST_ARGS)

lint: venv
	$(BIN)/ruff check mtp_megatron launch tests scripts benchmarks

clean:
	rm -rf $(VENV) $(COMPAT_VENV) runs

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

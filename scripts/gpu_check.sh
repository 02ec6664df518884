#!/bin/bash
# GPU validation in one command: GPU-marked tests, every examples/*.yaml trained for a few
# iterations, bf16 vs FP8 loss curves (MTP D=1/D=2), TP2/PP2 with >= 2 GPUs, the
# throughput benchmark. Writes runs/gpu-check/report.md (see scripts/gpu_check.py).
#
#   make gpu-check                                   # this machine (a GPU node)
#   scripts/gpu_check.sh --only tests,fp8 --steps 50 # a subset
#   scripts/ngc_tests.sh docker gpu-check            # inside the NGC container
#   salloc -N1 --gpus-per-node=8 scripts/ngc_tests.sh srun gpu-check   # SLURM + pyxis
#
# Environment: MTP_PYTHON (default: .venv/bin/python if present, else python3).
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO"
if [[ -z "${MTP_PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then MTP_PYTHON=.venv/bin/python; else MTP_PYTHON=python3; fi
fi
if ! "$MTP_PYTHON" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_check.sh: no CUDA GPU visible to $MTP_PYTHON; run it on a GPU node" >&2
    exit 2
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
exec "$MTP_PYTHON" scripts/gpu_check.py "$@"

#!/bin/bash
# Run the test suite inside an NGC PyTorch container on a GPU machine, GPU tests
# included (they skip only where CUDA is missing). From the repository root:
#
#   scripts/ngc_tests.sh docker [pytest args]     # a workstation/node with Docker + GPUs
#   scripts/ngc_tests.sh srun [pytest args]       # a SLURM cluster with pyxis/enroot
#   salloc -N1 --gpus-per-node=8 scripts/ngc_tests.sh srun -m gpu   # GPU tests only
#   scripts/ngc_tests.sh docker gpu-check [--only tests,fp8]        # make gpu-check inside
#
# Environment: MTP_IMAGE (default below; docker spells it nvcr.io/..., pyxis
# nvcr.io#...), MEGATRON_CORE_PIN (default megatron-core==0.19.2, the main stack),
# SRUN_ARGS (extra srun flags: --partition, --account, --time). The image is the one
# megatron-core 0.19's own CI builds on (Python 3.12; see docs/gpu.md "Versions").
set -euo pipefail

MODE=${1:-}
shift || true
REPO=$(cd "$(dirname "$0")/.." && pwd)
IMAGE=${MTP_IMAGE:-nvcr.io/nvidia/pytorch:26.06-py3}
PIN=${MEGATRON_CORE_PIN:-megatron-core==0.19.2}
# megatron-core without deps keeps the image's torch; our package in place, with pytest.
# `gpu-check` as the first argument runs scripts/gpu_check.sh (make gpu-check) instead.
if [[ "${1:-}" == gpu-check ]]; then
    shift
    RUN="MTP_PYTHON=python scripts/gpu_check.sh $(printf '%q ' "$@")"
else
    RUN="python -m pytest -v -rs $(printf '%q ' "$@")"
fi
INSIDE="pip install --quiet --no-deps '$PIN' && pip install --quiet --no-deps -e . \
&& pip install --quiet pytest pyyaml psutil && $RUN"

case $MODE in
    docker)
        exec docker run --rm --gpus all --ipc=host --ulimit memlock=-1 --ulimit stack=67108864 \
            -v "$REPO:/workspace/mtp_megatron" -w /workspace/mtp_megatron \
            "$IMAGE" bash -c "$INSIDE" ;;
    srun)
        read -r -a extra <<< "${SRUN_ARGS:-}"
        exec srun --nodes=1 --ntasks=1 --gpus-per-node="${GPUS:-8}" "${extra[@]}" \
            --container-image="${IMAGE/\//#}" \
            --container-mounts="$REPO:/workspace/mtp_megatron" \
            --container-workdir=/workspace/mtp_megatron \
            bash -c "$INSIDE" ;;
    *)
        echo "usage: scripts/ngc_tests.sh docker|srun [pytest args]" >&2
        exit 2 ;;
esac

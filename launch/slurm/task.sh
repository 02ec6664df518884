#!/bin/bash
# One SLURM task (inside the container): the environment Megatron needs, then the
# launcher, through torchrun (MTP_LAUNCHER=torchrun, one task per node) or directly
# (MTP_LAUNCHER=srun, one task per rank). Arguments are the launcher's flags.

# The job's exit signal (SIGUSR1, see common.sh) goes to every process of the step; only
# the launcher acts on it, installing its handler early. Until then, and in this shell and
# torchrun, it is ignored (the disposition survives exec), then the batch script learns
# that this task is past this point, so a forwarded signal cannot kill it while it starts.
trap '' USR1
if [[ -n ${MTP_TASKS_STARTED:-} ]]; then
    : > "$MTP_TASKS_STARTED/${SLURM_PROCID:-0}"
fi
set -euo pipefail
cd "$MTP_REPO"
PY=${MTP_PYTHON:-python}

# Tensor parallel size from the resolved config (1 if it cannot be read: the launcher
# reports config errors itself).
tp=$("$PY" - "$@" <<'PY' 2>/dev/null || echo 1
import sys
from mtp_megatron.config import load_config
print(load_config(sys.argv[1:])[0].parallel.tensor_model_parallel_size)
PY
)
cc=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1 || true)
major=${cc%%.*}
# Megatron's TP communication overlap needs kernels queued in order on pre-Blackwell GPUs.
if (( tp > 1 )) && [[ -z $major || $major -lt 10 ]]; then
    export CUDA_DEVICE_MAX_CONNECTIONS=1
fi

case ${MTP_LAUNCHER:-srun} in
    torchrun)
        exec "$PY" -m torch.distributed.run --nnodes="$MTP_NNODES" \
            --nproc-per-node="$MTP_NPROC_PER_NODE" --rdzv-backend=c10d \
            --rdzv-endpoint="$MTP_RDZV_ENDPOINT" --rdzv-id="$SLURM_JOB_ID" \
            launch/pretrain_gpt_mtp.py "$@" ;;
    srun)
        exec "$PY" launch/pretrain_gpt_mtp.py "$@" ;;
    *)
        echo "task.sh: MTP_LAUNCHER=$MTP_LAUNCHER is not allowed (torchrun or srun)" >&2
        exit 2 ;;
esac

# shellcheck shell=bash
# Shared by torchrun.sbatch and srun.sbatch: sourced in the batch script, never run alone.
#
# Parameters are environment variables (sbatch hands the submitting shell's environment
# to the job); submit.sh sets them from its flags:
#   MTP_REPO           this repository on a filesystem every node sees (default: the
#                      directory sbatch was called from)
#   MTP_IMAGE          container image for pyxis/enroot (default: NGC PyTorch, below);
#                      "none" runs on the host's Python environment
#   MTP_MOUNTS         extra --container-mounts, comma separated (MTP_REPO and MTP_RUNS
#                      are always mounted at the same paths)
#   MTP_CONFIG         YAML config for --config (optional)
#   MTP_EXTRA_ARGS     more launcher flags, e.g. "--train-iters 5000 --bf16"
#   MTP_RUNS           where runs go (default: $MTP_REPO/runs/slurm)
#   MTP_GPUS_PER_NODE  default: from --gpus-per-node, else 8
#   MTP_SETUP          1 (default): pip install megatron-core into the job's container on
#                      each node first; 0 when the image already has it
#   MTP_REQUEUE        1 (default): requeue the job after it saved on the time-limit signal
#
# Layout: $MTP_RUNS/$SLURM_JOB_NAME/checkpoints is shared by every job of the same name
# (requeued or chained with --dependency=singleton), so the next job resumes from it;
# logs, metrics and the resolved config go to $MTP_RUNS/$SLURM_JOB_NAME/<job id>-r<restart>.

set -euo pipefail

# NGC PyTorch: CUDA, NCCL, Transformer Engine and NVIDIA apex. pyxis spells the
# registry separator '#'.
MTP_IMAGE=${MTP_IMAGE:-nvcr.io#nvidia/pytorch:25.11-py3}
MTP_RUNS=${MTP_RUNS:-$MTP_REPO/runs/slurm}
MTP_SETUP=${MTP_SETUP:-1}
MTP_REQUEUE=${MTP_REQUEUE:-1}
MEGATRON_CORE_PIN=${MEGATRON_CORE_PIN:-megatron-core==0.16.1}

RUN_DIR=$MTP_RUNS/$SLURM_JOB_NAME
CKPT=$RUN_DIR/checkpoints
JOB_DIR=$RUN_DIR/$SLURM_JOB_ID-r${SLURM_RESTART_COUNT:-0}
mkdir -p "$CKPT" "$JOB_DIR"

gpus=${SLURM_GPUS_PER_NODE:-8}
# shellcheck disable=SC2034  # GPUS_PER_NODE and HEAD_NODE are used by the sbatch scripts
GPUS_PER_NODE=${MTP_GPUS_PER_NODE:-${gpus##*:}}  # "h100:8" -> 8
# shellcheck disable=SC2034
HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)

# The package runs from the shared checkout; no per-node install of our code.
export MTP_REPO
export PYTHONPATH=$MTP_REPO${PYTHONPATH:+:$PYTHONPATH}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
# Common NCCL settings; uncomment what your fabric needs:
# export NCCL_SOCKET_IFNAME=ib0        # interface for NCCL's bootstrap sockets
# export NCCL_IB_HCA=mlx5_0,mlx5_1     # InfiniBand HCAs to use
# export NCCL_IB_TIMEOUT=22            # longer IB timeouts on large jobs
# export NCCL_IB_QPS_PER_CONNECTION=2
# export NCCL_CROSS_NIC=1
# export NCCL_NVLS_ENABLE=0            # if NVLink SHARP misbehaves
# export NCCL_P2P_NET_CHUNKSIZE=524288
# CUDA_DEVICE_MAX_CONNECTIONS=1 (TP > 1 on pre-Blackwell GPUs) is set per task by task.sh.

read -r -a EXTRA_ARGS <<< "${MTP_EXTRA_ARGS:-}"
TRAIN_ARGS=()
if [[ -n ${MTP_CONFIG:-} ]]; then
    TRAIN_ARGS+=(--config "$MTP_CONFIG")
fi
TRAIN_ARGS+=("${EXTRA_ARGS[@]}" --exit-signal-handler --save "$CKPT" --output-dir "$JOB_DIR")
# Resume when an earlier job of this name saved (--load on an empty directory is an error;
# --save alone would also auto-resume, this makes it visible in the command line).
if [[ -f $CKPT/latest_checkpointed_iteration.txt ]]; then
    TRAIN_ARGS+=(--load "$CKPT")
    echo "resuming from $CKPT (iteration $(cat "$CKPT/latest_checkpointed_iteration.txt"))"
fi

CONTAINER=()
if [[ $MTP_IMAGE != none ]]; then
    mounts=$MTP_REPO:$MTP_REPO,$MTP_RUNS:$MTP_RUNS${MTP_MOUNTS:+,$MTP_MOUNTS}
    # A named container lives for the job: the setup step's install is seen by training.
    CONTAINER=(--container-image="$MTP_IMAGE" --container-name="mtp-$SLURM_JOB_ID"
               --container-mounts="$mounts" --container-workdir="$MTP_REPO")
fi

# Install megatron-core once per node into the job's container (our code comes from
# PYTHONPATH). --no-deps keeps the image's own torch.
setup_container() {
    if [[ $MTP_IMAGE == none || $MTP_SETUP == 0 ]]; then
        return
    fi
    srun --ntasks-per-node=1 "${CONTAINER[@]}" \
        pip install --quiet --no-deps "$MEGATRON_CORE_PIN"
}

# Run the training step in the background so the batch shell can catch the time-limit
# signal (#SBATCH --signal=B:TERM@120) and forward SIGTERM to srun, which passes it to
# every task: --exit-signal-handler saves a checkpoint and exits 0. The job then
# requeues itself and the next start resumes with --load. Whether the save happened is
# read from the launcher's $JOB_DIR/stopped.json ("saved": true), not only from the step's
# exit code: in torchrun mode torchrun is the process signalled and exits 1 although
# every worker saved and exited 0.
PREEMPTED=0
run_training_step() {
    srun "$@" &
    local pid=$!
    trap 'PREEMPTED=1; echo "$(date +%T) SIGTERM: asking the step to save and exit"; kill -TERM "$pid" 2>/dev/null || true' TERM
    while kill -0 "$pid" 2>/dev/null; do
        wait "$pid" || true  # returns early when the trap fires; loop until srun ends
    done
    local rc=0
    wait "$pid" || rc=$?
    trap - TERM
    echo "$(date +%T) training step exited with $rc"
    if [[ $PREEMPTED == 1 && $MTP_REQUEUE == 1 ]]; then
        if [[ $rc == 0 ]] || grep -qs '"saved": true' "$JOB_DIR/stopped.json"; then
            echo "saved before the time limit ($(cat "$JOB_DIR/stopped.json" 2>/dev/null ||
                echo "exit 0")): requeueing $SLURM_JOB_ID to resume from $CKPT"
            scontrol requeue "$SLURM_JOB_ID"
        else
            echo "not requeueing: the step failed after SIGTERM (exit $rc)"
        fi
    fi
    return "$rc"
}

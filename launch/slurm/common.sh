# shellcheck shell=bash
# Shared by torchrun.sbatch and srun.sbatch: sourced in the batch script, never run alone.
#
# Parameters are environment variables (sbatch hands the submitting shell's environment
# to the job); submit.sh sets them from its flags:
#   MTP_REPO           this repository on a filesystem every node sees (default: the
#                      directory sbatch was called from)
#   MTP_IMAGE          container image for pyxis/enroot (default: NGC PyTorch, below);
#                      "none" runs on the host's Python environment
#   MTP_PYTHON         the Python that runs the launcher (default: python on PATH)
#   MTP_MOUNTS         extra --container-mounts, comma separated (MTP_REPO and MTP_RUNS
#                      are always mounted at the same paths)
#   MTP_CONFIG         YAML config for --config (optional)
#   MTP_EXTRA_ARGS     more launcher flags, e.g. "--train-iters 5000 --bf16"
#   MTP_RUNS           where runs go (default: $MTP_REPO/runs/slurm)
#   MTP_RANKS_PER_NODE training processes per node (default: the GPUs per node from
#                      sbatch's --gpus-per-node, or 1 without GPUs: a CPU node runs one
#                      rank on gloo); MTP_GPUS_PER_NODE is the older name
#   MTP_SETUP          1 (default): pip install megatron-core into the job's container on
#                      each node first; 0 when the image already has it
#   MTP_REQUEUE        1 (default): requeue the job after it saved on the exit signal
#
# Layout: $MTP_RUNS/$SLURM_JOB_NAME/checkpoints is shared by every job of the same name
# (requeued or chained with --dependency=singleton), so the next job resumes from it;
# logs, metrics and the resolved config go to $MTP_RUNS/$SLURM_JOB_NAME/<job id>-r<restart>.
#
# Time limits and preemption: the job asks for SIGUSR1 in its batch shell before the time
# limit (#SBATCH --signal=B:USR1@120; `scancel --batch --signal=USR1 <job>` does the same
# by hand). The batch shell forwards it to every process of the training step, where only
# the launcher acts on it (--exit-signal-handler --exit-signal SIGUSR1): it finishes the
# iteration, saves, writes stopped.json and exits 0; the job then requeues itself and the
# next start resumes. Not SIGTERM: srun answers SIGTERM by cancelling the step (every task
# SIGKILLed), and torchrun answers it by stopping its workers and exiting 1.

set -euo pipefail

EXIT_SIGNAL=USR1
# Until the training step runs, remember the signal (its default action would end the
# job); run_training_step forwards it.
PREEMPTED=0
trap 'PREEMPTED=1; echo "$(date +%T) SIG$EXIT_SIGNAL: time limit or preemption ahead"' "$EXIT_SIGNAL"

# NGC PyTorch: CUDA, NCCL, Transformer Engine and NVIDIA apex. pyxis spells the
# registry separator '#'.
MTP_IMAGE=${MTP_IMAGE:-nvcr.io#nvidia/pytorch:26.06-py3}
MTP_RUNS=${MTP_RUNS:-$MTP_REPO/runs/slurm}
MTP_SETUP=${MTP_SETUP:-1}
MTP_REQUEUE=${MTP_REQUEUE:-1}
MEGATRON_CORE_PIN=${MEGATRON_CORE_PIN:-megatron-core==0.19.2}

RUN_DIR=$MTP_RUNS/$SLURM_JOB_NAME
CKPT=$RUN_DIR/checkpoints
JOB_DIR=$RUN_DIR/$SLURM_JOB_ID-r${SLURM_RESTART_COUNT:-0}
mkdir -p "$CKPT" "$JOB_DIR"

gpus=${SLURM_GPUS_PER_NODE:-0}
gpus=${gpus##*:}  # "h100:8" -> 8
if ! [[ $gpus =~ ^[0-9]+$ ]] || (( gpus == 0 )); then
    gpus=1  # a CPU node (no --gpus-per-node, or 0): one rank per node on gloo
fi
RANKS_PER_NODE=${MTP_RANKS_PER_NODE:-${MTP_GPUS_PER_NODE:-$gpus}}
if ! [[ $RANKS_PER_NODE =~ ^[1-9][0-9]*$ ]]; then
    echo "error: MTP_RANKS_PER_NODE=$RANKS_PER_NODE is not allowed. Allowed: an integer >= 1" \
         "(training processes per node)." >&2
    exit 2
fi
# shellcheck disable=SC2034  # HEAD_NODE is used by the sbatch scripts
HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)

# The package runs from the shared checkout; no per-node install of our code.
export MTP_REPO MTP_PYTHON=${MTP_PYTHON:-python}
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
TRAIN_ARGS+=("${EXTRA_ARGS[@]}" --exit-signal-handler --exit-signal "SIG$EXIT_SIGNAL"
             --save "$CKPT" --output-dir "$JOB_DIR")
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

# STEP_LAYOUT: the srun options of a step with $1 tasks per node, each with its share of
# the node's CPUs. The task count is explicit: srun would otherwise take the allocation's
# SLURM_NTASKS and silently start fewer tasks than asked.
step_layout() {
    local per_node=$1 cpus=${SLURM_CPUS_ON_NODE:-1}
    if (( cpus < per_node )); then
        echo "error: $per_node tasks per node but the job has $cpus CPUs per node: submit" \
             "with --ntasks-per-node=$per_node, or --exclusive (submit.sh does)." >&2
        exit 2
    fi
    # shellcheck disable=SC2034  # used by the sbatch scripts
    STEP_LAYOUT=(--nodes="$SLURM_NNODES" --ntasks="$((SLURM_NNODES * per_node))"
                 --ntasks-per-node="$per_node" --cpus-per-task="$((cpus / per_node))")
}

# Every task writes a marker once it ignores the exit signal (task.sh's first lines); the
# signal is forwarded only when all have, so it cannot kill a task that is starting.
TASKS_STARTED=$JOB_DIR/.tasks-started
export MTP_TASKS_STARTED=$TASKS_STARTED
all_tasks_started() {
    local n
    n=$(find "$TASKS_STARTED" -type f 2>/dev/null | wc -l)
    (( n >= $1 ))
}

# Run the training step (srun "$@") in the background so the batch shell can act on the
# exit signal: forward it to every process of the step (srun passes SIGUSR1 on; only the
# launcher acts on it) and again every few seconds until the step ends, because a process
# that has not installed its handler yet ignores it. Then requeue when the launcher stopped
# cleanly: its $JOB_DIR/stopped.json exists, and it says "saved": true or the step exited 0
# (a stop during start-up, before anything needed saving).
run_training_step() {
    local ntasks=$1
    shift
    if (( PREEMPTED )); then
        echo "$(date +%T) the exit signal came before training started: not starting it"
        requeue_job
        return 0
    fi
    rm -rf "$TASKS_STARTED" && mkdir -p "$TASKS_STARTED"
    srun "$@" &
    local pid=$! forwarded=-1000
    while kill -0 "$pid" 2>/dev/null; do
        if (( PREEMPTED && SECONDS - forwarded >= 5 )) && all_tasks_started "$ntasks"; then
            (( forwarded < 0 )) && echo "$(date +%T) asking the training step to save and exit"
            kill -"$EXIT_SIGNAL" "$pid" 2>/dev/null || true
            forwarded=$SECONDS
        fi
        sleep 1 & wait $! || true  # the trap interrupts the wait: forward at once
    done
    local rc=0
    wait "$pid" || rc=$?
    rm -rf "$TASKS_STARTED"
    echo "$(date +%T) training step exited with $rc"
    local record=$JOB_DIR/stopped.json
    if (( PREEMPTED )) && [[ -f $record ]] &&
            { (( rc == 0 )) || grep -qs '"saved": true' "$record"; }; then
        echo "stopped cleanly: $(cat "$record")"
        requeue_job
        return 0
    fi
    if (( rc != 0 )); then
        echo "error: the training step failed with exit $rc (a task died, was killed or lost" \
             "its node; see the error lines in $JOB_DIR/train.log). Not requeued. The last" \
             "committed checkpoint is iteration $(cat "$CKPT/latest_checkpointed_iteration.txt" \
             2>/dev/null || echo "none") in $CKPT: submit again with the same job name" \
             "($SLURM_JOB_NAME) to resume from it." >&2
    fi
    return "$rc"
}

requeue_job() {
    if [[ $MTP_REQUEUE != 1 ]]; then
        echo "MTP_REQUEUE=$MTP_REQUEUE: not requeueing; a job of the same name resumes from $CKPT"
        return
    fi
    echo "$(date +%T) requeueing $SLURM_JOB_ID to resume from $CKPT"
    scontrol requeue "$SLURM_JOB_ID"
}

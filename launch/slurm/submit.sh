#!/bin/bash
# Submit a training job (or a chain of jobs that resume one another) with named
# parameters; check its plan first with --plan-only. From the repository root:
#
#   launch/slurm/submit.sh --nodes 128 --gpus-per-node 8 --config my.yaml --plan-only
#   launch/slurm/submit.sh --mode srun --nodes 128 --gpus-per-node 8 --config my.yaml \
#       --image nvcr.io#nvidia/pytorch:25.11-py3 --mounts /data:/data --chain 4 \
#       -- --train-iters 100000 --bf16
#
# Flags after "--" go to the launcher. --chain K submits K jobs of one name with
# --dependency=singleton: each starts when the previous ends and resumes from the shared
# checkpoint directory (a job that already finished training exits at once).
set -euo pipefail

usage() {
    sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'
    echo "flags: --mode srun|torchrun  --nodes N  --gpus-per-node G  --image IMAGE|none"
    echo "       --mounts SRC:DST[,...]  --config FILE  --name NAME  --time D-HH:MM:SS"
    echo "       --partition P  --account A  --chain K  --runs DIR  --no-setup  --plan-only"
}

MODE=srun NODES=1 GPUS=8 NAME="" TIME="" PARTITION="" ACCOUNT="" CHAIN=1 PLAN_ONLY=0
REPO=$(cd "$(dirname "$0")/../.." && pwd)
while (( $# )); do
    case $1 in
        --mode) MODE=$2; shift 2 ;;
        --nodes) NODES=$2; shift 2 ;;
        --gpus-per-node) GPUS=$2; shift 2 ;;
        --image) export MTP_IMAGE=$2; shift 2 ;;
        --mounts) export MTP_MOUNTS=$2; shift 2 ;;
        --config) export MTP_CONFIG=$2; shift 2 ;;
        --name) NAME=$2; shift 2 ;;
        --time) TIME=$2; shift 2 ;;
        --partition) PARTITION=$2; shift 2 ;;
        --account) ACCOUNT=$2; shift 2 ;;
        --chain) CHAIN=$2; shift 2 ;;
        --runs) export MTP_RUNS=$2; shift 2 ;;
        --no-setup) export MTP_SETUP=0; shift ;;
        --plan-only) PLAN_ONLY=1; shift ;;
        -h|--help) usage; exit 0 ;;
        --) shift; break ;;
        *) echo "submit.sh: unknown flag $1 (see --help)" >&2; exit 2 ;;
    esac
done
for pair in "--nodes:$NODES" "--gpus-per-node:$GPUS" "--chain:$CHAIN"; do
    if ! [[ ${pair#*:} =~ ^[1-9][0-9]*$ ]]; then
        echo "submit.sh: ${pair%%:*}=${pair#*:} is not allowed. Allowed: an integer >= 1." >&2
        exit 2
    fi
done
case $MODE in
    srun) TASKS_PER_NODE=$GPUS ;;
    torchrun) TASKS_PER_NODE=1 ;;
    *) echo "submit.sh: --mode=$MODE is not allowed. Allowed: srun, torchrun." >&2; exit 2 ;;
esac
export MTP_REPO=$REPO MTP_EXTRA_ARGS="$*" MTP_GPUS_PER_NODE=$GPUS

if (( PLAN_ONLY )); then
    plan_args=()
    if [[ -n ${MTP_CONFIG:-} ]]; then
        plan_args+=(--config "$MTP_CONFIG")
    fi
    exec "${PYTHON:-python3}" "$REPO/launch/pretrain_gpt_mtp.py" "${plan_args[@]}" "$@" \
        --world-size "$((NODES * GPUS))" --dry-run
fi

args=(--parsable --job-name="${NAME:-mtp-$MODE}" --nodes="$NODES" --gpus-per-node="$GPUS"
      --ntasks-per-node="$TASKS_PER_NODE")
[[ -n $TIME ]] && args+=(--time="$TIME")
[[ -n $PARTITION ]] && args+=(--partition="$PARTITION")
[[ -n $ACCOUNT ]] && args+=(--account="$ACCOUNT")
(( CHAIN > 1 )) && args+=(--dependency=singleton)
for ((i = 1; i <= CHAIN; i++)); do
    job=$(sbatch "${args[@]}" "$REPO/launch/slurm/$MODE.sbatch")
    echo "submitted job $job ($i/$CHAIN): $MODE, $NODES nodes x $GPUS GPUs"
done

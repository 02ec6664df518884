#!/bin/bash
# Submit a training job (or a chain of jobs that resume one another) with named
# parameters; check its plan first with --plan-only. From the repository root:
#
#   launch/slurm/submit.sh --nodes 128 --gpus-per-node 8 --config my.yaml --plan-only
#   launch/slurm/submit.sh --mode srun --nodes 128 --gpus-per-node 8 --config my.yaml \
#       --image nvcr.io#nvidia/pytorch:26.06-py3 --mounts /data:/data --chain 4 \
#       -- --train-iters 100000 --bf16
#   launch/slurm/submit.sh --nodes 2 --gpus-per-node 0 --image none --no-setup \
#       -- --mtp-num-layers 1      # CPU nodes: one rank per node on gloo
#
# Flags after "--" go to the launcher. --chain K submits K jobs of one name with
# --dependency=singleton: each starts when the previous ends and resumes from the shared
# checkpoint directory (a job that already finished training exits at once).
set -euo pipefail

usage() {
    sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'
    echo "flags: --mode srun|torchrun  --nodes N  --gpus-per-node G (0: CPU nodes)"
    echo "       --ranks-per-node R (default G, or 1 when G is 0)  --image IMAGE|none"
    echo "       --mounts SRC:DST[,...]  --config FILE  --name NAME  --time D-HH:MM:SS"
    echo "       --signal-before SECONDS (save this long before the time limit; default 120)"
    echo "       --partition P  --account A  --chain K  --runs DIR  --no-setup"
    echo "       --sbatch-arg OPTION (repeatable, e.g. --sbatch-arg --qos=high)  --plan-only"
}

die() {
    echo "submit.sh: $*" >&2
    exit 2
}

# Seconds in a Slurm --time value (M, M:S, H:M:S, D-H, D-H:M, D-H:M:S); empty if it is
# none of those (sbatch then judges it).
time_seconds() {
    local t=$1 days=0
    if [[ $t =~ ^([0-9]+)-(.*)$ ]]; then
        days=${BASH_REMATCH[1]} t=${BASH_REMATCH[2]}
        [[ $t =~ ^[0-9]+(:[0-9]+){0,2}$ ]] || return 0
        IFS=: read -r h m s <<< "$t"
        echo $((days * 86400 + 10#$h * 3600 + 10#${m:-0} * 60 + 10#${s:-0}))
        return
    fi
    [[ $t =~ ^[0-9]+(:[0-9]+){0,2}$ ]] || return 0
    IFS=: read -r a b c <<< "$t"
    if [[ -n $c ]]; then echo $((10#$a * 3600 + 10#$b * 60 + 10#$c))
    elif [[ -n $b ]]; then echo $((10#$a * 60 + 10#$b))
    else echo $((10#$a * 60)); fi
}

MODE=srun NODES=1 GPUS=8 RANKS="" NAME="" TIME="" PARTITION="" ACCOUNT="" CHAIN=1
PLAN_ONLY=0 LEAD="" EXTRA_SBATCH=()
REPO=$(cd "$(dirname "$0")/../.." && pwd)
while (( $# )); do
    case $1 in
        --plan-only) PLAN_ONLY=1; shift; continue ;;
        --no-setup) export MTP_SETUP=0; shift; continue ;;
        -h|--help) usage; exit 0 ;;
        --) shift; break ;;
        --*) (( $# >= 2 )) || die "$1 needs a value (see --help)" ;;
        *) die "unknown argument $1 (see --help; launcher flags go after --)" ;;
    esac
    case $1 in
        --mode) MODE=$2 ;;
        --nodes) NODES=$2 ;;
        --gpus-per-node) GPUS=$2 ;;
        --ranks-per-node) RANKS=$2 ;;
        --image) export MTP_IMAGE=$2 ;;
        --mounts) export MTP_MOUNTS=$2 ;;
        --config) export MTP_CONFIG=$2 ;;
        --name) NAME=$2 ;;
        --time) TIME=$2 ;;
        --signal-before) LEAD=$2 ;;
        --partition) PARTITION=$2 ;;
        --account) ACCOUNT=$2 ;;
        --chain) CHAIN=$2 ;;
        --runs) export MTP_RUNS=$2 ;;
        --sbatch-arg) EXTRA_SBATCH+=("$2") ;;
        *) die "unknown flag $1 (see --help)" ;;
    esac
    shift 2
done
[[ $GPUS =~ ^[0-9]+$ ]] ||
    die "--gpus-per-node=$GPUS is not allowed. Allowed: an integer >= 0 (0: CPU nodes)."
RANKS=${RANKS:-$(( GPUS > 0 ? GPUS : 1 ))}
for pair in "--nodes:$NODES" "--ranks-per-node:$RANKS" "--chain:$CHAIN" \
            "--signal-before:${LEAD:-120}"; do
    [[ ${pair#*:} =~ ^[1-9][0-9]*$ ]] ||
        die "${pair%%:*}=${pair#*:} is not allowed. Allowed: an integer >= 1."
done
case $MODE in
    srun) TASKS_PER_NODE=$RANKS ;;
    torchrun) TASKS_PER_NODE=1 ;;
    *) die "--mode=$MODE is not allowed. Allowed: srun, torchrun." ;;
esac
# Slurm checks time limits every 30 s and sends the signal up to that much early; a job
# signalled at its start would requeue forever without training.
if [[ -n $TIME ]]; then
    seconds=$(time_seconds "$TIME")
    if [[ -n $seconds ]] && (( seconds <= ${LEAD:-120} + 30 )); then
        die "--time=$TIME is not allowed with --signal-before ${LEAD:-120}: the job is told" \
            "to save ${LEAD:-120} s before its limit, and Slurm may say so 30 s earlier." \
            "Allowed: a --time longer than $(( ${LEAD:-120} + 30 )) s, or a smaller --signal-before."
    fi
fi
export MTP_REPO=$REPO MTP_EXTRA_ARGS="$*" MTP_RANKS_PER_NODE=$RANKS

if (( PLAN_ONLY )); then
    plan_args=()
    if [[ -n ${MTP_CONFIG:-} ]]; then
        plan_args+=(--config "$MTP_CONFIG")
    fi
    # The plan needs this package's light dependencies only (PyYAML), no torch: the
    # checkout's .venv, or MTP_PYTHON, or python3.
    python=${MTP_PYTHON:-}
    if [[ -z $python ]]; then
        if [[ -x $REPO/.venv/bin/python ]]; then python=$REPO/.venv/bin/python; else python=python3; fi
    fi
    if ! "$python" -c 'import yaml' 2>/dev/null; then
        die "--plan-only needs a Python with this package's requirements (PyYAML): $python has" \
            "none. Set MTP_PYTHON=/path/to/venv/bin/python (make venv builds $REPO/.venv)."
    fi
    exec "$python" "$REPO/launch/pretrain_gpt_mtp.py" "${plan_args[@]}" "$@" \
        --world-size "$((NODES * RANKS))" --dry-run
fi

args=(--parsable --job-name="${NAME:-mtp-$MODE}" --nodes="$NODES")
# No GPU request on CPU nodes: a cluster without GPUs refuses any --gpus-per-node.
(( GPUS > 0 )) && args+=(--gpus-per-node="$GPUS")
args+=(--ntasks-per-node="$TASKS_PER_NODE")
# torchrun mode: one task per node whose workers need a CPU each
[[ $MODE == torchrun ]] && args+=(--cpus-per-task="$RANKS")
[[ -n $TIME ]] && args+=(--time="$TIME")
[[ -n $LEAD ]] && args+=(--signal="B:USR1@$LEAD")
[[ -n $PARTITION ]] && args+=(--partition="$PARTITION")
[[ -n $ACCOUNT ]] && args+=(--account="$ACCOUNT")
(( CHAIN > 1 )) && args+=(--dependency=singleton)
args+=("${EXTRA_SBATCH[@]}")
for ((i = 1; i <= CHAIN; i++)); do
    job=$(sbatch "${args[@]}" "$REPO/launch/slurm/$MODE.sbatch")
    echo "submitted job $job ($i/$CHAIN): $MODE, $NODES nodes x $RANKS ranks" \
         "($([[ $GPUS == 0 ]] && echo CPU || echo "$GPUS GPUs") per node)"
done

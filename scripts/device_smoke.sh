#!/usr/bin/env bash
# GPU readiness in one short run on a lent one-GPU machine that has Python 3.12 and a CUDA
# torch but no megatron-core, no Transformer Engine and no network (this workplace's
# `device` machines): megatron-core comes from a wheel carried in .whl/ (git-ignored).
#
#   scripts/device_smoke.sh --fetch          # here, once: megatron-core wheel into .whl/
#   scripts/device_smoke.sh --out "$OUT"     # there: install it, run the checks
#
# Checks (scripts/gpu_check.py steps; each is timed and the report is rewritten after
# each, so a run cut short keeps what it measured): env, the mission command, bf16 +
# distributed optimizer save/resume, --async-save, and the throughput benchmark at GPU
# shapes (package/bare step-time ratio, MFU). About 3-5 minutes on an H100; the whole run
# is capped by SMOKE_TIMEOUT (default 480 s). Writes <out>/report.md (+ each step's logs).
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO"
WHEELS=$REPO/.whl
MCORE=${MEGATRON_CORE_PIN:-megatron-core==0.19.2}

if [[ "${1:-}" == "--fetch" ]]; then
    # Pure-Python wheel plus nothing else: the device image has torch, numpy, packaging,
    # pyyaml, psutil and tqdm already (see the device tool's KINDS.md).
    mkdir -p "$WHEELS"
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform any -d "$WHEELS" "$MCORE"
    ls -la "$WHEELS"
    exit 0
fi

OUT_DIR=${OUT:-$REPO/runs/device-smoke}
if [[ "${1:-}" == "--out" ]]; then OUT_DIR=$2; fi
mkdir -p "$OUT_DIR"
PY=${MTP_PYTHON:-python3}
if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "device_smoke.sh: no CUDA GPU visible to $PY" >&2
    exit 2
fi
if ! "$PY" -c 'import megatron.core' 2>/dev/null; then
    shopt -s nullglob
    wheels=("$WHEELS"/megatron_core-*.whl)
    if (( ${#wheels[@]} == 0 )); then
        echo "device_smoke.sh: megatron-core is not installed and $WHEELS holds no wheel;" \
             "run scripts/device_smoke.sh --fetch here first and carry .whl" >&2
        exit 2
    fi
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "${wheels[@]}"
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$REPO:${PYTHONPATH}
export PYTHONUNBUFFERED=1 CUDA_DEVICE_MAX_CONNECTIONS=1
# GPU shapes for the benchmark: big enough that the GPU, not Python, sets the step time.
BENCH=${SMOKE_BENCHMARK_ARGS:---bf16 --hidden-size 2048 --num-layers 8 --num-attention-heads 16 --seq-length 2048 --micro-batch-size 2 --steps 10 --warmup 3}
timeout "${SMOKE_TIMEOUT:-480}" "$PY" scripts/gpu_check.py --out "$OUT_DIR" \
    --only env,mission,resume,async,benchmark --benchmark-args "$BENCH" || rc=$?
echo "report: $OUT_DIR/report.md"
exit "${rc:-0}"

"""``--dry-run``: the plan of a run for any world size, computed without starting it.

    python launch/pretrain_gpt_mtp.py --world-size 1024 --tensor-model-parallel-size 8 \
        --pipeline-model-parallel-size 16 ... --dry-run --gpu-memory-gb 80 --mfu 0.4

prints the rank -> (DP, PP, TP) grid, which stage holds the MTP layers and the shared
embedding, parameters and optimizer-state bytes per rank, activation memory per
micro-batch (MTP logits per depth included), FLOPs per token and tokens/s at an MFU.
See docs/planner.md.
"""

from __future__ import annotations

import sys
from typing import Optional

from mtp_megatron.config import RunConfig
from mtp_megatron.plan.planner import (
    DEFAULT_GPU_MEMORY_GB,
    H100_BF16_TFLOPS,
    Plan,
    StagePlan,
    build_plan,
)
from mtp_megatron.plan.report import format_plan

__all__ = ["DEFAULT_GPU_MEMORY_GB", "H100_BF16_TFLOPS", "Plan", "StagePlan", "build_plan",
           "dry_run", "format_plan", "print_plan"]

PLAN_DOES_NOT_FIT = 2  # exit code of --dry-run --gpu-memory-gb G when a stage needs more


def print_plan(cfg: RunConfig, *, gpu_memory_gb: Optional[float] = None, mfu: float = 0.4,
               peak_tflops: float = H100_BF16_TFLOPS, gpu_memory_assumed: bool = False) -> Plan:
    """Print the plan of ``cfg`` to stdout and return it."""
    plan = build_plan(cfg, gpu_memory_gb=gpu_memory_gb, mfu=mfu, peak_tflops=peak_tflops,
                      gpu_memory_assumed=gpu_memory_assumed)
    print(format_plan(plan), flush=True)
    return plan


def dry_run(cfg: RunConfig, *, gpu_memory_gb: Optional[float], mfu: float) -> int:
    """``--dry-run``: print the plan; the exit code says whether it fits.

    Without ``--gpu-memory-gb`` the fit is checked against an 80 GiB GPU as advice (exit
    0); with it, a stage that needs more exits :data:`PLAN_DOES_NOT_FIT`.
    """
    given = gpu_memory_gb is not None
    plan = print_plan(cfg, gpu_memory_gb=gpu_memory_gb if given else DEFAULT_GPU_MEMORY_GB,
                      mfu=mfu, gpu_memory_assumed=not given)
    if given and plan.all_fit is False:
        need = max(stage.total_bytes for stage in plan.stages) / 2**30
        print(f"error: --gpu-memory-gb={gpu_memory_gb:g}: the plan does not fit (a stage needs "
              f"{need:.1f} GiB per GPU; see DOES NOT FIT above)", file=sys.stderr)
        return PLAN_DOES_NOT_FIT
    return 0

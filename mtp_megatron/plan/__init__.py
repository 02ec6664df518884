"""``--dry-run``: the plan of a run for any world size, computed without starting it.

    python launch/pretrain_gpt_mtp.py --world-size 1024 --tensor-model-parallel-size 8 \
        --pipeline-model-parallel-size 16 ... --dry-run --gpu-memory-gb 80 --mfu 0.4

prints the rank -> (DP, PP, TP) grid, which stage holds the MTP layers and the shared
embedding, parameters and optimizer-state bytes per rank, activation memory per
micro-batch (MTP logits per depth included), FLOPs per token and tokens/s at an MFU.
See docs/planner.md.
"""

from __future__ import annotations

from typing import Optional

from mtp_megatron.config import RunConfig
from mtp_megatron.plan.planner import H100_BF16_TFLOPS, Plan, StagePlan, build_plan
from mtp_megatron.plan.report import format_plan

__all__ = ["H100_BF16_TFLOPS", "Plan", "StagePlan", "build_plan", "format_plan", "print_plan"]


def print_plan(cfg: RunConfig, *, gpu_memory_gb: Optional[float] = None, mfu: float = 0.4,
               peak_tflops: float = H100_BF16_TFLOPS) -> Plan:
    """Print the plan of ``cfg`` to stdout and return it."""
    plan = build_plan(cfg, gpu_memory_gb=gpu_memory_gb, mfu=mfu, peak_tflops=peak_tflops)
    print(format_plan(plan), flush=True)
    return plan

"""One run's numbers, read from the ``metrics.jsonl`` the trainer wrote.

Like for like: the quality of a run is the **main head's next-token validation loss**
(``"lm loss"`` of the ``"split": "valid"`` rows, which megatron-core computes for the main
head only). The MTP training objective ``lm + factor * sum_k w_k mtp_k`` is kept for
information as ``train_objective`` and is never what a baseline is compared against:
it is larger by construction and says nothing about next-token quality.

    result = collect_run(run, "runs/compare/runs/seed1234/mtp_d1_f0.1")
    result["valid_lm_loss"], result["valid_mtp_loss"], result["acceptance"]
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Tuple

from mtp_megatron.config.mtp import normalised_depth_weights
from mtp_megatron.experiments.spec import RunSpec
from mtp_megatron.training.writers import read_run


def main_head_loss(valid_row: Dict) -> float:
    """Next-token validation loss of the main head: the one number compared across runs."""
    return float(valid_row["lm loss"])


def train_objective(train_row: Dict, factor: Optional[float],
                    depth_weights: str = "uniform") -> float:
    """What the MTP run minimised at that row: ``lm + factor * sum_k w_k mtp_k`` (lm for a
    baseline), with the row's own ``mtp_factor`` when a schedule logged it."""
    mtp = [v for k, v in train_row.items() if k.startswith("mtp_") and k.endswith(" loss")]
    factor = train_row.get("mtp_factor", factor)
    if not mtp or not factor:
        return float(train_row["lm loss"])
    weights = normalised_depth_weights(depth_weights, len(mtp))
    return float(train_row["lm loss"]) + factor * sum(w * v for w, v in zip(weights, mtp))


def _median(values: List[Optional[float]]) -> Optional[float]:
    values = sorted(v for v in values if v is not None)
    if not values:
        return None
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def step_speed(train_rows: List[Dict]) -> Tuple[Optional[float], Optional[float]]:
    """(ms/iter, tokens/s): the median over the logged windows after the first (warm-up),
    robust to a window slowed down by another process on a shared machine."""
    rows = train_rows[1:] or train_rows
    return _median([r.get("ms/iter") for r in rows]), _median([r.get("tokens/s") for r in rows])


def tokens_and_flops_per_step(train_rows: List[Dict]) -> Tuple[float, float]:
    """Tokens per iteration and training FLOPs per token, as the trainer counted them."""
    row = train_rows[-1]
    tokens = round(row["tokens/s"] * row["ms/iter"] / 1000.0)
    flops_per_token = row["TFLOP/s"] * 1e12 / row["tokens/s"] if row["tokens/s"] else 0.0
    return tokens, flops_per_token


def collect_run(run: RunSpec, run_dir: str) -> Dict:
    """The run's final validation metrics, speed, memory and validation curve."""
    train, valid = read_run(run_dir)
    final = [r for r in valid if r["iteration"] == run.train_iters]
    if not train or not final:
        raise RuntimeError(f"{run.name}: {run_dir}/metrics.jsonl has no final validation "
                           f"at iteration {run.train_iters}")
    final = final[-1]
    tokens_per_step, flops_per_token = tokens_and_flops_per_step(train)
    ms_per_iter, tokens_per_s = step_speed(train)
    depth = run.depth
    chained = []
    for k in range(1, depth + 1):
        chained.append(final["mtp_1 acceptance"] if k == 1 else final[f"chained_{k} acceptance"])
    loss = main_head_loss(final)
    return {
        "name": run.name, "variant": run.variant, "seed": run.seed, "depth": depth,
        "factor": run.factor, "flops_depth": run.flops_depth, "train_iters": run.train_iters,
        "depth_weights": run.depth_weights, "schedule": run.schedule,
        "final_mtp_factor": train[-1].get("mtp_factor"),
        "tokens": tokens_per_step * run.train_iters,
        "flops_per_token": flops_per_token,
        "train_flops": flops_per_token * tokens_per_step * run.train_iters,
        "valid_lm_loss": loss,
        "valid_lm_ppl": math.exp(min(loss, 20.0)),
        "valid_lm_accuracy": final.get("lm accuracy"),
        "valid_mtp_loss": [final[f"mtp_{k} loss"] for k in range(1, depth + 1)],
        "acceptance": [final[f"mtp_{k} acceptance"] for k in range(1, depth + 1)],
        "chained_acceptance": chained,
        "train_lm_loss": train[-1]["lm loss"],
        "train_objective": train_objective(train[-1], run.factor, run.depth_weights),
        "ms_per_iter": ms_per_iter,
        "tokens_per_s": tokens_per_s,
        "peak_rss_mib": max((r.get("max RSS MiB") or 0.0 for r in train), default=None) or None,
        "peak_gpu_mib": max((r.get("max GPU allocated MiB") or 0.0 for r in train),
                            default=None) or None,
        "curve": [{"iteration": r["iteration"], "tokens": r["iteration"] * tokens_per_step,
                   "flops": r["iteration"] * tokens_per_step * flops_per_token,
                   "valid_lm_loss": main_head_loss(r)} for r in valid],
    }

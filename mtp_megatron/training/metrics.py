"""Megatron-style iteration log lines (last rank); the numbers go to a MetricsWriter.

    iteration 20/200 | elapsed 0:00:09 | ETA 0:01:21 | lm loss 3.512345E+00 |
    mtp_1 loss 4.012345E+00 | mtp_1 acceptance 0.3120 | mtp_factor 0.1 | lr 1.000000E-03 |
    grad norm 1.2340 | tokens/s 23456 | ms/iter 87.3 | TFLOP/s/GPU 0.0120 | MFU 0.41 |
    time ms/iter: data 0.4, forward-backward 80.1, optimizer 6.2, eval 0.0, checkpoint 0.0

``elapsed`` is the wall time since the logger was made (training start); ``ETA`` is the
remaining iterations times the wall time per iteration since the previous log line, so
evaluation and checkpoint saves are included. ``mtp_k acceptance`` (megatron-core 0.19;
absent on 0.16, whose tracker does not count hits) is the fraction of the window's
training positions where depth k's top-1 prediction was the token k + 1 ahead: the
definition validation reports too (``training/evaluate.py``). ``mtp_factor`` (MTP runs)
is the MTP loss scaling factor the logged iteration trained with, its schedule's value
(``training/mtp_weighting.py``). Steps are recorded with host
values only (lr, grad norm, seconds); the losses arrive once per window, already reduced
(:class:`~mtp_megatron.training.losses.WindowLosses`). TFLOP/s is per GPU (per rank), as
Megatron-LM logs it and as ``--dry-run`` plans MFU: ``tokens/s x FLOPs per token (MTP
counted) / world size``; MFU divides it by the GPU's peak (``--peak-tflops``, or
:data:`PEAK_BF16_TFLOPS` by device name). The rows (plus ``tokens``, the tokens consumed so
far, and the peak memory) go to :class:`~mtp_megatron.training.writers.MetricsWriter`:
metrics.jsonl, tensorboard, wandb.
"""

from __future__ import annotations

import datetime
import logging
import resource
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from mtp_megatron.training.writers import MetricsWriter

logger = logging.getLogger("mtp_megatron")


# Dense bf16 tensor-core peaks (TFLOP/s per GPU, NVIDIA datasheets), matched by substring
# of torch.cuda.get_device_name(); the first match wins, so longer names come first.
PEAK_BF16_TFLOPS = (
    ("GH200", 989.0), ("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0),
    ("B200", 2250.0), ("A100", 312.0), ("L40S", 362.0), ("A10", 125.0),
)


def peak_tflops_for(device_name: Optional[str]) -> Optional[float]:
    """The table's peak for a device name, or None (CPU, unknown GPU)."""
    for key, peak in PEAK_BF16_TFLOPS:
        if device_name and key in device_name:
            return peak
    return None


def tflops_per_gpu(tokens_per_s: float, flops_per_token: float, world_size: int) -> float:
    """Model TFLOP/s achieved by each rank: the job's rate divided by the ranks."""
    return tokens_per_s * flops_per_token / world_size / 1e12


@dataclass
class StepMetrics:
    iteration: int
    lm_loss: Optional[float]
    mtp_losses: Optional[List[float]]
    lr: float
    grad_norm: Optional[float]
    seconds: float
    skipped: bool = False
    stop_reason: Optional[str] = None
    # per-depth top-1 acceptance in training (megatron-core 0.19's tracker; None on 0.16)
    mtp_acceptance: Optional[List[float]] = None
    # the MTP loss scaling factor this iteration trained with (its schedule's value)
    mtp_factor: Optional[float] = None
    # MoE: the window's balancing loss, tokens per expert, expert bias (training/moe_stats.py)
    moe: Optional[Dict[str, float]] = None


@dataclass
class _Window:
    steps: List[StepMetrics] = field(default_factory=list)


def _mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


class MetricsLogger:
    """Averages losses over ``--log-interval`` steps and reports them on the logging rank."""

    def __init__(self, *, log_interval: int, train_iters: int, tokens_per_step: int,
                 flops_per_token: float, is_logging_rank: bool,
                 writer: Optional[MetricsWriter] = None, world_size: int = 1,
                 peak_tflops: Optional[float] = None, clock=time.perf_counter):
        self.log_interval = log_interval
        self.train_iters = train_iters
        self.tokens_per_step = tokens_per_step
        self.flops_per_token = flops_per_token
        self.world_size = world_size
        self.peak_tflops = peak_tflops
        self.enabled = is_logging_rank
        self.window = _Window()
        self.writer = writer or MetricsWriter()
        self.clock = clock
        self.started = self._last_log_time = clock()
        self._last_log_iteration: Optional[int] = None  # set by the first step (resume)

    def due(self, iteration: int) -> bool:
        """Whether this iteration ends a log window (every rank gets the same answer)."""
        return iteration % self.log_interval == 0 or iteration == self.train_iters

    def record(self, step: StepMetrics) -> None:
        """Add a step (host values only; its losses come with :meth:`log`)."""
        if not self.enabled:
            return
        if self._last_log_iteration is None:
            self._last_log_iteration = step.iteration - 1
        self.window.steps.append(step)

    def log(self, losses=None, timings: Optional[Dict[str, float]] = None,
            moe: Optional[Dict[str, float]] = None,
            extra: Optional[Dict[str, float]] = None) -> Optional[str]:
        """Close the window: fill in its reduced losses, print and return the log line.

        ``losses``: a ``WindowLosses`` (per-step lm losses, window-mean MTP losses);
        ``timings``: milliseconds per iteration by phase; ``moe``: the window's MoE
        summary (``MoEStats.flush``); ``extra``: more window values for the line and
        the row, after the losses (``--mtp-self-distill``'s).
        """
        if not self.enabled or not self.window.steps:
            self.window = _Window()
            return None
        steps = self.window.steps
        if losses is not None and losses.lm is not None:
            for step, value in zip(steps[-len(losses.lm):], losses.lm):
                step.lm_loss = value
        if losses is not None and losses.mtp is not None:
            for step in steps:
                step.mtp_losses = list(losses.mtp)
        if losses is not None and getattr(losses, "mtp_acceptance", None) is not None:
            for step in steps:
                step.mtp_acceptance = list(losses.mtp_acceptance)
        if moe is not None:
            steps[-1].moe = dict(moe)
        line, row = self._summarise(timings or {}, extra or {})
        self.window = _Window()
        logger.info(line)
        self.writer.write(row)
        return line

    def _progress(self, iteration: int) -> str:
        """``elapsed H:MM:SS | ETA H:MM:SS`` (wall time per iteration since the last line)."""
        now = self.clock()
        per_iter = (now - self._last_log_time) / max(1, iteration - self._last_log_iteration)
        self._last_log_time, self._last_log_iteration = now, iteration
        eta = per_iter * max(0, self.train_iters - iteration)
        return f"elapsed {_hms(now - self.started)} | ETA {_hms(eta)}"

    def _summarise(self, timings: Dict[str, float], extra: Dict[str, float]):
        steps = self.window.steps
        it = steps[-1].iteration
        seconds = sum(s.seconds for s in steps) / len(steps)
        tokens_per_s = self.tokens_per_step / seconds if seconds > 0 else 0.0
        row = {"iteration": it, "tokens": it * self.tokens_per_step,
               "lm loss": _mean(s.lm_loss for s in steps)}
        depths = max((len(s.mtp_losses or []) for s in steps), default=0)
        for k in range(depths):
            row[f"mtp_{k + 1} loss"] = _mean(s.mtp_losses[k] for s in steps if s.mtp_losses)
        accepted = [s.mtp_acceptance for s in steps if s.mtp_acceptance]
        for k in range(len(accepted[-1]) if accepted else 0):
            row[f"mtp_{k + 1} acceptance"] = accepted[-1][k]  # already the window's rate
        if steps[-1].mtp_factor is not None:
            row["mtp_factor"] = steps[-1].mtp_factor  # the logged iteration's
        row.update(_moe_row(steps[-1].moe))
        row.update(extra)
        row.update({
            "lr": steps[-1].lr,
            "grad norm": _mean(s.grad_norm for s in steps),
            "tokens/s": tokens_per_s,
            "ms/iter": seconds * 1000.0,
            "TFLOP/s/GPU": tflops_per_gpu(tokens_per_s, self.flops_per_token, self.world_size),
            # the whole job's rate: kept in metrics.jsonl (experiments/ read it), not printed
            "TFLOP/s": tokens_per_s * self.flops_per_token / 1e12,
        })
        if self.peak_tflops:
            row["MFU"] = row["TFLOP/s/GPU"] / self.peak_tflops
        row["skipped"] = sum(s.skipped for s in steps)
        row.update(peak_memory())
        parts = [f"iteration {it}/{self.train_iters}", self._progress(it)]
        for key, value in row.items():
            if key in ("iteration", "tokens", "skipped", "TFLOP/s") or value is None \
                    or key.startswith(("max ", "moe ")):
                continue
            if key.endswith("loss") or key == "lr":
                parts.append(f"{key} {value:.6E}")
            elif key == "grad norm":
                parts.append(f"{key} {value:.4f}")
            elif key == "tokens/s":
                parts.append(f"{key} {value:.0f}")
            elif key == "ms/iter":
                parts.append(f"{key} {value:.1f}")
            elif key == "mtp_factor":
                parts.append(f"{key} {value:.6g}")
            else:
                parts.append(f"{key} {value:.4f}")
        if row["skipped"]:
            parts.append(f"skipped {row['skipped']}")
        if timings:
            parts.append("time ms/iter: " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()))
            row.update({f"time {k} ms": v for k, v in timings.items()})
        return " | ".join(parts), row

    def close(self) -> None:
        self.writer.close()


def _moe_row(moe: Optional[Dict[str, float]]) -> Dict[str, float]:
    """The MoE summary in log order: balancing loss, expert load, bias range, then the
    per-layer tokens per expert (metrics.jsonl only)."""
    if not moe:
        return {}
    first = ("load balancing loss", "expert load max/mean", "expert bias min", "expert bias max")
    row = {k: moe[k] for k in first if k in moe}
    row.update({k: v for k, v in moe.items() if k not in row})
    return row


def _hms(seconds: float) -> str:
    return str(datetime.timedelta(seconds=round(max(0.0, seconds))))


def peak_memory() -> dict:
    """This process's peak resident memory (MiB) and, on GPU, torch's peak allocation."""
    row = {"max RSS MiB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        row["max GPU allocated MiB"] = torch.cuda.max_memory_allocated() / 2**20
    return row

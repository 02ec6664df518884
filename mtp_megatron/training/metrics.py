"""Megatron-style iteration log lines (last rank); the numbers go to a MetricsWriter.

    iteration 20/200 | elapsed 0:00:09 | ETA 0:01:21 | lm loss 3.512345E+00 |
    mtp_1 loss 4.012345E+00 | lr 1.000000E-03 | grad norm 1.2340 | tokens/s 23456 |
    ms/iter 87.3 | TFLOP/s 0.0120

``elapsed`` is the wall time since the logger was made (training start); ``ETA`` is the
remaining iterations times the wall time per iteration since the previous log line, so
evaluation and checkpoint saves are included. The rows (plus ``tokens``, the tokens
consumed so far) go to :class:`~mtp_megatron.training.writers.MetricsWriter`:
metrics.jsonl, tensorboard, wandb.
"""

from __future__ import annotations

import datetime
import logging
import resource
import time
from dataclasses import dataclass, field
from typing import List, Optional

from mtp_megatron.training.writers import MetricsWriter

logger = logging.getLogger("mtp_megatron")


@dataclass
class StepMetrics:
    iteration: int
    lm_loss: Optional[float]
    mtp_losses: Optional[List[float]]
    lr: float
    grad_norm: Optional[float]
    seconds: float
    skipped: bool = False


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
                 writer: Optional[MetricsWriter] = None, clock=time.perf_counter):
        self.log_interval = log_interval
        self.train_iters = train_iters
        self.tokens_per_step = tokens_per_step
        self.flops_per_token = flops_per_token
        self.enabled = is_logging_rank
        self.window = _Window()
        self.writer = writer or MetricsWriter()
        self.clock = clock
        self.started = self._last_log_time = clock()
        self._last_log_iteration: Optional[int] = None  # set by the first step (resume)

    def record(self, step: StepMetrics) -> Optional[str]:
        """Add a step; on the interval (and the last step) print and return a log line."""
        if not self.enabled:
            return None
        if self._last_log_iteration is None:
            self._last_log_iteration = step.iteration - 1
        self.window.steps.append(step)
        last = step.iteration == self.train_iters
        if step.iteration % self.log_interval and not last:
            return None
        line, row = self._summarise()
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

    def _summarise(self):
        steps = self.window.steps
        it = steps[-1].iteration
        seconds = sum(s.seconds for s in steps) / len(steps)
        tokens_per_s = self.tokens_per_step / seconds if seconds > 0 else 0.0
        row = {"iteration": it, "tokens": it * self.tokens_per_step,
               "lm loss": _mean(s.lm_loss for s in steps)}
        depths = max((len(s.mtp_losses or []) for s in steps), default=0)
        for k in range(depths):
            row[f"mtp_{k + 1} loss"] = _mean(s.mtp_losses[k] for s in steps if s.mtp_losses)
        row.update({
            "lr": steps[-1].lr,
            "grad norm": _mean(s.grad_norm for s in steps),
            "tokens/s": tokens_per_s,
            "ms/iter": seconds * 1000.0,
            "TFLOP/s": tokens_per_s * self.flops_per_token / 1e12,
            "skipped": sum(s.skipped for s in steps),
            **peak_memory(),
        })
        parts = [f"iteration {it}/{self.train_iters}", self._progress(it)]
        for key, value in row.items():
            if key in ("iteration", "tokens", "skipped") or key.startswith("max ") \
                    or value is None:
                continue
            if key.endswith("loss") or key == "lr":
                parts.append(f"{key} {value:.6E}")
            elif key == "grad norm":
                parts.append(f"{key} {value:.4f}")
            elif key == "tokens/s":
                parts.append(f"{key} {value:.0f}")
            elif key == "ms/iter":
                parts.append(f"{key} {value:.1f}")
            else:
                parts.append(f"{key} {value:.4f}")
        if row["skipped"]:
            parts.append(f"skipped {row['skipped']}")
        return " | ".join(parts), row

    def close(self) -> None:
        self.writer.close()


def _hms(seconds: float) -> str:
    return str(datetime.timedelta(seconds=round(max(0.0, seconds))))


def peak_memory() -> dict:
    """This process's peak resident memory (MiB) and, on GPU, torch's peak allocation."""
    row = {"max RSS MiB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        row["max GPU allocated MiB"] = torch.cuda.max_memory_allocated() / 2**20
    return row

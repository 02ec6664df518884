"""Megatron-style iteration log lines (last rank), a metrics.jsonl file, tensorboard.

    iteration 20/200 | lm loss 3.512345E+00 | mtp_1 loss 4.012345E+00 | lr 1.000000E-03 |
    grad norm 1.234 | tokens/s 23456 | ms/iter 87.3 | TFLOP/s 0.012
"""

from __future__ import annotations

import json
import logging
import os
import resource
from dataclasses import dataclass, field
from typing import List, Optional

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
                 flops_per_token: float, is_logging_rank: bool, output_dir: Optional[str],
                 tensorboard_dir: Optional[str] = None):
        self.log_interval = log_interval
        self.train_iters = train_iters
        self.tokens_per_step = tokens_per_step
        self.flops_per_token = flops_per_token
        self.enabled = is_logging_rank
        self.window = _Window()
        self.jsonl = None
        self.writer = None
        if not self.enabled:
            return
        if output_dir:
            os.makedirs(output_dir, exist_ok=True)
            self.jsonl = open(os.path.join(output_dir, "metrics.jsonl"), "a")
        if tensorboard_dir:
            self.writer = _tensorboard_writer(tensorboard_dir)

    def record(self, step: StepMetrics) -> Optional[str]:
        """Add a step; on the interval (and the last step) print and return a log line."""
        if not self.enabled:
            return None
        self.window.steps.append(step)
        last = step.iteration == self.train_iters
        if step.iteration % self.log_interval and not last:
            return None
        line, row = self._summarise()
        self.window = _Window()
        logger.info(line)
        if self.jsonl:
            self.jsonl.write(json.dumps(row) + "\n")
            self.jsonl.flush()
        if self.writer:
            for key, value in row.items():
                if key != "iteration" and value is not None:
                    self.writer.add_scalar(key, value, row["iteration"])
            self.writer.flush()
        return line

    def _summarise(self):
        steps = self.window.steps
        it = steps[-1].iteration
        seconds = sum(s.seconds for s in steps) / len(steps)
        tokens_per_s = self.tokens_per_step / seconds if seconds > 0 else 0.0
        row = {"iteration": it, "lm loss": _mean(s.lm_loss for s in steps)}
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
        parts = [f"iteration {it}/{self.train_iters}"]
        for key, value in row.items():
            if key in ("iteration", "skipped") or key.startswith("max ") or value is None:
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
        if self.jsonl:
            self.jsonl.close()
        if self.writer:
            self.writer.close()


def peak_memory() -> dict:
    """This process's peak resident memory (MiB) and, on GPU, torch's peak allocation."""
    row = {"max RSS MiB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        row["max GPU allocated MiB"] = torch.cuda.max_memory_allocated() / 2**20
    return row


def _tensorboard_writer(path: str):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        from mtp_megatron.config import ConfigError

        raise ConfigError(
            "--tensorboard-dir", path, "only with tensorboard installed",
            "pip install -e .[tensorboard]",
        ) from None
    return SummaryWriter(log_dir=path)

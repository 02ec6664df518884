"""Logging and output flags (``logging:`` in YAML)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from mtp_megatron.config.fields import (
    ConfigError,
    check_float,
    check_int,
    check_types,
    flag_of,
    option,
)


@dataclass(frozen=True)
class LoggingConfig:
    """What is printed and where the run's files go."""

    log_interval: int = option(10, "Print a log line every N iterations.", type=int)
    tensorboard_dir: Optional[str] = option(None, "Write tensorboard scalars here.", type=str)
    wandb_project: Optional[str] = option(
        None, "Also write the scalars to this Weights & Biases project "
        "(WANDB_MODE=offline works without network).", type=str,
    )
    wandb_exp_name: Optional[str] = option(
        None, "Weights & Biases run name (default: the --output-dir's name).", type=str
    )
    wandb_save_dir: Optional[str] = option(
        None, "Where wandb keeps its files (default: <output-dir>/wandb).", type=str
    )
    output_dir: str = option(
        "runs/default", "The run's directory (resolved config, logs).", type=str
    )

    timing_log_level: int = option(
        0, "Timers in the log: 0 = host wall clock per phase, no device syncs; 1-2 = "
        "megatron-core Timers, exact (a device sync at every phase boundary).",
        type=int, choices=(0, 1, 2),
    )
    peak_tflops: Optional[float] = option(
        None, "Peak TFLOP/s of one GPU, for MFU in the log (default: a table of known GPUs, "
        "dense bf16; no MFU on CPU).", type=float,
    )

    def __post_init__(self):
        check_types(self)
        check_int("--log-interval", self.log_interval, 1)
        for name in ("wandb_exp_name", "wandb_save_dir"):
            if getattr(self, name) and not self.wandb_project:
                raise ConfigError(flag_of(name), getattr(self, name),
                                  "only with --wandb-project")
        check_int("--timing-log-level", self.timing_log_level, 0)
        check_float("--peak-tflops", self.peak_tflops, 1e-9, allow_none=True)

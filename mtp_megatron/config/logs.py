"""Logging and output flags (``logging:`` in YAML)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from mtp_megatron.config.fields import (
    check_int,
    option,
)


@dataclass(frozen=True)
class LoggingConfig:
    """What is printed and where the run's files go."""

    log_interval: int = option(10, "Print a log line every N iterations.", type=int)
    tensorboard_dir: Optional[str] = option(None, "Write tensorboard scalars here.", type=str)
    output_dir: str = option(
        "runs/default", "The run's directory (resolved config, logs).", type=str
    )

    def __post_init__(self):
        check_int("--log-interval", self.log_interval, 1)

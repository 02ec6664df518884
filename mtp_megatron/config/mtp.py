"""Multi-token prediction flags (``mtp:`` in YAML)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

from mtp_megatron.config.fields import (
    check_float,
    check_int,
    option,
)

logger = logging.getLogger(__name__)

@dataclass(frozen=True)
class MTPConfig:
    """Multi-token prediction (DeepSeek-V3): D sequential modules on the last stage."""

    mtp_num_layers: Optional[int] = option(
        None, "MTP depth D (omit to train without MTP).", type=int
    )
    mtp_loss_scaling_factor: float = option(
        0.1, "Weight of the MTP losses: lm + factor / D * sum_k mtp_k.", type=float
    )

    def __post_init__(self):
        check_int("--mtp-num-layers", self.mtp_num_layers, 1, allow_none=True)
        check_float("--mtp-loss-scaling-factor", self.mtp_loss_scaling_factor, 0.0)
        if self.enabled and self.mtp_loss_scaling_factor == 0:
            logger.warning(
                "--mtp-loss-scaling-factor=0 with --mtp-num-layers=%d: the MTP layers get no "
                "gradient and do not learn.", self.mtp_num_layers,
            )

    @property
    def enabled(self) -> bool:
        return self.mtp_num_layers is not None

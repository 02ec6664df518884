"""Multi-token prediction flags (``mtp:`` in YAML)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

from mtp_megatron.config.fields import (
    ConfigError,
    check_float,
    check_int,
    check_types,
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
    mtp_use_repeated_layer: bool = option(
        False, "One MTP layer, reused at every depth (D forwards, one set of weights; "
        "megatron-core >= 0.19).", type=bool,
    )
    mtp_detach_heads: bool = option(
        False, "MTP gradients stop at the MTP layers: the main model, embedding and output "
        "head learn from the lm loss only (megatron-core >= 0.19).", type=bool,
    )

    def __post_init__(self):
        check_types(self)
        check_int("--mtp-num-layers", self.mtp_num_layers, 1, allow_none=True)
        check_float("--mtp-loss-scaling-factor", self.mtp_loss_scaling_factor, 0.0)
        for flag, on in (("--mtp-use-repeated-layer", self.mtp_use_repeated_layer),
                         ("--mtp-detach-heads", self.mtp_detach_heads)):
            if on and not self.enabled:
                raise ConfigError(flag, True, "only with --mtp-num-layers (MTP is off)")
        if self.enabled and self.mtp_loss_scaling_factor == 0:
            logger.warning(
                "--mtp-loss-scaling-factor=0 with --mtp-num-layers=%d: the MTP layers get no "
                "gradient and do not learn.", self.mtp_num_layers,
            )

    @property
    def enabled(self) -> bool:
        return self.mtp_num_layers is not None

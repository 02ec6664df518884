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

SELF_DISTILL_MODES = ("greedy", "kl")


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

    # The acceptance stage (docs/speculative-decoding.md, training/self_distill.py).
    freeze_main_model: bool = option(
        False, "Train the MTP layers only: the embedding, decoder and output head keep their "
        "loaded weights and stay out of the optimizer (the acceptance stage: start it with "
        "--load CKPT --finetune).", type=bool,
    )
    mtp_self_distill: Optional[str] = option(
        None, "MTP targets from the main model itself, what speculative decoding verifies "
        "against: its greedy next tokens (greedy: cross entropy) or its distribution (kl). "
        "Needs --freeze-main-model.", type=str, choices=SELF_DISTILL_MODES,
    )
    mtp_self_distill_temperature: float = option(
        1.0, "Temperature of the main model's distribution for --mtp-self-distill kl.",
        type=float,
    )

    def __post_init__(self):
        check_types(self)
        check_int("--mtp-num-layers", self.mtp_num_layers, 1, allow_none=True)
        check_float("--mtp-loss-scaling-factor", self.mtp_loss_scaling_factor, 0.0)
        for flag, on in (("--mtp-use-repeated-layer", self.mtp_use_repeated_layer),
                         ("--mtp-detach-heads", self.mtp_detach_heads),
                         ("--freeze-main-model", self.freeze_main_model),
                         ("--mtp-self-distill", self.mtp_self_distill)):
            if on and not self.enabled:
                raise ConfigError(flag, on, "only with --mtp-num-layers (MTP is off)")
        self._check_self_distill()
        if self.enabled and self.mtp_loss_scaling_factor == 0:
            logger.warning(
                "--mtp-loss-scaling-factor=0 with --mtp-num-layers=%d: the MTP layers get no "
                "gradient and do not learn.", self.mtp_num_layers,
            )

    def _check_self_distill(self) -> None:
        if self.mtp_self_distill and not self.freeze_main_model:
            raise ConfigError(
                "--mtp-self-distill", self.mtp_self_distill,
                "only with --freeze-main-model",
                "the main model is the teacher: it must not move while the heads learn it",
            )
        if self.mtp_self_distill_temperature <= 0:
            raise ConfigError("--mtp-self-distill-temperature",
                              self.mtp_self_distill_temperature, "a number > 0")
        if self.mtp_self_distill != "kl" and self.mtp_self_distill_temperature != 1.0:
            logger.warning("--mtp-self-distill-temperature has no effect without "
                           "--mtp-self-distill kl")
        if self.freeze_main_model and self.mtp_loss_scaling_factor == 0:
            raise ConfigError("--mtp-loss-scaling-factor", 0.0, "a number > 0 with "
                              "--freeze-main-model", "nothing else would be trained")

    @property
    def enabled(self) -> bool:
        return self.mtp_num_layers is not None

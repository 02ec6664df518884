"""Multi-token prediction flags (``mtp:`` in YAML).

The objective these flags define (docs/mtp-objective.md)::

    lm + factor(iteration) * sum_k w_k * mtp_k        sum_k w_k = 1

``--mtp-depth-weights`` gives the ``w_k`` (``uniform``: megatron-core's ``1 / D`` each);
the ``--mtp-loss-scaling-factor*`` flags give ``factor(iteration)``
(``training/mtp_weighting.py`` computes both and hands them to megatron-core).

    MTPConfig(mtp_num_layers=3, mtp_depth_weights="exponential").depth_weights()
    # (0.5714..., 0.2857..., 0.1428...) = (1, 1/2, 1/4) / 1.75
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Optional, Tuple, Union

from mtp_megatron.config.fields import (
    ConfigError,
    check_float,
    check_int,
    check_types,
    option,
)

logger = logging.getLogger(__name__)

DEPTH_WEIGHT_SCHEMES = ("uniform", "linear", "exponential")
FACTOR_DECAY_STYLES = ("constant", "step", "linear", "cosine")
WEIGHTS_FLAG = "--mtp-depth-weights"
_WEIGHTS_ALLOWED = ("uniform, linear, exponential, or one positive number per depth "
                    "separated by commas (W1,W2,...)")
SELF_DISTILL_MODES = ("greedy", "kl")


@dataclass(frozen=True)
class MTPConfig:
    """Multi-token prediction (DeepSeek-V3): D sequential modules on the last stage."""

    mtp_num_layers: Optional[int] = option(
        None, "MTP depth D (omit to train without MTP).", type=int
    )
    mtp_loss_scaling_factor: float = option(
        0.1, "Weight of the MTP losses, their share of the objective: "
        "lm + factor * sum_k w_k mtp_k (the peak value of a schedule).", type=float
    )
    mtp_depth_weights: str = option(
        "uniform", "Weights w_k of the depths, normalised to sum to 1: uniform (1/D each, "
        "megatron-core's), linear (D, D-1, ..., 1), exponential (1, 1/2, ..., 2^-(D-1)) "
        "or W1,W2,... (D positive numbers).", type=str,
    )
    mtp_loss_scaling_factor_warmup_iters: int = option(
        0, "Ramp the factor linearly from 0 over this many iterations (the LR warmup's "
        "rule).", type=int,
    )
    mtp_loss_scaling_factor_final: Optional[float] = option(
        None, "The factor after the decay (default: --mtp-loss-scaling-factor).", type=float
    )
    mtp_loss_scaling_factor_decay_style: str = option(
        "constant", "How the factor goes from --mtp-loss-scaling-factor to "
        "--mtp-loss-scaling-factor-final after the warmup.", type=str,
        choices=FACTOR_DECAY_STYLES,
    )
    mtp_loss_scaling_factor_decay_iters: Optional[int] = option(
        None, "The iteration where the factor's decay ends (step: where it switches to "
        "the final value; default: --train-iters).", type=int,
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
        object.__setattr__(self, "mtp_depth_weights", _weights_text(self.mtp_depth_weights))
        check_types(self)
        check_int("--mtp-num-layers", self.mtp_num_layers, 1, allow_none=True)
        check_float("--mtp-loss-scaling-factor", self.mtp_loss_scaling_factor, 0.0)
        self._check_schedule()
        if self.enabled:
            self.depth_weights()  # a ConfigError naming the flag if they do not fit D
        for flag, value, given in self._options_needing_mtp():
            if given and not self.enabled:
                raise ConfigError(flag, value, "only with --mtp-num-layers (MTP is off)")
        self._check_self_distill()
        if self.enabled and self.mtp_loss_scaling_factor == 0:
            logger.warning(
                "--mtp-loss-scaling-factor=0 with --mtp-num-layers=%d: the MTP layers get no "
                "gradient and do not learn.", self.mtp_num_layers,
            )

    def _options_needing_mtp(self):
        """(flag, value, whether it was set) of every option that needs MTP."""
        warmup = self.mtp_loss_scaling_factor_warmup_iters
        final = self.mtp_loss_scaling_factor_final
        decay_iters = self.mtp_loss_scaling_factor_decay_iters
        return (("--mtp-use-repeated-layer", True, self.mtp_use_repeated_layer),
                ("--mtp-detach-heads", True, self.mtp_detach_heads),
                (WEIGHTS_FLAG, self.mtp_depth_weights, self.mtp_depth_weights != "uniform"),
                ("--mtp-loss-scaling-factor-warmup-iters", warmup, warmup != 0),
                ("--mtp-loss-scaling-factor-final", final, final is not None),
                ("--mtp-loss-scaling-factor-decay-style",
                 self.mtp_loss_scaling_factor_decay_style, self.decays),
                ("--mtp-loss-scaling-factor-decay-iters", decay_iters, decay_iters is not None),
                ("--freeze-main-model", True, self.freeze_main_model),
                ("--mtp-self-distill", self.mtp_self_distill, self.mtp_self_distill is not None))

    def _check_schedule(self) -> None:
        """The factor schedule's rules within this section (``RunConfig`` checks it
        against ``--train-iters``)."""
        check_int("--mtp-loss-scaling-factor-warmup-iters",
                  self.mtp_loss_scaling_factor_warmup_iters, 0)
        check_float("--mtp-loss-scaling-factor-final", self.mtp_loss_scaling_factor_final,
                    0.0, allow_none=True)
        check_int("--mtp-loss-scaling-factor-decay-iters",
                  self.mtp_loss_scaling_factor_decay_iters, 1, allow_none=True)
        if self.decays:
            return
        style = "--mtp-loss-scaling-factor-decay-style constant"
        final = self.mtp_loss_scaling_factor_final
        if final is not None and final != self.mtp_loss_scaling_factor:
            raise ConfigError("--mtp-loss-scaling-factor-final", final,
                              "a decay style: --mtp-loss-scaling-factor-decay-style step, "
                              "linear or cosine", f"with {style} it is never reached")
        if self.mtp_loss_scaling_factor_decay_iters is not None:
            raise ConfigError("--mtp-loss-scaling-factor-decay-iters",
                              self.mtp_loss_scaling_factor_decay_iters,
                              "only with --mtp-loss-scaling-factor-decay-style step, linear "
                              "or cosine", f"with {style} nothing decays")

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

    @property
    def decays(self) -> bool:
        return self.mtp_loss_scaling_factor_decay_style != "constant"

    @property
    def final_factor(self) -> float:
        final = self.mtp_loss_scaling_factor_final
        return self.mtp_loss_scaling_factor if final is None else final

    def depth_weights(self) -> Tuple[float, ...]:
        """The normalised ``w_1..w_D`` (sum 1); ``(1/D,) * D`` for ``uniform``."""
        return normalised_depth_weights(self.mtp_depth_weights, self.mtp_num_layers or 0)


def _weights_text(value: Union[str, list, tuple]) -> str:
    """``--mtp-depth-weights`` as text: a YAML list ``[1, 0.5]`` becomes ``"1,0.5"``."""
    if isinstance(value, (list, tuple)) and value and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        return ",".join(repr(v) for v in value)
    if not isinstance(value, str):
        raise ConfigError(WEIGHTS_FLAG, value, _WEIGHTS_ALLOWED)
    return value.strip().replace(" ", "")


def raw_depth_weights(text: str, depth: int) -> Tuple[float, ...]:
    """The weights before normalising: a scheme's ``linear`` (D..1), ``exponential``
    (1, 1/2, ...) or ``uniform`` (1 each), or the explicit list (checked: D positive
    finite numbers)."""
    if text == "uniform":
        return (1.0,) * depth
    if text == "linear":
        return tuple(float(depth - k) for k in range(depth))
    if text == "exponential":
        return tuple(2.0 ** -k for k in range(depth))
    try:
        values = tuple(float(part) for part in text.split(","))
    except ValueError:
        raise ConfigError(WEIGHTS_FLAG, text, _WEIGHTS_ALLOWED) from None
    bad = [v for v in values if not (math.isfinite(v) and v > 0)]
    if bad:
        hint = "; a depth that should not learn is a smaller --mtp-num-layers" \
            if bad[0] == 0 else ""
        raise ConfigError(WEIGHTS_FLAG, text, "positive finite numbers",
                          f"{bad[0]!r} is not{hint}")
    if len(values) != depth:
        raise ConfigError(WEIGHTS_FLAG, text,
                          f"{depth} numbers, one per depth (--mtp-num-layers={depth}), "
                          "or uniform, linear, exponential", f"{len(values)} given")
    return values


def normalised_depth_weights(text: str, depth: int) -> Tuple[float, ...]:
    """``raw_depth_weights`` divided by their sum; exactly ``1/D`` each for uniform."""
    raw = raw_depth_weights(text, depth)
    total = math.fsum(raw)
    return tuple(v / total for v in raw)

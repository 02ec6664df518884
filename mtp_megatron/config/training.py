"""Batch, optimiser, schedule and precision flags (``training:`` in YAML)."""

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

FP8_FORMATS = ("e4m3", "hybrid")
FP8_RECIPES = ("delayed", "tensorwise", "mxfp8", "blockwise")
LR_DECAY_STYLES = ("cosine", "linear", "constant")
RECOMPUTE_GRANULARITIES = ("full", "selective")
RECOMPUTE_METHODS = ("uniform", "block")
CROSS_ENTROPY_FUSION_IMPLS = ("native", "te")


@dataclass(frozen=True)
class TrainingConfig:
    """Batch, optimiser, schedule and precision."""

    micro_batch_size: int = option(4, "Samples per microbatch per data parallel rank.", type=int)
    global_batch_size: int = option(16, "Samples per optimizer step over all ranks.", type=int)
    train_iters: int = option(200, "Optimizer steps to run.", type=int)
    lr: float = option(2e-3, "Peak learning rate.", type=float)
    min_lr: float = option(2e-4, "Learning rate at the end of decay.", type=float)
    lr_warmup_iters: Optional[int] = option(
        None, "Linear warmup steps (default: 10% of the decay steps).", type=int
    )
    lr_decay_iters: Optional[int] = option(
        None, "Steps over which to decay (default: --train-iters).", type=int
    )
    lr_decay_style: str = option("cosine", "Decay after warmup.", type=str, choices=LR_DECAY_STYLES)
    weight_decay: float = option(0.01, "AdamW weight decay.", type=float)
    adam_beta1: float = option(0.9, "Adam beta1.", type=float)
    adam_beta2: float = option(0.95, "Adam beta2.", type=float)
    clip_grad: float = option(1.0, "Gradient clipping by global norm (0 disables).", type=float)
    seed: int = option(1234, "Random seed.", type=int)
    bf16: bool = option(False, "bfloat16 mixed precision.", type=bool)
    fp16: bool = option(False, "float16 mixed precision with loss scaling.", type=bool)
    fp8_format: Optional[str] = option(
        None, "FP8 through Transformer Engine.", type=str, choices=FP8_FORMATS
    )
    fp8_recipe: str = option("delayed", "FP8 scaling recipe.", type=str, choices=FP8_RECIPES)
    fp8_amax_history_len: int = option(1024, "FP8 amax history (delayed recipe).", type=int)
    skip_nan_steps: bool = option(
        False, "Skip the update of a step whose loss or gradients are NaN/Inf (default: stop).",
        type=bool,
    )
    calculate_per_token_loss: bool = option(
        False, "Average the loss over all tokens of the global batch, not per microbatch.",
        type=bool,
    )
    recompute_granularity: Optional[str] = option(
        None, "Activation recomputation: full (whole layers) or selective (core attention).",
        type=str, choices=RECOMPUTE_GRANULARITIES,
    )
    recompute_method: Optional[str] = option(
        None, "With --recompute-granularity full: uniform (every layer, in groups of "
        "--recompute-num-layers) or block (the first --recompute-num-layers of each stage).",
        type=str, choices=RECOMPUTE_METHODS,
    )
    recompute_num_layers: Optional[int] = option(
        None, "Layers per recomputed group (uniform) or recomputed layers per stage (block).",
        type=int,
    )
    cross_entropy_loss_fusion: bool = option(
        False, "Fused (vocab-parallel) cross entropy for the LM and MTP heads.", type=bool
    )
    cross_entropy_fusion_impl: str = option(
        "native", "The fused cross entropy: native (megatron-core) or te (Transformer Engine).",
        type=str, choices=CROSS_ENTROPY_FUSION_IMPLS,
    )

    def __post_init__(self):
        check_types(self)
        self._check_recompute()
        for name in ("micro_batch_size", "global_batch_size", "train_iters"):
            check_int(flag_of(name), getattr(self, name), 1)
        check_int("--lr-warmup-iters", self.lr_warmup_iters, 0, allow_none=True)
        check_int("--lr-decay-iters", self.lr_decay_iters, 1, allow_none=True)
        check_int("--fp8-amax-history-len", self.fp8_amax_history_len, 1)
        check_int("--seed", self.seed, 0)
        for name in ("lr", "min_lr", "weight_decay", "clip_grad"):
            check_float(flag_of(name), getattr(self, name), 0.0)
        for name in ("adam_beta1", "adam_beta2"):
            value = getattr(self, name)
            check_float(flag_of(name), value, 0.0)
            if value >= 1:
                raise ConfigError(flag_of(name), value, "a number in [0, 1)")
        if self.min_lr > self.lr:
            raise ConfigError("--min-lr", self.min_lr, f"at most --lr={self.lr}")
        if self.warmup_iters >= self.decay_iters:
            raise ConfigError(
                "--lr-warmup-iters", self.lr_warmup_iters,
                f"fewer than --lr-decay-iters (or --train-iters) = {self.decay_iters}",
            )
        if self.bf16 and self.fp16:
            raise ConfigError("--fp16", True, "only one of --bf16 and --fp16")

    def _check_recompute(self) -> None:
        """megatron-core's TransformerConfig rules, said with our flag names."""
        check_int("--recompute-num-layers", self.recompute_num_layers, 1, allow_none=True)
        if self.recompute_granularity != "full":
            for name in ("recompute_method", "recompute_num_layers"):
                if getattr(self, name) is not None:
                    raise ConfigError(
                        flag_of(name), getattr(self, name),
                        "only with --recompute-granularity full",
                        f"--recompute-granularity is {self.recompute_granularity}",
                    )
            return
        if self.recompute_method is None:
            raise ConfigError("--recompute-method", None, "uniform or block",
                              "--recompute-granularity full needs it")
        if self.recompute_num_layers is None:
            raise ConfigError("--recompute-num-layers", None, "an integer >= 1",
                              "--recompute-granularity full needs it")

    @property
    def decay_iters(self) -> int:
        return self.lr_decay_iters or self.train_iters

    @property
    def warmup_iters(self) -> int:
        if self.lr_warmup_iters is None:
            return self.decay_iters // 10
        return self.lr_warmup_iters

"""Optimizer and LR schedule: megatron-core's Adam(W) and OptimizerParamScheduler.

    optimizer = build_optimizer(chunks, training=cfg.training, parallel=cfg.parallel)
    scheduler = build_scheduler(optimizer, training=cfg.training)

What a resume does with their saved state (the LR schedule follows Megatron-LM's
``--override-opt-param-scheduler`` / ``--use-checkpoint-opt-param-scheduler``) is
``checkpoint/optimizer_state.py``.
"""

from __future__ import annotations

import logging

import torch
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from mtp_megatron.config import ParallelConfig, TrainingConfig

logger = logging.getLogger("mtp_megatron")


def build_optimizer(model_chunks, *, training: TrainingConfig, parallel: ParallelConfig,
                    params_dtype: torch.dtype = torch.float32):
    """megatron-core Adam over all chunks (distributed over DP with
    --use-distributed-optimizer, loss-scaled with --fp16)."""
    config = OptimizerConfig(
        optimizer="adam",
        lr=training.lr,
        min_lr=training.min_lr,
        weight_decay=training.weight_decay,
        adam_beta1=training.adam_beta1,
        adam_beta2=training.adam_beta2,
        clip_grad=training.clip_grad,
        bf16=training.bf16,
        fp16=training.fp16,
        params_dtype=params_dtype,
        use_distributed_optimizer=parallel.use_distributed_optimizer,
        loss_scale=None,
        initial_loss_scale=2.0**16,
        hysteresis=2,
    )
    return get_megatron_optimizer(config, model_chunks)


def build_scheduler(optimizer, *, training: TrainingConfig) -> OptimizerParamScheduler:
    """Warmup then cosine/linear/constant decay, stepped once per iteration."""
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=training.lr,
        min_lr=training.min_lr,
        lr_warmup_steps=training.warmup_iters,
        lr_decay_steps=training.decay_iters,
        lr_decay_style=training.lr_decay_style,
        start_wd=training.weight_decay,
        end_wd=training.weight_decay,
        wd_incr_steps=training.train_iters,
        wd_incr_style="constant",
    )

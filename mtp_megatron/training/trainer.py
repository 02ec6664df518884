"""The training loop, in the shape of megatron-core's run_simple_mcore_train_loop.py:

    initialize_model_parallel -> build model -> optimizer -> for each step:
    forward_backward_func(forward_step, ...) -> optimizer.step() -> scheduler.step()

    trainer = Trainer(cfg)      # process groups, model, optimizer, data
    trainer.train()             # --train-iters steps, logging every --log-interval
    trainer.close()
"""

from __future__ import annotations

import logging
import os
import time
from typing import List, Optional

import torch
from megatron.core import parallel_state
from megatron.core.distributed import finalize_model_grads
from megatron.core.pipeline_parallel import get_forward_backward_func

from mtp_megatron.checkpoint import TrainState, load_checkpoint, read_tracker, save_checkpoint
from mtp_megatron.config import RunConfig, save_config
from mtp_megatron.data.datasets import build_datasets, prepare_data
from mtp_megatron.data.iterator import GlobalBatchSampler
from mtp_megatron.model.builder import (
    build_model,
    params_dtype,
    transformer_config,
    vocab_size_for,
)
from mtp_megatron.model.counting import flops_per_token
from mtp_megatron.runtime import distributed
from mtp_megatron.training.evaluate import Evaluator
from mtp_megatron.training.faults import ExitConditions, NonFiniteStepError, step_is_finite
from mtp_megatron.training.losses import collect_mtp_losses, forward_step, reduce_lm_loss
from mtp_megatron.training.metrics import MetricsLogger, StepMetrics
from mtp_megatron.training.optim import build_optimizer, build_scheduler

logger = logging.getLogger("mtp_megatron")


def log_last_rank(message: str) -> None:
    if distributed.is_last_rank():
        logger.info(message)


class Trainer:
    """Owns the model chunks, optimizer, scheduler and data of one rank."""

    def __init__(self, cfg: RunConfig, launch: distributed.LaunchEnv, transformer_impl: str):
        self.cfg = cfg
        self.device = distributed.initialize(cfg, launch)
        self.data_plan = prepare_data(data=cfg.data, model=cfg.model)
        tokenizer_vocab = self.data_plan.vocab_size
        self.vocab_size = vocab_size_for(cfg, tokenizer_vocab)
        on_cpu = self.device.type == "cpu"
        self.tconfig = transformer_config(cfg, on_cpu=on_cpu)
        self.model = build_model(cfg, self.tconfig, transformer_impl, self.vocab_size, self.device)
        self.optimizer = build_optimizer(
            self.model, training=cfg.training, parallel=cfg.parallel,
            params_dtype=params_dtype(cfg),
        )
        self.scheduler = build_scheduler(self.optimizer, training=cfg.training)
        self._wire_model_config()
        self.state = TrainState(self.model, self.optimizer, self.scheduler, cfg,
                                vocab_size=cfg.model.vocab_size or tokenizer_vocab)
        self._maybe_resume()
        self.exit = ExitConditions(cfg.checkpoint)
        self.sampler = self._build_sampler()
        self.evaluator = self._build_evaluator()
        self.metrics = MetricsLogger(
            log_interval=cfg.logging.log_interval,
            train_iters=cfg.training.train_iters,
            tokens_per_step=cfg.training.global_batch_size * cfg.model.seq_length,
            flops_per_token=flops_per_token(cfg, self.vocab_size)["total"],
            is_logging_rank=distributed.is_last_rank(),
            output_dir=cfg.logging.output_dir,
            tensorboard_dir=cfg.logging.tensorboard_dir,
        )
        if torch.distributed.get_rank() == 0:
            save_config(cfg, os.path.join(cfg.logging.output_dir, "config.yaml"))

    def _wire_model_config(self) -> None:
        """The hooks megatron-core's schedules call: grad sync, finalize, loss scaling."""
        chunks = self.model
        self.tconfig.no_sync_func = [c.no_sync for c in chunks] if len(chunks) > 1 \
            else chunks[0].no_sync
        self.tconfig.finalize_model_grads_func = finalize_model_grads
        if self.cfg.training.fp16:
            self.tconfig.grad_scale_func = self.optimizer.scale_loss

    def _build_sampler(self) -> GlobalBatchSampler:
        train = self.cfg.training
        log_last_rank(f"data: {self.data_plan.description}")
        self.datasets = build_datasets(
            self.data_plan, data=self.cfg.data, model=self.cfg.model, training=train
        )
        return GlobalBatchSampler(
            self.datasets.train,
            micro_batch_size=train.micro_batch_size,
            global_batch_size=train.global_batch_size,
            dp_rank=parallel_state.get_data_parallel_rank(),
            dp_size=parallel_state.get_data_parallel_world_size(),
            consumed_samples=self.state.consumed_samples,
        )

    def _build_evaluator(self) -> Optional[Evaluator]:
        if self.datasets.valid is None or not self.cfg.data.eval_iters:
            return None
        train = self.cfg.training
        return Evaluator(
            self.model, self.datasets.valid, micro_batch_size=train.micro_batch_size,
            global_batch_size=train.global_batch_size, seq_length=self.cfg.model.seq_length,
            mtp_depth=self.cfg.mtp.mtp_num_layers or 0, output_dir=self.cfg.logging.output_dir,
            is_logging_rank=distributed.is_last_rank(),
        )

    def evaluate(self) -> Optional[dict]:
        """Validation metrics (on last-stage ranks); every rank must call it."""
        if self.evaluator is None:
            return None
        return self.evaluator.run(self.iteration, self.cfg.data.eval_iters)

    @property
    def iteration(self) -> int:
        return self.state.iteration

    def _maybe_resume(self) -> None:
        """Auto-resume: the latest complete checkpoint under --load (or --save), if any."""
        ckpt = self.cfg.checkpoint
        root = ckpt.resume_from
        if root is None:
            return
        if not ckpt.load and read_tracker(root) is None:
            return  # --save alone and nothing saved yet: a fresh run
        load_checkpoint(self.state, root, checkpoint=ckpt)

    def save(self) -> None:
        if self.cfg.checkpoint.save:
            self.state.consumed_samples = self.sampler.consumed_samples
            save_checkpoint(self.state, self.cfg.checkpoint.save)

    def train_step(self) -> StepMetrics:
        """One optimizer step over the global batch; returns what the log needs."""
        start = time.perf_counter()
        for chunk in self.model:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        microbatches = self.sampler.next_step()
        data = [iter(microbatches) for _ in self.model]
        reports = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=data if len(data) > 1 else data[0],
            model=self.model,
            num_microbatches=len(microbatches),
            seq_length=self.cfg.model.seq_length,
            micro_batch_size=self.cfg.training.micro_batch_size,
            forward_only=False,
        )
        iteration = self.iteration + 1
        if step_is_finite(self.model, reports, iteration, check_grads=not self.cfg.training.fp16):
            updated, grad_norm, _ = self.optimizer.step()
        elif self.cfg.training.skip_nan_steps:
            logger.warning("iteration %d: NaN/Inf in the loss or gradients, update skipped "
                           "(--skip-nan-steps)", iteration)
            updated, grad_norm = False, None
        else:
            raise NonFiniteStepError(iteration)
        if updated:
            self.scheduler.step(increment=1)
        self.state.iteration = iteration
        self.state.consumed_samples = self.sampler.consumed_samples
        return StepMetrics(
            iteration=self.iteration,
            lm_loss=reduce_lm_loss(reports) if parallel_state.is_pipeline_last_stage() else None,
            mtp_losses=collect_mtp_losses(len(microbatches)),
            lr=self.optimizer.param_groups[0]["lr"],
            grad_norm=grad_norm,
            seconds=time.perf_counter() - start,
            skipped=not updated,
        )

    def train(self) -> List[StepMetrics]:
        for chunk in self.model:
            chunk.train()
        history = []
        ckpt = self.cfg.checkpoint
        saved_at = evaluated_at = None
        eval_interval = self.cfg.data.eval_interval
        while self.iteration < self.cfg.training.train_iters:
            step = self.train_step()
            self.metrics.record(step)
            history.append(step)
            if eval_interval and self.iteration % eval_interval == 0:
                self.evaluate()
                evaluated_at = self.iteration
            if ckpt.save_interval and self.iteration % ckpt.save_interval == 0:
                self.save()
                saved_at = self.iteration
            reason = self.exit.check(self.iteration)
            if reason:
                log_last_rank(f"stopping after iteration {self.iteration}: {reason}")
                break
        if self.iteration >= self.cfg.training.train_iters and evaluated_at != self.iteration:
            self.evaluate()  # the final evaluation
        if ckpt.save and saved_at != self.iteration:
            self.save()
        return history

    def close(self) -> None:
        self.metrics.close()
        distributed.shutdown()

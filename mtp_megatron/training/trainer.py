"""The training loop, in the shape of megatron-core's run_simple_mcore_train_loop.py:

    initialize_model_parallel -> build model -> optimizer -> for each step:
    forward_backward_func(forward_step, ...) -> optimizer.step() -> scheduler.step()

    launch, transformer_impl = preflight(cfg)       # mtp_megatron.runtime.preflight
    trainer = Trainer(cfg, launch, transformer_impl)  # process groups, model, optimizer, data
    trainer.train()             # --train-iters steps, logging every --log-interval
    trainer.close()

The hot loop keeps losses on the device and makes one small collective per step (the
NaN/exit agreement, ``training/faults.py``); losses are reduced at ``--log-interval``
(``training/losses.py``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from typing import Callable, Optional

import torch
from megatron.core import parallel_state
from megatron.core.distributed import finalize_model_grads
from megatron.core.pipeline_parallel import get_forward_backward_func

from mtp_megatron.checkpoint import TrainState, load_checkpoint, read_tracker, save_checkpoint
from mtp_megatron.checkpoint.layout import iteration_dir
from mtp_megatron.checkpoint.lock import acquire_on_rank0
from mtp_megatron.checkpoint.vocab import vocab_rows
from mtp_megatron.config import RunConfig, save_config, to_dict
from mtp_megatron.data.datasets import build_datasets, prepare_data
from mtp_megatron.data.loader import build_step_loader
from mtp_megatron.model.builder import build_model, params_dtype, transformer_config
from mtp_megatron.model.counting import flops_per_token
from mtp_megatron.model.padding import mask_dead_rows
from mtp_megatron.runtime import distributed
from mtp_megatron.training.evaluate import Evaluator
from mtp_megatron.training.faults import (
    ExitConditions,
    checked_optimizer_step,
    inject_nan_for_tests,
    stop_record_path,
    write_stop_record,
)
from mtp_megatron.training.losses import LossWindow, forward_step, step_loss_sums
from mtp_megatron.training.metrics import MetricsLogger, StepMetrics, peak_tflops_for
from mtp_megatron.training.moe_stats import MoEStats
from mtp_megatron.training.mtp_weighting import MTPWeighting
from mtp_megatron.training.optim import build_optimizer, build_scheduler
from mtp_megatron.training.progress import phase
from mtp_megatron.training.self_distill import SelfDistill
from mtp_megatron.training.timers import StepTimers
from mtp_megatron.training.writers import MetricsWriter

logger = logging.getLogger("mtp_megatron")


def log_last_rank(message: str) -> None:
    if distributed.is_last_rank():
        logger.info(message)


class Trainer:
    """Owns the model chunks, optimizer, scheduler and data of one rank."""

    def __init__(self, cfg: RunConfig, launch: distributed.LaunchEnv, transformer_impl: str):
        self.cfg = cfg
        self.device = distributed.initialize(cfg, launch)
        self.save_lock = acquire_on_rank0(cfg.checkpoint.save)  # one writer per --save
        with phase("preparing data", log=log_last_rank):  # the first run builds the corpus
            self.data_plan = prepare_data(data=cfg.data, model=cfg.model)
        tokenizer_vocab = self.data_plan.vocab_size
        # padded rows: a resume keeps the checkpoint's (checkpoint/vocab.py)
        rows = vocab_rows(cfg, vocab_size=cfg.model.vocab_size or tokenizer_vocab)
        self.vocab_size = rows.padded
        on_cpu = self.device.type == "cpu"
        self.tconfig = transformer_config(cfg, on_cpu=on_cpu)
        self.model = build_model(cfg, self.tconfig, transformer_impl, self.vocab_size, self.device)
        mask_dead_rows(self.model, live=rows.live, padded=rows.padded)
        self.optimizer = build_optimizer(
            self.model, training=cfg.training, parallel=cfg.parallel,
            params_dtype=params_dtype(cfg),
        )
        self.scheduler = build_scheduler(self.optimizer, training=cfg.training)
        self.moe_stats = MoEStats.build(self.model, cfg, self.device)  # None when dense
        # --mtp-self-distill: the MTP layers learn the main model's own predictions
        self.self_distill = SelfDistill.install(
            self.model, mtp=cfg.mtp, vocab_size=cfg.model.vocab_size or tokenizer_vocab)
        self._wire_model_config()
        # the MTP factor of each iteration and the depth weights (training/mtp_weighting.py)
        self.mtp_weighting = MTPWeighting.for_run(cfg, chunks=self.model, tconfig=self.tconfig,
                                                  forward_step=forward_step)
        self.state = TrainState(self.model, self.optimizer, self.scheduler, cfg,
                                vocab_size=cfg.model.vocab_size or tokenizer_vocab,
                                live_rows=rows.live)
        self.committed_at: Optional[int] = None  # the iteration --save already holds
        self._maybe_resume()
        self.exit = ExitConditions(cfg.checkpoint)
        self.writer = MetricsWriter.for_run(cfg.logging, enabled=distributed.is_last_rank(),
                                            config=to_dict(cfg), start_iteration=self.iteration)
        self.async_saver = None
        if cfg.checkpoint.async_save:
            from mtp_megatron.checkpoint.async_save import AsyncSaver

            self.async_saver = AsyncSaver()
        self.sampler = self._build_sampler()
        self.evaluator = self._build_evaluator()
        self.losses = LossWindow(num_microbatches=self.sampler.num_microbatches)
        self.timers = StepTimers(cfg.logging.timing_log_level)
        self.metrics = MetricsLogger(
            log_interval=cfg.logging.log_interval,
            train_iters=cfg.training.train_iters,
            tokens_per_step=cfg.training.global_batch_size * cfg.model.seq_length,
            flops_per_token=flops_per_token(cfg, self.vocab_size)["total"],
            is_logging_rank=distributed.is_last_rank(),
            writer=self.writer,
            world_size=torch.distributed.get_world_size(),
            peak_tflops=cfg.logging.peak_tflops or self._table_peak(),
        )
        if torch.distributed.get_rank() == 0:
            save_config(cfg, os.path.join(cfg.logging.output_dir, "config.yaml"))
            with contextlib.suppress(FileNotFoundError):  # an earlier run's early stop
                os.remove(stop_record_path(cfg.logging.output_dir))

    def _table_peak(self):
        if self.device.type != "cuda":
            return None
        return peak_tflops_for(torch.cuda.get_device_name(self.device))

    def _wire_model_config(self) -> None:
        """The hooks megatron-core's schedules call: grad sync, finalize, loss scaling,
        and (as Megatron-LM wires them) the overlapped grad-reduce / param-gather."""
        chunks, par = self.model, self.cfg.parallel

        def one_or_list(funcs):
            return funcs if len(funcs) > 1 else funcs[0]

        self.tconfig.no_sync_func = one_or_list([c.no_sync for c in chunks])
        if par.overlap_grad_reduce:
            self.tconfig.grad_sync_func = one_or_list([c.start_grad_sync for c in chunks])
        if par.overlap_param_gather:
            self.tconfig.param_sync_func = one_or_list([c.start_param_sync for c in chunks])
        self.tconfig.finalize_model_grads_func = finalize_model_grads
        if self.cfg.training.fp16:
            self.tconfig.grad_scale_func = self.optimizer.scale_loss

    def _build_sampler(self):
        """This rank's step loader: the sampler itself, or its --num-workers DataLoader."""
        train = self.cfg.training
        log_last_rank(f"data: {self.data_plan.description}")
        with phase("building datasets", log=log_last_rank):
            self.datasets = build_datasets(
                self.data_plan, data=self.cfg.data, model=self.cfg.model, training=train
            )
        return build_step_loader(
            self.datasets.train, num_workers=self.cfg.data.num_workers,
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
            mtp_depth=self.cfg.mtp.mtp_num_layers or 0, writer=self.writer,
            tokens_per_step=train.global_batch_size * self.cfg.model.seq_length,
            is_logging_rank=distributed.is_last_rank(),
            stop_check=lambda: self.exit.check(None, self.device),  # a signal mid-evaluation
        )

    def evaluate(self) -> Optional[dict]:
        """Validation metrics (on last-stage ranks); every rank must call it."""
        if self.evaluator is None:
            return None
        with self.timers("eval"), self._params_gathered():
            return self.evaluator.run(self.iteration, self.cfg.data.eval_iters)

    def _evaluation_stopped(self) -> Optional[str]:
        """The stop reason that cut the last evaluation short, if any."""
        return self.evaluator.stopped if self.evaluator is not None else None

    @contextlib.contextmanager
    def _params_gathered(self):
        """With --overlap-param-gather the weights are gathered lazily, by the next
        training forward's pre-hooks: finish the gather (and pause the hooks) around
        evaluation and saving, as Megatron-LM does."""
        if not self.cfg.parallel.overlap_param_gather:
            yield
            return
        for chunk in self.model:
            chunk.disable_forward_pre_hook(param_sync=True)
        try:
            yield
        finally:
            for chunk in self.model:
                chunk.enable_forward_pre_hook()

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
        if ckpt.save and not ckpt.finetune and _same_dir(root, ckpt.save):
            self.committed_at = self.iteration  # already in --save: never re-saved

    def save(self) -> None:
        if self.cfg.checkpoint.save:
            self.state.consumed_samples = self.sampler.consumed_samples
            with self.timers("checkpoint"), self._params_gathered():
                if self.async_saver is not None:
                    self.async_saver.save(self.state, self.cfg.checkpoint.save)
                else:
                    save_checkpoint(self.state, self.cfg.checkpoint.save)

    def run_step(self) -> StepMetrics:
        """One optimizer step over the global batch, its losses left on the device (in
        ``self.losses``): the hot loop's step. Host syncs: megatron-core's grad norm and
        the one NaN/exit agreement."""
        start = time.perf_counter()
        with self.timers("data"):
            microbatches = self.sampler.next_step()
        iteration = self.iteration + 1
        mtp_factor = self.mtp_weighting.start_iteration(iteration)
        with self.timers("forward-backward"):
            for chunk in self.model:
                chunk.zero_grad_buffer()
            self.optimizer.zero_grad()
            data = [iter(microbatches) for _ in self.model]
            reports = get_forward_backward_func()(
                forward_step_func=self.mtp_weighting.forward_step,
                data_iterator=data if len(data) > 1 else data[0],
                model=self.model,
                num_microbatches=len(microbatches),
                seq_length=self.cfg.model.seq_length,
                micro_batch_size=self.cfg.training.micro_batch_size,
                forward_only=False,
            )
        loss_sums = step_loss_sums(reports)
        self.losses.add(loss_sums)
        with self.timers("optimizer"):
            inject_nan_for_tests(self.model, iteration)
            outcome = checked_optimizer_step(
                self.optimizer, iteration=iteration, loss_sums=loss_sums,
                exit_conditions=self.exit, skip_nan_steps=self.cfg.training.skip_nan_steps,
                device=self.device,
            )
            if outcome.nonfinite:
                logger.warning("iteration %d: NaN/Inf in the loss or gradients, update skipped "
                               "(--skip-nan-steps)", iteration)
            if outcome.updated:
                self.scheduler.step(increment=1)
        self.state.iteration = iteration
        self.state.consumed_samples = self.sampler.consumed_samples
        return StepMetrics(
            iteration=self.iteration, lm_loss=None, mtp_losses=None,
            lr=self.optimizer.param_groups[0]["lr"], grad_norm=outcome.grad_norm,
            seconds=time.perf_counter() - start, skipped=not outcome.updated,
            stop_reason=outcome.stop_reason, mtp_factor=mtp_factor,
        )

    def train_step(self) -> StepMetrics:
        """One step with its losses reduced right away (tests, tools; one host sync more
        than the loop's :meth:`run_step`). Every rank must call it."""
        step = self.run_step()
        window = self.losses.flush()
        step.lm_loss = window.lm[-1] if window.lm else None
        step.mtp_losses = window.mtp
        if self.moe_stats is not None:
            step.moe = self.moe_stats.flush(1, self.losses.num_microbatches)
        return step

    def _log_window(self) -> None:
        """Reduce the window's losses (every rank) and print the log line (last rank)."""
        losses = self.losses.flush()
        moe = None
        if self.moe_stats is not None:
            moe = self.moe_stats.flush(losses.steps, self.losses.num_microbatches)
        extra = self.self_distill.flush() if self.self_distill else None  # --mtp-self-distill
        self.metrics.log(losses, self.timers.per_iteration(losses.steps), moe=moe, extra=extra)
        if self.async_saver is not None:
            self.async_saver.poll()

    def train(self, on_step: Optional[Callable[[StepMetrics], None]] = None
              ) -> Optional[StepMetrics]:
        """Train to --train-iters (or an early stop); returns the last step. Steps are not
        kept (a million-step run would hold a million): ``on_step`` sees each one (its
        losses are filled in when its log window closes)."""
        for chunk in self.model:
            chunk.train()
        step = None
        ckpt = self.cfg.checkpoint
        saved_at, evaluated_at = self.committed_at, None
        eval_interval = self.cfg.data.eval_interval
        first, stopped = True, None
        if self._stopped_during_startup():
            return None
        while self.iteration < self.cfg.training.train_iters:
            # the first step builds buffers and warms kernels up: show that it progresses
            with phase(f"first iteration ({self.iteration + 1})", log=log_last_rank) \
                    if first else contextlib.nullcontext():
                step = self.run_step()
            first = False
            self.metrics.record(step)
            if on_step is not None:
                on_step(step)
            if self.metrics.due(self.iteration) or step.stop_reason:
                self._log_window()
            if eval_interval and self.iteration % eval_interval == 0:
                self.evaluate()
                evaluated_at = self.iteration
            if ckpt.save_interval and self.iteration % ckpt.save_interval == 0:
                self.save()
                saved_at = self.iteration
            stop_reason = step.stop_reason or self._evaluation_stopped()
            if stop_reason:
                log_last_rank(f"stopping after iteration {self.iteration}: {stop_reason}")
                stopped = stop_reason
                break
        if self.iteration >= self.cfg.training.train_iters and evaluated_at != self.iteration:
            self.evaluate()  # the final evaluation
            stopped = stopped or self._evaluation_stopped()
        if ckpt.save and saved_at != self.iteration:
            self.save()
        if self.async_saver is not None:
            self.async_saver.poll(blocking=True)  # every save committed before we return
        if stopped is not None and torch.distributed.get_rank() == 0:
            write_stop_record(self.cfg.logging.output_dir, iteration=self.iteration,
                              reason=stopped, checkpoint=ckpt.save and iteration_dir(ckpt.save,
                                                                        self.iteration))
        return step

    def _stopped_during_startup(self) -> bool:
        """The exit signal came before the first step (a scheduler's time-limit signal can
        come during a slow start-up): stop now. Nothing was trained, so nothing is saved;
        stopped.json says "saved" when --save already holds this iteration. Every rank
        agrees first (one all-reduce)."""
        if self.iteration >= self.cfg.training.train_iters:
            return False
        reason = self.exit.signal_before_start(self.device)
        if reason is None:
            return False
        log_last_rank(f"stopping before iteration {self.iteration + 1}: {reason}")
        if torch.distributed.get_rank() == 0:
            save = self.cfg.checkpoint.save
            committed = save and self.committed_at == self.iteration
            write_stop_record(self.cfg.logging.output_dir, iteration=self.iteration,
                              reason=reason,
                              checkpoint=iteration_dir(save, self.iteration) if committed else None)
        return True

    def close(self) -> None:
        if self.moe_stats is not None:
            self.moe_stats.close()
        if self.async_saver is not None:
            self.async_saver.close()
        if hasattr(self.sampler, "close"):
            self.sampler.close()
        self.metrics.close()
        if self.save_lock is not None:
            self.save_lock.release()
        distributed.shutdown()


def _same_dir(a: str, b: str) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)

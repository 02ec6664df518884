"""Leaving a run cleanly and refusing bad steps, with one small collective per step.

* :class:`ExitConditions`: ``--exit-signal-handler`` (finish the iteration, save, exit
  0; the ``--exit-signal`` and Ctrl-C's SIGINT), ``--exit-duration-in-mins``,
  ``--exit-interval``. The signals are caught from the moment the launcher has parsed its
  flags (:func:`catch_exit_signal`, called by ``cli.main``): one that arrives during
  start-up (imports, rendezvous, model build, loading) stops the run before its first
  iteration instead of killing it, and after the run the exit signal is ignored
  (:func:`ignore_exit_signal`), since a batch script may send it again until the job
  step ends (launch/slurm/common.sh). The signal and the time budget are also agreed
  between evaluation batches (:meth:`ExitConditions.check` with no iteration), so a long
  evaluation does not outlast the launcher's grace period.
* :func:`checked_optimizer_step`: megatron-core's ``optimizer.step()`` split at the one
  point where the step can still be refused: after the gradient norm is known (mcore
  computes it anyway, for clipping), before any weight changes. NaN/Inf is detected from
  that norm (a NaN or Inf in any gradient makes the global norm non-finite) and from the
  step's lm-loss sums, both already on hand: no scan of the gradient buffers.
* :func:`write_stop_record`: after an early stop whose checkpoint is committed, rank 0
  writes ``<output-dir>/stopped.json``. A batch script reads it to decide whether to
  requeue (launch/slurm/common.sh): torchrun exits 1 when it is the process signalled,
  even though every worker saved and exited 0.
* Every rank reaches the same decisions through :func:`agree`: the non-finite flag and
  the exit flags travel in one 4-element tensor, one all-reduce (MAX), one host copy.

Host syncs per step (GPU): megatron-core's grad-norm ``.item()`` and the agreement's
``.tolist()`` (fp16 adds mcore's ``found_inf`` check). Losses stay on the device until
``--log-interval`` (``training/losses.py``).

Test hooks: ``MTP_MEGATRON_INJECT_NAN_AT=<iteration>`` poisons that iteration's gradients
on rank 0, so the detection path runs end to end; ``MTP_MEGATRON_STEP_DELAY_S=<seconds>``
makes every step that much longer (a sleep before the agreement), so that tests against a
real scheduler's time limit span several jobs with a tiny model. Neither changes numbers.
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
import torch.distributed as dist

from mtp_megatron.checkpoint.layout import write_text_atomic
from mtp_megatron.config import CheckpointConfig
from mtp_megatron.runtime import comm
from mtp_megatron.runtime.optimizer_parts import sub_optimizers

INJECT_NAN_ENV = "MTP_MEGATRON_INJECT_NAN_AT"
STEP_DELAY_ENV = "MTP_MEGATRON_STEP_DELAY_S"

STOP_RECORD = "stopped.json"


def stop_record_path(output_dir: str) -> str:
    return os.path.join(output_dir, STOP_RECORD)


def write_stop_record(output_dir: str, *, iteration: int, reason: str,
                      checkpoint: Optional[str]) -> str:
    """``stopped.json``: ``{"iteration", "reason", "saved", "checkpoint"}``, written
    atomically (temp file + rename) once the stop's checkpoint is committed; ``saved`` is
    false without ``--save``."""
    path = stop_record_path(output_dir)
    record = {"iteration": iteration, "reason": reason, "saved": checkpoint is not None,
              "checkpoint": checkpoint}
    write_text_atomic(path, json.dumps(record) + "\n")
    return path


# Columns of the per-step agreement tensor (all reduced with MAX).
NONFINITE, SIGNAL, MINUTES, STOP = range(4)


def agree(local: torch.Tensor) -> List[float]:
    """MAX of ``local`` (a small float tensor on the comm device) over all ranks, as Python
    floats: the one collective of this module (every rank, default group)."""
    comm.all_reduce(local, op="max")
    return local.tolist()


# Ctrl-C (SIGINT, sent to the whole process group: torchrun and every worker) stops like
# the exit signal under --exit-signal-handler, instead of a KeyboardInterrupt inside
# megatron-core.
ALSO_CAUGHT = ("SIGINT",)


class _ExitSignal:
    """The one ``--exit-signal`` (+ SIGINT) handler of this process and what it has seen."""

    names: Tuple[str, ...] = ()  # the signals caught now, () when not installed
    received = False
    received_name: Optional[str] = None  # the first one that arrived

    @classmethod
    def on_signal(cls, signum, frame) -> None:
        if not cls.received:
            cls.received_name = signal.Signals(signum).name
        cls.received = True  # idempotent: a signal sent again changes nothing


def catch_exit_signal(checkpoint: CheckpointConfig) -> None:
    """Catch ``--exit-signal`` and SIGINT from now on (with ``--exit-signal-handler``;
    idempotent).

    Called as soon as the flags are parsed, so a signal during start-up is remembered
    (the run stops before its first step) rather than killing the process."""
    names = tuple(dict.fromkeys((checkpoint.exit_signal, *ALSO_CAUGHT)))
    if not checkpoint.exit_signal_handler or _ExitSignal.names == names:
        return
    for name in names:
        signal.signal(getattr(signal, name), _ExitSignal.on_signal)
    _ExitSignal.names, _ExitSignal.received, _ExitSignal.received_name = names, False, None


def ignore_exit_signal() -> None:
    """Once the run is over: ignore the caught signals instead of restoring their default
    action.

    Python resets a handled signal to the default (terminate) while it exits, and a batch
    script sends the signal again until the step ends (a process may not have installed
    its handler the first time): one arriving then would turn a clean exit 0 into a kill."""
    for name in _ExitSignal.names:  # a Ctrl-C forwarded again by torchrun included
        signal.signal(getattr(signal, name), signal.SIG_IGN)
    _ExitSignal.names = ()


class ExitConditions:
    """Watches the exit signal, the wall-clock budget and the exit interval."""

    ALSO_CAUGHT = ALSO_CAUGHT

    def __init__(self, checkpoint: CheckpointConfig):
        self.cfg = checkpoint
        self.start = time.time()
        catch_exit_signal(checkpoint)  # already caught since start-up under the launcher

    @property
    def signal_received(self) -> bool:
        return self.cfg.exit_signal_handler and _ExitSignal.received

    @property
    def signal_name(self) -> str:
        """The first caught signal's name (``--exit-signal`` until one arrives)."""
        return _ExitSignal.received_name or self.cfg.exit_signal

    def signal_before_start(self, device: torch.device) -> Optional[str]:
        """Before the first step: did any rank get the signal during start-up? Agreed by
        every rank (one all-reduce) when ``--exit-signal-handler`` is on, else None."""
        if not self.cfg.exit_signal_handler:
            return None
        local = torch.tensor([float(self.signal_received)], dtype=torch.float64, device=device)
        if not agree(local)[0]:
            return None
        return f"received {self.signal_name} during start-up"

    def local(self, iteration: Optional[int]) -> Tuple[List[float], List[str]]:
        """This rank's ``[signal, minutes, stop]`` flags and its reasons to stop
        (``iteration`` None: between evaluation batches, where --exit-interval waits)."""
        reasons = []
        if self.signal_received:
            reasons.append(f"received {self.signal_name}")
        minutes = (time.time() - self.start) / 60.0
        if self.cfg.exit_duration_in_mins is not None and minutes >= self.cfg.exit_duration_in_mins:
            reasons.append(f"--exit-duration-in-mins {self.cfg.exit_duration_in_mins} reached")
        if self.cfg.exit_interval and iteration is not None \
                and iteration % self.cfg.exit_interval == 0:
            reasons.append(f"--exit-interval {self.cfg.exit_interval} reached")
        return [float(self.signal_received), minutes, float(bool(reasons))], reasons

    @staticmethod
    def decide(agreed_stop: float, reasons: List[str]) -> Optional[str]:
        """The stop reason once the flags are agreed (the same answer on every rank)."""
        if not agreed_stop:
            return None
        if not reasons:  # another rank decided (it got the signal first, or its clock ran)
            reasons = ["another rank asked to stop"]
        return "; ".join(reasons)

    def check(self, iteration: Optional[int],
              device: torch.device = torch.device("cpu")) -> Optional[str]:
        """Why to stop after this iteration, agreed on its own (outside a training step);
        with ``iteration`` None (between evaluation batches) the signal and the time
        budget only. Every rank must call it."""
        flags, reasons = self.local(iteration)
        agreed = agree(torch.tensor([0.0] + flags, dtype=torch.float64, device=device))
        return self.decide(agreed[STOP], reasons)


class NonFiniteStepError(RuntimeError):
    """A NaN/Inf loss or gradient without --skip-nan-steps: the run stops, saving nothing."""

    def __init__(self, iteration: int):
        self.iteration = iteration
        super().__init__(
            f"iteration {iteration}: NaN/Inf in the loss or gradients; stopping without saving "
            "(the last checkpoint is intact). Lower --lr, check the data, or pass "
            "--skip-nan-steps to skip such updates."
        )


@dataclass
class StepOutcome:
    updated: bool
    grad_norm: Optional[float]
    nonfinite: bool
    stop_reason: Optional[str]


def inject_nan_for_tests(model_chunks, iteration: int) -> None:
    """``MTP_MEGATRON_INJECT_NAN_AT=<iteration>``: NaN gradients on rank 0 at that step."""
    if os.environ.get(INJECT_NAN_ENV) == str(iteration) and dist.get_rank() == 0:
        for chunk in model_chunks:
            for buffer in chunk.buffers:
                buffer.grad_data.fill_(float("nan"))


def _delay_for_tests() -> None:
    """``MTP_MEGATRON_STEP_DELAY_S=<seconds>``: a longer step, nothing else changes."""
    delay = os.environ.get(STEP_DELAY_ENV)
    if delay:
        time.sleep(float(delay))


def _clip(optimizer, grad_norm: float) -> None:
    """megatron-core's clipping by a total norm already computed (as ChainedOptimizer does)."""
    from megatron.core.optimizer import clip_grads  # read at call time: the CPU bridge wraps it

    for opt in sub_optimizers(optimizer):
        if getattr(opt, "is_stub_optimizer", False) or opt.config.clip_grad <= 0.0:
            continue
        params = opt.get_parameters()
        if params:
            clip_grads.clip_grad_by_total_norm_fp32(
                params, max_norm=opt.config.clip_grad, total_norm=grad_norm,
                use_decoupled_grad=opt.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8,
            )


def checked_optimizer_step(optimizer, *, iteration: int, loss_sums: Optional[torch.Tensor],
                           exit_conditions: ExitConditions, skip_nan_steps: bool,
                           device: torch.device) -> StepOutcome:
    """``optimizer.step()`` that refuses a non-finite step before the weights change.

    ``loss_sums``: this rank's ``[loss sum, tokens]`` of the step (last stage) or None.
    Raises :class:`NonFiniteStepError` without ``skip_nan_steps``.
    """
    _delay_for_tests()
    found_inf = optimizer.prepare_grads()  # fp16: the loss scaler's overflow check
    grad_norm = None if found_inf else optimizer.get_grad_norm()
    local = torch.zeros(4, dtype=torch.float64, device=device)
    if loss_sums is not None:
        local[NONFINITE] = (~torch.isfinite(loss_sums).all()).double()  # stays on device
    if grad_norm is not None and not math.isfinite(grad_norm):
        local[NONFINITE] = 1.0
    flags, reasons = exit_conditions.local(iteration)
    local[SIGNAL:] = torch.tensor(flags, dtype=torch.float64, device=device)
    agreed = agree(local)
    stop = exit_conditions.decide(agreed[STOP], reasons)
    if agreed[NONFINITE]:
        if not skip_nan_steps:
            raise NonFiniteStepError(iteration)
        return StepOutcome(False, None, True, stop)
    if found_inf:  # fp16 overflow: mcore's scaler already lowered the scale; skip quietly
        return StepOutcome(False, None, False, stop)
    _clip(optimizer, grad_norm)
    updated = optimizer.step_with_ready_grads()
    return StepOutcome(bool(updated), grad_norm, False, stop)

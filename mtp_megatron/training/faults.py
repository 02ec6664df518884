"""Leaving a run cleanly and refusing bad steps.

* :class:`ExitConditions`: ``--exit-signal-handler`` (finish the iteration, save, exit
  0), ``--exit-duration-in-mins``, ``--exit-interval``. Every rank reaches the same
  decision (one all-reduce), so they save together.
* :func:`step_is_finite`: the lm loss (last stage) and every gradient buffer are checked
  for NaN/Inf, agreed over all ranks, before the optimizer may touch the weights.

Test hook: ``MTP_MEGATRON_INJECT_NAN_AT=<iteration>`` poisons that iteration's gradients
on rank 0, so the detection path runs end to end.
"""

from __future__ import annotations

import os
import signal
import time
from typing import List, Optional

import torch
import torch.distributed as dist

from mtp_megatron.config import CheckpointConfig
from mtp_megatron.runtime import comm

INJECT_NAN_ENV = "MTP_MEGATRON_INJECT_NAN_AT"


class ExitConditions:
    """Watches the exit signal, the wall-clock budget and the exit interval."""

    def __init__(self, checkpoint: CheckpointConfig):
        self.cfg = checkpoint
        self.start = time.time()
        self.signal_received = False
        if checkpoint.exit_signal_handler:
            signal.signal(getattr(signal, checkpoint.exit_signal), self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        self.signal_received = True

    def check(self, iteration: int) -> Optional[str]:
        """Why to stop after this iteration (the same answer on every rank), or None."""
        reasons = []
        if self.signal_received:
            reasons.append(f"received {self.cfg.exit_signal}")
        minutes = (time.time() - self.start) / 60.0
        if self.cfg.exit_duration_in_mins is not None and minutes >= self.cfg.exit_duration_in_mins:
            reasons.append(f"--exit-duration-in-mins {self.cfg.exit_duration_in_mins} reached")
        if self.cfg.exit_interval and iteration % self.cfg.exit_interval == 0:
            reasons.append(f"--exit-interval {self.cfg.exit_interval} reached")
        flags = comm.reduce_values([float(bool(self.signal_received)), minutes,
                                    float(bool(reasons))], op="max")
        if flags[2] == 0:
            return None
        if not reasons:  # another rank decided (it got the signal first, or its clock ran)
            reasons.append("another rank asked to stop")
        return "; ".join(reasons)


class NonFiniteStepError(RuntimeError):
    """A NaN/Inf loss or gradient without --skip-nan-steps: the run stops, saving nothing."""

    def __init__(self, iteration: int):
        self.iteration = iteration
        super().__init__(
            f"iteration {iteration}: NaN/Inf in the loss or gradients; stopping without saving "
            "(the last checkpoint is intact). Lower --lr, check the data, or pass "
            "--skip-nan-steps to skip such updates."
        )


def step_is_finite(model_chunks: List[torch.nn.Module], lm_loss_reports, iteration: int,
                   check_grads: bool = True) -> bool:
    """True when the step's loss and (unless fp16 loss scaling handles overflow itself)
    all gradients are finite on every rank."""
    if os.environ.get(INJECT_NAN_ENV) == str(iteration) and dist.get_rank() == 0:
        for chunk in model_chunks:
            for buffer in chunk.buffers:
                buffer.grad_data.fill_(float("nan"))
    ok = True
    for report in lm_loss_reports or []:
        ok &= bool(torch.isfinite(report["lm loss"]).all())
    for chunk in model_chunks if check_grads else []:
        for buffer in chunk.buffers:
            ok &= bool(torch.isfinite(buffer.grad_data).all())
    return comm.all_ranks(ok)


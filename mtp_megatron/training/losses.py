"""Where the MTP objective is computed, scaled and collected for logging.

The objective is DeepSeek-V3's, as megatron-core computes it::

    loss = lm_loss + (mtp_loss_scaling_factor / D) * sum_k mtp_loss_k

or, with ``--mtp-depth-weights`` and a factor schedule, ``lm_loss + factor(i) * sum_k
w_k * mtp_loss_k`` (``training/mtp_weighting.py``: the factor is set per iteration, each
depth's term is scaled where megatron-core attaches it; the losses are the same).

* ``lm_loss``: :func:`loss_func` returns ``(sum of masked token losses, token count,
  report)``; megatron-core's schedule divides by the token count and by the number of
  microbatches, so the gradient is that of the mean over microbatches.
* ``mtp_loss_k``: computed inside ``GPTModel._postprocess`` on the last stage, each
  depth's masked mean over its tokens (labels and mask shifted by k), added to the
  gradient through ``MTPLossAutoScaler`` with weight ``factor / D``. The schedule sets
  the autoscaler's scale to ``1 / num_microbatches``, the same as the lm loss, so both
  terms are averaged over microbatches identically.
* For logging, :class:`LossWindow` keeps each step's lm-loss sums on the device and
  lets megatron-core's per-depth tracker sum over microbatches and steps; at
  ``--log-interval`` it reduces both over data-parallel ranks (one host copy each) and
  :func:`collect_mtp_losses` divides by microbatches x steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Dict, List, Optional, Tuple

import torch
from megatron.core import parallel_state

from mtp_megatron.runtime import comm, mcore_compat


def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """One microbatch's lm loss as ``(loss_sum, num_tokens, {"lm loss": [sum, count]})``."""
    losses = output_tensor.float().reshape(-1)
    mask = loss_mask.float().reshape(-1)
    loss_sum = torch.sum(losses * mask)
    num_tokens = mask.sum().to(torch.int)
    report = torch.stack([loss_sum.detach().clone(), mask.sum().detach()])
    return loss_sum, num_tokens, {"lm loss": report}


def forward_step(data_iterator, model):
    """megatron-core's forward-step contract: run the model, return (output, loss fn)."""
    batch = next(data_iterator)
    device = next(model.parameters()).device
    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    output = model(
        batch["tokens"], batch["position_ids"], None,
        labels=batch["labels"], loss_mask=batch["loss_mask"],
    )
    return output, partial(loss_func, batch["loss_mask"])


def step_loss_sums(reports: List[Dict[str, torch.Tensor]]) -> Optional[torch.Tensor]:
    """This rank's ``[loss sum, tokens]`` of one step, on the device (no host sync).

    ``reports`` are what :func:`loss_func` returned per microbatch (empty off the last
    pipeline stage: then None).
    """
    if not reports:
        return None
    return torch.stack([r["lm loss"] for r in reports]).sum(dim=0)


def _all_reduce_sum_dp(tensor: torch.Tensor) -> None:
    """Sum over the data-parallel group, in place (the lm loss's only collective)."""
    comm.all_reduce(tensor, group=parallel_state.get_data_parallel_group())


@dataclass
class WindowLosses:
    """What :meth:`LossWindow.flush` returns: per-step lm losses (last stage, else None)
    and the per-depth MTP losses averaged over the window (ranks with MTP layers)."""

    steps: int
    lm: Optional[List[float]]
    mtp: Optional[List[float]]
    mtp_acceptance: Optional[List[float]] = None


class LossWindow:
    """Losses of the steps since the last log, kept on the device, as Megatron-LM does.

    Per step: :meth:`add` appends the step's ``[loss sum, tokens]`` (no sync), and
    megatron-core's MTP tracker keeps summing the per-depth losses over microbatches
    *and steps* (we reset it only at a flush). At ``--log-interval``, :meth:`flush` does
    one data-parallel all-reduce for the lm loss, the tracker's own reduction for MTP,
    and one host copy each. Every rank must call :meth:`flush` at the same iterations.

        window = LossWindow(num_microbatches=4)
        window.add(step_loss_sums(reports))      # every step
        losses = window.flush()                  # every --log-interval steps
    """

    def __init__(self, num_microbatches: int):
        self.num_microbatches = num_microbatches
        self.lm_sums: List[torch.Tensor] = []
        self.steps = 0

    def add(self, loss_sums: Optional[torch.Tensor]) -> None:
        self.steps += 1
        if loss_sums is not None:
            self.lm_sums.append(loss_sums)

    def flush(self) -> WindowLosses:
        lm = None
        if self.lm_sums:
            total = torch.stack(self.lm_sums)  # [steps, 2]
            _all_reduce_sum_dp(total)
            lm = (total[:, 0] / total[:, 1].clamp(min=1)).tolist()
        mtp, acceptance = collect_mtp_metrics(self.num_microbatches * self.steps)
        out = WindowLosses(self.steps, lm, mtp, acceptance)
        self.lm_sums, self.steps = [], 0
        return out


def collect_mtp_metrics(num_microbatches: int) -> Tuple[Optional[List[float]],
                                                       Optional[List[float]]]:
    """Per-depth MTP losses and training acceptance since the last call, then reset.

    Losses: the tracker's sums divided by ``num_microbatches`` (microbatches per step x
    steps), mean over data-parallel ranks. Acceptance (megatron-core 0.19; None on 0.16,
    whose tracker counts no hits): top-1 hits / positions summed over the window and the
    data-parallel ranks, the definition validation uses (``training/evaluate.py``).

    Call on every rank at the same iterations: ranks without MTP layers return (None,
    None), ranks with them all-reduce over their data-parallel group.
    """
    sums = mcore_compat.take_mtp_sums()
    if sums is None or not num_microbatches:
        return None, None
    group = parallel_state.get_data_parallel_group(with_context_parallel=True)
    parts = [sums.loss] + ([sums.correct, sums.total] if sums.correct is not None else [])
    packed = torch.stack(parts)  # one collective for everything
    comm.all_reduce(packed, group=group)
    dp = torch.distributed.get_world_size(group=group)
    rows = [packed[0] / dp / num_microbatches]
    if sums.correct is not None:
        rows.append(packed[1] / packed[2].clamp(min=1))
    values = torch.stack(rows).tolist()  # one host copy
    return values[0], (values[1] if len(values) > 1 else None)

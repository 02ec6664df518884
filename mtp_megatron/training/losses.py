"""Where the MTP objective is computed, scaled and collected for logging.

The objective is DeepSeek-V3's, as megatron-core computes it::

    loss = lm_loss + (mtp_loss_scaling_factor / D) * sum_k mtp_loss_k

* ``lm_loss``: :func:`loss_func` returns ``(sum of masked token losses, token count,
  report)``; megatron-core's schedule divides by the token count and by the number of
  microbatches, so the gradient is that of the mean over microbatches.
* ``mtp_loss_k``: computed inside ``GPTModel._postprocess`` on the last stage, each
  depth's masked mean over its tokens (labels and mask shifted by k), added to the
  gradient through ``MTPLossAutoScaler`` with weight ``factor / D``. The schedule sets
  the autoscaler's scale to ``1 / num_microbatches``, the same as the lm loss, so both
  terms are averaged over microbatches identically.
* For logging, :func:`collect_mtp_losses` reads megatron-core's per-depth tracker
  (summed over microbatches, averaged over data-parallel ranks) and divides by the
  number of microbatches.
"""

from __future__ import annotations

from functools import partial
from typing import Dict, List, Optional

import torch
from megatron.core import parallel_state
from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper

from mtp_megatron.runtime import comm


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


def reduce_lm_loss(reports: List[Dict[str, torch.Tensor]]) -> Optional[float]:
    """Token-weighted lm loss of a step over microbatches and data-parallel ranks.

    Only meaningful on the last pipeline stage (where ``reports`` is non-empty).
    """
    if not reports:
        return None
    total = torch.stack([r["lm loss"] for r in reports]).sum(dim=0)
    comm.all_reduce(total, group=parallel_state.get_data_parallel_group())
    return (total[0] / total[1].clamp(min=1)).item()


def collect_mtp_losses(num_microbatches: int) -> Optional[List[float]]:
    """Per-depth MTP losses of the last step (mean over microbatches and DP), then reset.

    Call on every rank after each training step: ranks without MTP layers return None,
    ranks with them all-reduce over their data-parallel group.
    """
    tracker = MTPLossLoggingHelper.tracker
    if "values" not in tracker:
        return None
    MTPLossLoggingHelper.reduce_loss_in_tracker()
    values = (tracker["values"] / num_microbatches).tolist()
    MTPLossLoggingHelper.clean_loss_in_tracker()
    return values

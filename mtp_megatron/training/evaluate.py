"""Validation: lm loss and perplexity, per-depth MTP loss, and MTP acceptance.

Depth ``k`` at position ``i`` predicts token ``i + k + 1``; with the dataset's labels
already shifted by one, its targets are the labels rolled left by ``k`` (the last ``k``
positions dropped, the loss mask rolled the same way), as in megatron-core's
``GPTModel._postprocess``. For each head we report

* loss: the masked mean cross entropy (``exp`` of the main head's is the perplexity);
* ``mtp_k acceptance``: the fraction of positions where depth ``k``'s top-1 prediction is
  the true token ``k + 1`` ahead;
* ``chained_k acceptance``: the fraction where depths ``1..k`` are all right, the rate at
  which a self-speculative decoder drafting ``k`` tokens from one position keeps them all.

megatron-core returns only the main head's per-token loss in eval mode (it records MTP
losses only while training), so :class:`Evaluator` reads every head's logits from a
forward hook on the last stage's ``output_layer``, which ``_postprocess`` calls once per
MTP depth (1..D) and then for the main head. The logits are vocab-parallel under TP: the
cross entropy is megatron-core's ``vocab_parallel_cross_entropy`` and the argmax takes
each rank's best and all-gathers (ties go to the lowest id). Sums are kept per head and
all-reduced over data-parallel ranks on the last pipeline stage; the last rank logs them
and writes them through the training run's :class:`MetricsWriter` (metrics.jsonl,
tensorboard, wandb; tagged ``validation``).

:func:`head_statistics` is the metric itself, a pure function of logits and labels.
"""

from __future__ import annotations

import logging
import math
from typing import Callable, Dict, List, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

from mtp_megatron.data.iterator import GlobalBatchSampler
from mtp_megatron.runtime import comm
from mtp_megatron.runtime.wrapped import innermost
from mtp_megatron.training.writers import MetricsWriter

logger = logging.getLogger("mtp_megatron")

# Columns of the per-head statistics (one row per head: main, depth 1, ..., depth D).
LOSS_SUM, TOKENS, CORRECT, CHAINED_CORRECT, CHAINED_TOKENS = range(5)


def shift_left(tensor: torch.Tensor, k: int) -> torch.Tensor:
    """Roll the last dimension left by ``k`` and zero the ``k`` wrapped positions."""
    if k == 0:
        return tensor
    out = torch.zeros_like(tensor)
    out[..., :-k] = tensor[..., k:]
    return out


def vocab_parallel_argmax(logits: torch.Tensor, tp_group=None) -> torch.Tensor:
    """Top-1 ids of ``[..., V/TP]`` logits split over ``tp_group``; ties -> lowest id."""
    local = torch.argmax(logits, dim=-1)
    if tp_group is None or dist.get_world_size(tp_group) == 1:
        return local
    rank = dist.get_rank(tp_group)
    best = torch.gather(logits, -1, local.unsqueeze(-1)).squeeze(-1).float()
    ids = local + rank * logits.size(-1)
    all_best = comm.all_gather(best, group=tp_group)
    all_ids = comm.all_gather(ids, group=tp_group)
    winner = torch.argmax(torch.stack(all_best), dim=0)  # first max: the lowest rank
    return torch.gather(torch.stack(all_ids), 0, winner.unsqueeze(0)).squeeze(0)


def _token_losses(logits: torch.Tensor, targets: torch.Tensor, tp_group) -> torch.Tensor:
    """Per-token cross entropy ``[s, b]`` of ``[s, b, V/TP]`` logits (``logits`` untouched)."""
    if tp_group is None:
        s, b, v = logits.shape
        return F.cross_entropy(logits.float().reshape(-1, v), targets.reshape(-1),
                               reduction="none").reshape(s, b)
    work = logits.float()
    if work is logits:  # megatron-core's kernel works in place
        work = work.clone()
    return vocab_parallel_cross_entropy(work, targets)


class HeadStatistics:
    """Sums per head, ``[1 + D, 5]`` float64: loss, tokens, correct, chained correct/tokens.

    Row 0 is the main head, row ``k`` MTP depth ``k``; add depths in increasing order
    (the chained rate multiplies them up). ``labels`` and ``loss_mask`` are ``[b, s]``
    as the dataset gives them (labels = tokens shifted by one); logits are ``[s, b, V]``
    (``V/TP`` with ``tp_group``). Row 0's chained columns stay zero.
    """

    def __init__(self, labels: torch.Tensor, loss_mask: torch.Tensor, num_heads: int,
                 tp_group=None):
        self.labels, self.loss_mask, self.tp_group = labels, loss_mask, tp_group
        self.stats = torch.zeros(num_heads, 5, dtype=torch.float64, device=labels.device)
        self._chained_ok = self._chained_mask = None

    def add(self, k: int, logits: torch.Tensor) -> None:
        targets = shift_left(self.labels, k).t().contiguous()  # [s, b]
        mask = shift_left(self.loss_mask.float(), k).t()
        correct = (vocab_parallel_argmax(logits, self.tp_group) == targets).float() * mask
        losses = _token_losses(logits, targets, self.tp_group) * mask
        row = self.stats[k]
        row[LOSS_SUM], row[TOKENS], row[CORRECT] = losses.sum(), mask.sum(), correct.sum()
        if k == 0:
            return
        first = self._chained_ok is None
        self._chained_ok = correct if first else self._chained_ok * correct
        self._chained_mask = mask if first else self._chained_mask * mask
        row[CHAINED_CORRECT] = (self._chained_ok * self._chained_mask).sum()
        row[CHAINED_TOKENS] = self._chained_mask.sum()


def head_statistics(head_logits: List[torch.Tensor], labels: torch.Tensor,
                    loss_mask: torch.Tensor, tp_group=None) -> torch.Tensor:
    """:class:`HeadStatistics` of ``[main, depth 1, ..., depth D]`` logits."""
    acc = HeadStatistics(labels, loss_mask, len(head_logits), tp_group)
    for k, logits in enumerate(head_logits):
        acc.add(k, logits)
    return acc.stats


def summarize(stats: torch.Tensor) -> Dict[str, float]:
    """Named metrics from summed statistics (logged and written to metrics.jsonl)."""
    def ratio(a, b):
        return (a / b).item() if b > 0 else float("nan")

    lm_loss = ratio(stats[0, LOSS_SUM], stats[0, TOKENS])
    out = {"lm loss": lm_loss, "lm PPL": math.exp(min(lm_loss, 20.0)),
           "lm accuracy": ratio(stats[0, CORRECT], stats[0, TOKENS])}
    for k in range(1, stats.size(0)):
        out[f"mtp_{k} loss"] = ratio(stats[k, LOSS_SUM], stats[k, TOKENS])
        out[f"mtp_{k} acceptance"] = ratio(stats[k, CORRECT], stats[k, TOKENS])
        if k > 1:
            out[f"chained_{k} acceptance"] = ratio(stats[k, CHAINED_CORRECT],
                                                   stats[k, CHAINED_TOKENS])
    return out


def format_line(iteration: int, metrics: Dict[str, float]) -> str:
    parts = [f"validation at iteration {iteration}"]
    for key, value in metrics.items():
        parts.append(f"{key} {value:.6E}" if key.endswith("loss") else f"{key} {value:.4f}")
    return " | ".join(parts)




class _HeadCapture:
    """Forward hook on ``output_layer`` while evaluating: each head's statistics.

    ``_postprocess`` calls the output layer for depths 1..D, then the main head; the
    statistics are taken inside the hook, before megatron-core's own cross entropy
    overwrites the logits in place.
    """

    def __init__(self, gpt_model, depth: int, tp_group):
        self.depth, self.tp_group = depth, tp_group
        self.current: Optional[HeadStatistics] = None
        self.calls = 0
        self.handle = gpt_model.output_layer.register_forward_hook(self._hook)

    def begin(self, labels: torch.Tensor, loss_mask: torch.Tensor) -> None:
        self.current = HeadStatistics(labels, loss_mask, 1 + self.depth, self.tp_group)
        self.calls = 0

    def _hook(self, module, inputs, output):
        if self.current is None:
            return
        head = self.calls + 1 if self.calls < self.depth else 0
        self.current.add(head, output[0].detach())
        self.calls += 1

    def finish(self) -> torch.Tensor:
        if self.calls != 1 + self.depth:
            raise RuntimeError(f"output_layer ran {self.calls} times, expected {1 + self.depth}")
        stats, self.current = self.current.stats, None
        return stats

    def remove(self) -> None:
        self.handle.remove()


class Evaluator:
    """Runs ``--eval-iters`` global batches forward-only and reports the metrics.

    ``stop_check`` (every rank calls it, before each batch) returns a reason to stop, e.g.
    a signal agreed over the ranks: the evaluation is then abandoned, no metrics are
    reported, and :attr:`stopped` holds the reason (the trainer saves and leaves)."""

    def __init__(self, model: List[torch.nn.Module], dataset, *, micro_batch_size: int,
                 global_batch_size: int, seq_length: int, mtp_depth: int,
                 is_logging_rank: bool, writer: Optional[MetricsWriter] = None,
                 tokens_per_step: int = 0,
                 stop_check: Optional[Callable[[], Optional[str]]] = None):
        self.model, self.dataset = model, dataset
        self.micro_batch_size, self.global_batch_size = micro_batch_size, global_batch_size
        self.seq_length, self.depth = seq_length, mtp_depth
        self.is_logging_rank = is_logging_rank
        self.writer = writer or MetricsWriter()
        self.tokens_per_step = tokens_per_step
        self.last_chunk = innermost(model[-1])
        self.on_last_stage = bool(getattr(self.last_chunk, "post_process", False))
        self.capture: Optional[_HeadCapture] = None
        self.stats: Optional[torch.Tensor] = None
        self.stop_check = stop_check
        self.stopped: Optional[str] = None

    def _forward_step(self, data_iterator, model):
        batch = next(data_iterator)
        device = next(model.parameters()).device
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        if self.capture is not None and innermost(model) is self.last_chunk:
            self.capture.begin(batch["labels"], batch["loss_mask"])
        output = model(batch["tokens"], batch["position_ids"], None,
                       labels=batch["labels"], loss_mask=batch["loss_mask"])
        return output, self._loss_func

    def _loss_func(self, output_tensor):
        stats = self.capture.finish()
        self.stats = stats if self.stats is None else self.stats + stats
        lm_sum, tokens = stats[0, LOSS_SUM].float(), stats[0, TOKENS].float()
        return lm_sum, tokens.to(torch.int), {"lm loss": torch.stack([lm_sum, tokens])}

    @torch.no_grad()
    def run(self, iteration: int, num_iters: int) -> Optional[Dict[str, float]]:
        """Evaluate; every rank calls it. Returns the metrics on last-stage ranks."""
        for chunk in self.model:
            chunk.eval()
        self.stats, self.stopped = None, None
        if self.on_last_stage:
            self.capture = _HeadCapture(self.last_chunk, self.depth,
                                        parallel_state.get_tensor_model_parallel_group())
        sampler = GlobalBatchSampler(
            self.dataset, micro_batch_size=self.micro_batch_size,
            global_batch_size=self.global_batch_size,
            dp_rank=parallel_state.get_data_parallel_rank(),
            dp_size=parallel_state.get_data_parallel_world_size(),
        )
        done = 0
        try:
            while done < num_iters:
                self.stopped = self.stop_check() if self.stop_check is not None else None
                if self.stopped:
                    break
                microbatches = sampler.next_step()
                data = [iter(microbatches) for _ in self.model]
                get_forward_backward_func()(
                    forward_step_func=self._forward_step,
                    data_iterator=data if len(data) > 1 else data[0],
                    model=self.model, num_microbatches=len(microbatches),
                    seq_length=self.seq_length, micro_batch_size=self.micro_batch_size,
                    forward_only=True,
                )
                done += 1
        finally:
            if self.capture is not None:
                self.capture.remove()
                self.capture = None
            for chunk in self.model:
                chunk.train()
        if self.stopped:
            if self.is_logging_rank:
                logger.info("validation at iteration %d stopped after %d of %d batches (%s): "
                            "nothing reported", iteration, done, num_iters, self.stopped)
            return None
        if not self.on_last_stage:
            return None
        total = self.stats.clone()  # every last-stage rank ran >= 1 microbatch
        comm.all_reduce(total, group=parallel_state.get_data_parallel_group())
        metrics = summarize(total.cpu())
        if self.is_logging_rank:
            logger.info(format_line(iteration, metrics))
            row = {"iteration": iteration, "tokens": iteration * self.tokens_per_step, **metrics}
            self.writer.write(row, split="valid")
        return metrics

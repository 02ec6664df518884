"""What the MoE layers did over a log window: balancing loss, tokens per expert, bias range.

* **load balancing loss**: megatron-core's router records ``aux loss / coeff`` per MoE
  layer and micro-batch in its metrics tracker (``mcore_compat.take_moe_balancing_losses``);
  logged as megatron-core reports it: the mean over micro-batches, data-parallel ranks and
  MoE layers (MTP layers included).
* **tokens per expert**: counted here, by a forward hook on each router, from the routing
  map of every training forward (once per token: under full recompute only the recomputed,
  gradient-enabled forward counts). Logged per MoE layer as min / max tokens an expert got
  per step, and the worst layer's max / mean ("expert load", 1.0 is perfectly balanced).
* **expert bias** (``--moe-router-enable-expert-bias``): the smallest and largest bias of
  any expert in any layer, after the window's last update.

Layer slots are megatron-core's: decoder layer ``i`` (0-based) is slot ``i`` (logged as
``moe layer i``), MTP layer ``k`` is slot ``num_layers + k`` (logged as ``moe mtp_{k+1}``).
Every rank calls :meth:`MoEStats.flush` at the same iterations: one all-reduce over the
world for losses and counts (each rank holds its own pipeline stage's layers, its own
tokens), one for the bias range.

    stats = MoEStats(model_chunks, cfg, device)   # None-safe: MoEStats.build(...) for dense
    summary = stats.flush(steps=10, microbatches=4)     # {"load balancing loss": ...}
"""

from __future__ import annotations

from typing import Dict, List, Optional

import torch
from megatron.core import parallel_state

from mtp_megatron.config import RunConfig
from mtp_megatron.runtime import comm, mcore_compat

# megatron-core's tracker name for each --moe-router-load-balancing-type
BALANCING_NAMES = {"aux_loss": "load_balancing_loss", "seq_aux_loss": "seq_load_balancing_loss"}


def _routers(chunks) -> List[torch.nn.Module]:
    from megatron.core.transformer.moe.router import Router

    return [m for c in chunks for m in c.modules() if isinstance(m, Router)]


class MoEStats:
    """Counts tokens per expert on this rank and summarises a window on every rank."""

    def __init__(self, chunks, cfg: RunConfig, device: torch.device):
        model = cfg.model
        self.num_layers = model.num_layers
        self.slots = model.num_layers + (cfg.mtp.mtp_num_layers or 0)
        depth = cfg.mtp.mtp_num_layers or 0
        self.moe_slots = [i for i, moe in enumerate(model.moe_layers) if moe]
        if model.moe_layers[-1]:  # the MTP layers copy the last decoder layer's type
            self.moe_slots += [model.num_layers + k for k in range(depth)]
        self.balancing = None
        if model.moe_aux_loss_coeff > 0:
            self.balancing = BALANCING_NAMES.get(model.moe_router_load_balancing_type)
        self.expert_bias = model.moe_router_enable_expert_bias
        self.counts = torch.zeros(self.slots, model.num_experts, dtype=torch.float64,
                                  device=device)
        self.routers = _routers(chunks)
        self._hooks = [r.register_forward_hook(self._count) for r in self.routers]

    @classmethod
    def build(cls, chunks, cfg: RunConfig, device: torch.device) -> Optional["MoEStats"]:
        return cls(chunks, cfg, device) if cfg.model.moe else None

    def _slot(self, router) -> int:
        return router.layer_number - 1 + (self.num_layers if router.is_mtp_layer else 0)

    def _count(self, router, inputs, outputs) -> None:
        if router.training and torch.is_grad_enabled():
            routing_map = outputs[1]
            self.counts[self._slot(router)] += routing_map.sum(dim=0).to(self.counts.dtype)

    def flush(self, steps: int, microbatches: int) -> Dict[str, object]:
        """The window's summary (same on every rank), then zeroed. ``microbatches``: per
        step on this rank (as the schedule ran them)."""
        losses = mcore_compat.take_moe_balancing_losses(
            [self.balancing] if self.balancing else [], self.slots, self.counts.device)
        packed = torch.cat([self.counts.flatten(), losses.flatten().to(self.counts.dtype)])
        comm.all_reduce(packed)  # stages hold disjoint layers; ranks of a stage their tokens
        counts = packed[:self.counts.numel()].view_as(self.counts) / max(steps, 1)
        out: Dict[str, object] = {}
        if self.balancing:
            dp = parallel_state.get_data_parallel_world_size()
            per_layer = packed[self.counts.numel():] / (dp * microbatches * max(steps, 1))
            out["load balancing loss"] = float(per_layer.sum()) / max(len(self.moe_slots), 1)
        out.update(_load_summary(counts, self.moe_slots, self.num_layers))
        if self.expert_bias:
            out.update(self._bias_range())
        self.counts.zero_()
        return out

    def _bias_range(self) -> Dict[str, float]:
        biases = [r.expert_bias for r in self.routers if r.expert_bias is not None]
        high = max((float(b.max()) for b in biases), default=float("-inf"))
        low = min((float(b.min()) for b in biases), default=float("inf"))
        high, neg_low = comm.reduce_values([high, -low], op="max")
        return {"expert bias min": -neg_low, "expert bias max": high}

    def close(self) -> None:
        for hook in self._hooks:
            hook.remove()


def _load_summary(counts: torch.Tensor, slots: List[int], num_layers: int
                  ) -> Dict[str, object]:
    """Per MoE layer (``moe layer i``, 0-based; ``moe mtp_k`` for MTP depth k): min / max
    tokens an expert got per step; over all of them the worst max / mean."""
    out: Dict[str, object] = {}
    worst = 0.0
    for slot in slots:
        row = counts[slot]
        low, high, mean = float(row.min()), float(row.max()), float(row.mean())
        name = f"moe layer {slot}" if slot < num_layers else f"moe mtp_{slot - num_layers + 1}"
        out[f"{name} tokens/expert min"] = low
        out[f"{name} tokens/expert max"] = high
        if mean > 0:
            worst = max(worst, high / mean)
    out["expert load max/mean"] = worst
    return out

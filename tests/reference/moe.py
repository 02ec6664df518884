"""A Mixture-of-Experts MLP in plain PyTorch, written from the papers (no megatron imports).

Used by ``gpt_mtp.forward`` for the layers ``MoEReference.layers`` marks (and the MTP
layers when the last decoder layer is MoE). For tokens ``x`` ``[b, s, h]``::

    logits   = x W_r^T                                          (router, E experts)
    scores   = softmax(logits)            or  sigmoid(logits)   (DeepSeek-V3)
    choice   = top-k of scores (+ expert bias, for the choice only: aux-loss-free
               balancing), within the top ``group_topk`` groups when groups are used
               (a group's score: the sum of its top ``k / group_topk`` scores)
    weights  = softmax over the k chosen logits (softmax; or the chosen softmax scores
               with ``pre_softmax``), or the chosen sigmoid scores / their sum (k > 1),
               times ``scaling``
    out      = sum_k weights_k * Expert_k(x) + Shared(x)    (SwiGLU MLPs)

Balancing loss (Switch Transformer; DeepSeek-V3's sequence-wise variant), on the scores
``P`` of all experts (sigmoid scores normalised to sum 1) and the plain top-k choice ``f``
(no bias, no groups)::

    aux_loss      = coeff * E / (k * T^2) * sum_e (sum_t P_te) (sum_t f_te)   over the T
                    tokens of the micro-batch
    seq_aux_loss  = the same per sequence (T = s), averaged over the b sequences

Each MoE layer adds its balancing loss to the objective (per micro-batch, averaged over
micro-batches like the lm loss), MTP layers included. megatron-core's MTP layers keep the
sequence length: depth k reads the input ids rolled k places left with the freed tail set
to token 0 (``roll_tensor``; RoPE keeps positions 0..s-1); the tail positions have no
target but are routed, so
they count in the MTP layers' balancing loss (and expert-bias token counts). With MoE the
reference runs the MTP layers the same way (``gpt_mtp.forward``); for the losses it makes no
difference (causal attention, relative positions). Expert ``e``'s weights are read by
megatron-core's plain ``state_dict()`` names: ``mlp.experts.local_experts.{e}.linear_fc*``,
``mlp.router.weight`` (``mlp.router.expert_bias``), ``mlp.shared_experts.linear_fc*``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F

Weights = Dict[str, torch.Tensor]


@dataclass(frozen=True)
class MoEReference:
    num_experts: int
    topk: int
    layers: Tuple[int, ...]  # 1: MoE, per decoder layer
    score_function: str = "softmax"
    pre_softmax: bool = False
    num_groups: Optional[int] = None
    group_topk: Optional[int] = None
    scaling: Optional[float] = None
    balancing: str = "aux_loss"  # aux_loss | seq_aux_loss | none
    aux_coeff: float = 0.0
    use_expert_bias: bool = True  # use the router's expert_bias when the weights have one
    shared: bool = False

    def is_moe(self, name: str) -> bool:
        """Whether the layer ``name`` (``decoder.layers.i`` or an MTP layer) is MoE."""
        if name.startswith("decoder.layers."):
            return bool(self.layers[int(name.split(".")[2])])
        return bool(self.layers[-1])  # MTP layers copy the last decoder layer


def swiglu_mlp(x: torch.Tensor, w: Weights, name: str) -> torch.Tensor:
    gate, up = F.linear(x, w[f"{name}.linear_fc1.weight"]).chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, w[f"{name}.linear_fc2.weight"])


def _choose(scores: torch.Tensor, m: MoEReference) -> torch.Tensor:
    """Indices ``[T, k]`` of the chosen experts (groups first when configured)."""
    if m.group_topk:
        grouped = scores.view(scores.shape[0], m.num_groups, -1)
        group_score = grouped.topk(m.topk // m.group_topk, dim=-1).values.sum(-1)
        keep = torch.zeros_like(group_score, dtype=torch.bool)
        keep.scatter_(1, group_score.topk(m.group_topk, dim=-1).indices, True)
        keep = keep.repeat_interleave(m.num_experts // m.num_groups, dim=1)
        scores = scores.masked_fill(~keep, float("-inf"))
    return scores.topk(m.topk, dim=-1).indices


def route(x: torch.Tensor, w: Weights, name: str, m: MoEReference
          ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For tokens ``[T, h]``: (routing weights ``[T, E]``, zero where not chosen; the chosen
    mask ``[T, E]``; the logits)."""
    logits = F.linear(x, w[f"{name}.router.weight"]).float()
    bias = w.get(f"{name}.router.expert_bias") if m.use_expert_bias else None
    if m.score_function == "softmax":
        scores = logits.softmax(-1)
        index = _choose(scores if m.pre_softmax else logits, m)
        chosen = scores.gather(1, index) if m.pre_softmax \
            else logits.gather(1, index).softmax(-1)
    else:
        scores = logits.sigmoid()
        index = _choose(scores + bias.float() if bias is not None else scores, m)
        chosen = scores.gather(1, index)
        if m.topk > 1:
            chosen = chosen / (chosen.sum(-1, keepdim=True) + 1e-20)
    if m.scaling:
        chosen = chosen * m.scaling
    weights = torch.zeros_like(logits).scatter(1, index, chosen)
    mask = torch.zeros_like(logits, dtype=torch.bool).scatter(1, index, True)
    return weights, mask, logits


def switch_loss(logits: torch.Tensor, m: MoEReference) -> torch.Tensor:
    """``E / (k T^2) sum_e P_e f_e`` over the T tokens of ``logits`` ``[T, E]``."""
    if m.score_function == "softmax":
        scores = logits.softmax(-1)
    else:
        scores = logits.sigmoid()
        scores = scores / (scores.sum(-1, keepdim=True) + 1e-20)
    counts = torch.zeros_like(scores).scatter(1, scores.topk(m.topk, -1).indices, 1.0).sum(0)
    tokens = logits.shape[0]
    return m.num_experts / (m.topk * tokens * tokens) * (scores.sum(0) * counts).sum()


def balancing_loss(logits: torch.Tensor, batch: int, m: MoEReference) -> torch.Tensor:
    """The layer's balancing loss (without its coefficient), logits ``[b * s, E]``."""
    if m.balancing == "aux_loss":
        return switch_loss(logits, m)
    per_sequence = logits.view(batch, -1, m.num_experts)
    return sum(switch_loss(seq, m) for seq in per_sequence) / batch


def moe_mlp(x: torch.Tensor, w: Weights, name: str, m: MoEReference
            ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(MoE output ``[b, s, h]``, balancing loss without coefficient or None)."""
    b, s, h = x.shape
    tokens = x.reshape(-1, h)
    weights, mask, logits = route(tokens, w, name, m)
    out = torch.zeros_like(tokens)
    for e in range(m.num_experts):
        rows = mask[:, e].nonzero().flatten()
        if rows.numel():
            expert = swiglu_mlp(tokens[rows], w, f"{name}.experts.local_experts.{e}")
            out = out.index_add(0, rows, expert * weights[rows, e:e + 1].to(expert.dtype))
    if m.shared:
        out = out + swiglu_mlp(tokens, w, f"{name}.shared_experts")
    aux = None
    if m.balancing != "none" and m.aux_coeff > 0:
        aux = balancing_loss(logits, b, m)
    return out.view(b, s, h), aux

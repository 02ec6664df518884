"""MoE layers: our single-rank names <-> GLM-4.5's (``Glm4MoeForCausalLM``), pure tensors.

=================================================  =============================================
ours (megatron-core, local spec, TP = EP = 1)       Hugging Face (GLM-4.5 / DeepSeek-V3 hub names)
=================================================  =============================================
``mlp.router.weight`` ``[E, h]``                    ``mlp.gate.weight``
``mlp.router.expert_bias`` ``[E]`` (fp32)           ``mlp.gate.e_score_correction_bias`` (zeros
                                                    when trained without expert bias)
``mlp.experts.local_experts.{e}.linear_fc1``        ``mlp.experts.{e}.gate_proj``, ``up_proj``
``mlp.experts.local_experts.{e}.linear_fc2``        ``mlp.experts.{e}.down_proj``
``mlp.shared_experts.linear_fc1`` / ``fc2``          ``mlp.shared_experts.gate_proj``, ``up_proj``
                                                    / ``down_proj``
=================================================  =============================================

The hub stores one tensor per expert (what vLLM's and SGLang's loaders read, and what
transformers 5 merges into its fused ``experts.gate_up_proj`` on load).

    moe_to_hf(ours, "decoder.layers.3.", "model.layers.3.", experts=8, out=hf)
    moe_from_hf(hf, "model.layers.3.", "decoder.layers.3.", experts=8, out=ours)
"""

from __future__ import annotations

from typing import Dict

import torch

from mtp_megatron.hf.fused import merge_gate_up, split_gate_up

Tensors = Dict[str, torch.Tensor]
# (ours, HF) for the swiglu MLPs of an MoE layer, {e} = expert index
_MLPS = (("mlp.experts.local_experts.{e}.", "mlp.experts.{e}."),
         ("mlp.shared_experts.", "mlp.shared_experts."))


def _mlp_to_hf(ours: Tensors, prefix: str, hf_prefix: str, out: Tensors) -> None:
    gate, up = split_gate_up(ours[f"{prefix}linear_fc1.weight"])
    out[f"{hf_prefix}gate_proj.weight"] = gate
    out[f"{hf_prefix}up_proj.weight"] = up
    out[f"{hf_prefix}down_proj.weight"] = ours[f"{prefix}linear_fc2.weight"]


def _mlp_from_hf(hf: Tensors, hf_prefix: str, prefix: str, out: Tensors) -> None:
    out[f"{prefix}linear_fc1.weight"] = merge_gate_up(hf[f"{hf_prefix}gate_proj.weight"],
                                                      hf[f"{hf_prefix}up_proj.weight"])
    out[f"{prefix}linear_fc2.weight"] = hf[f"{hf_prefix}down_proj.weight"]


def is_moe_layer(ours: Tensors, prefix: str) -> bool:
    return f"{prefix}mlp.router.weight" in ours


def moe_to_hf(ours: Tensors, prefix: str, hf_prefix: str, *, experts: int, out: Tensors) -> None:
    """One MoE layer's router, experts and shared experts in HF names."""
    router = ours[f"{prefix}mlp.router.weight"]
    out[f"{hf_prefix}mlp.gate.weight"] = router
    bias = ours.get(f"{prefix}mlp.router.expert_bias")
    out[f"{hf_prefix}mlp.gate.e_score_correction_bias"] = (
        bias.float() if bias is not None
        else torch.zeros(experts, dtype=torch.float32, device=router.device))
    for e in range(experts):
        ours_mlp, hf_mlp = (p.format(e=e) for p in _MLPS[0])
        _mlp_to_hf(ours, prefix + ours_mlp, hf_prefix + hf_mlp, out)
    if f"{prefix}mlp.shared_experts.linear_fc1.weight" in ours:
        _mlp_to_hf(ours, prefix + _MLPS[1][0], hf_prefix + _MLPS[1][1], out)


def moe_from_hf(hf: Tensors, hf_prefix: str, prefix: str, *, experts: int, expert_bias: bool,
                out: Tensors) -> None:
    """The inverse of :func:`moe_to_hf`; ``expert_bias``: whether our model keeps one."""
    out[f"{prefix}mlp.router.weight"] = hf[f"{hf_prefix}mlp.gate.weight"]
    if expert_bias:
        out[f"{prefix}mlp.router.expert_bias"] = \
            hf[f"{hf_prefix}mlp.gate.e_score_correction_bias"].float()
    for e in range(experts):
        ours_mlp, hf_mlp = (p.format(e=e) for p in _MLPS[0])
        _mlp_from_hf(hf, hf_prefix + hf_mlp, prefix + ours_mlp, out)
    if f"{hf_prefix}mlp.shared_experts.gate_proj.weight" in hf:
        _mlp_from_hf(hf, hf_prefix + _MLPS[1][1], prefix + _MLPS[1][0], out)

"""Weights: our single-rank (TP = PP = 1) state dict <-> Hugging Face names (pure tensors).

    main, mtp = to_hf(state, arch, shape)         # two dicts of HF-named tensors
    state = from_hf(main, mtp, arch, shape)       # our names; MTP modules found in ``mtp``

MTP module ``k`` (0-based) is stored as DeepSeek-V3 stores its MTP layer: HF decoder layer
``L + k`` (``L = num_hidden_layers``) holding ``enorm`` (norm of the next token's embedding),
``hnorm`` (norm of the previous depth's hidden state), ``eh_proj`` (``[h, 2h]``, applied to
``cat(enorm(emb), hnorm(h))``: megatron-core concatenates in the same order), the
transformer layer under the decoder layer's own names, ``shared_head.norm`` (megatron-core's
``final_layernorm`` of the module) and, with untied embeddings, ``shared_head.head`` (a copy
of the output layer, which the modules share). MoE architectures (GLM-4.5) always carry
``shared_head.head`` and ``embed_tokens`` copies, as DeepSeek-V3's and GLM-4.5's checkpoints
do, and their MoE layers convert in ``hf/moe.py``.

The vocabulary: HF tensors have the text vocabulary ``V``; ours are padded to
``padded_vocab`` rows (``--make-vocab-size-divisible-by`` x TP). Padding rows are dropped on
export and zero on import.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Tuple

import torch

from mtp_megatron.hf.architectures import Architecture
from mtp_megatron.hf.deps import HFError
from mtp_megatron.hf.fused import merge_gate_up, merge_qkv, split_gate_up, split_qkv
from mtp_megatron.hf.moe import is_moe_layer, moe_from_hf, moe_to_hf

Tensors = Dict[str, torch.Tensor]
PARAMS = ("weight", "bias")
# Transformer Engine's spec fuses the pre-attention / pre-MLP norms into the next linear.
TE_NAMES = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "self_attention.linear_qkv.layer_norm_bias": "input_layernorm.bias",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
    "mlp.linear_fc1.layer_norm_bias": "pre_mlp_layernorm.bias",
    # MLA: the latent norms fused into the up projections (--qk-layernorm)
    "self_attention.linear_q_up_proj.layer_norm_weight": "self_attention.q_layernorm.weight",
    "self_attention.linear_kv_up_proj.layer_norm_weight": "self_attention.kv_layernorm.weight",
}
MTP_OWN = (("enorm", "enorm"), ("hnorm", "hnorm"), ("eh_proj", "eh_proj"),
           ("final_layernorm", "shared_head.norm"))


@dataclass(frozen=True)
class Shape:
    """What the conversion needs to know about the model."""

    num_layers: int
    heads: int
    groups: int
    head_dim: int
    vocab_size: int  # the text vocabulary (HF rows)
    padded_vocab: int  # our rows
    mtp_layers: int = 0
    tied: bool = True
    experts: int = 0  # routed experts per MoE layer (hf/moe.py)
    expert_bias: bool = False  # our MoE routers keep an expert bias


def normalize(state: Tensors) -> Tensors:
    """Our tensors only (no ``_extra_state``), local-spec names (TE's fused norms renamed)."""
    out = {}
    for key, value in state.items():
        if key.endswith("_extra_state") or not isinstance(value, torch.Tensor):
            continue
        for te, local in TE_NAMES.items():
            if key.endswith("." + te):
                key = key[: -len(te)] + local
        out[key] = value
    return out


def _layer_to_hf(ours: Tensors, prefix: str, hf_prefix: str, arch: Architecture,
                 shape: Shape, out: Tensors) -> None:
    for rule in arch.layer_rules:
        for param in PARAMS:
            key = f"{prefix}{rule.ours}.{param}"
            if key not in ours:
                continue
            tensor = ours[key]
            if rule.kind == "qkv":
                parts = split_qkv(tensor, heads=shape.heads, groups=shape.groups,
                                  head_dim=shape.head_dim)
            elif rule.kind == "gate_up":
                parts = split_gate_up(tensor)
            else:
                parts = (tensor,)
            for name, part in zip(rule.hf, parts):
                out[f"{hf_prefix}{name}.{param}"] = part
    if arch.moe and is_moe_layer(ours, prefix):
        moe_to_hf(ours, prefix, hf_prefix, experts=shape.experts, out=out)


def _layer_from_hf(hf: Tensors, hf_prefix: str, prefix: str, arch: Architecture,
                   shape: Shape, out: Tensors) -> None:
    for rule in arch.layer_rules:
        for param in PARAMS:
            keys = [f"{hf_prefix}{name}.{param}" for name in rule.hf]
            if not all(k in hf for k in keys):
                continue
            parts = [hf[k] for k in keys]
            if rule.kind == "qkv":
                tensor = merge_qkv(*parts, heads=shape.heads, groups=shape.groups,
                                   head_dim=shape.head_dim)
            elif rule.kind == "gate_up":
                tensor = merge_gate_up(*parts)
            else:
                tensor = parts[0]
            out[f"{prefix}{rule.ours}.{param}"] = tensor
    if arch.moe and f"{hf_prefix}mlp.gate.weight" in hf:
        moe_from_hf(hf, hf_prefix, prefix, experts=shape.experts, expert_bias=shape.expert_bias,
                    out=out)


def _params(state: Tensors, prefix: str) -> Tensors:
    return {p: state[f"{prefix}.{p}"] for p in PARAMS if f"{prefix}.{p}" in state}


def to_hf(state: Tensors, arch: Architecture, shape: Shape) -> Tuple[Tensors, Tensors]:
    """(main model, MTP modules) in HF names from our single-rank state dict."""
    ours = normalize(state)
    v = shape.vocab_size
    main: Tensors = {f"{arch.embedding}.weight": ours["embedding.word_embeddings.weight"][:v]}
    for i in range(shape.num_layers):
        _layer_to_hf(ours, f"decoder.layers.{i}.", f"{arch.layer_prefix}{i}.", arch, shape, main)
    for p, t in _params(ours, "decoder.final_layernorm").items():
        main[f"{arch.final_norm}.{p}"] = t
    if not shape.tied:
        main[f"{arch.output}.weight"] = ours["output_layer.weight"][:v]
    mtp: Tensors = {}
    for k in range(shape.mtp_layers):
        ours_prefix, hf_prefix = f"mtp.layers.{k}.", f"{arch.layer_prefix}{shape.num_layers + k}."
        for name, hf_name in MTP_OWN:
            for p, t in _params(ours, ours_prefix + name).items():
                mtp[f"{hf_prefix}{hf_name}.{p}"] = t
        _layer_to_hf(ours, ours_prefix + "transformer_layer.", hf_prefix, arch, shape, mtp)
        head = "embedding.word_embeddings.weight" if shape.tied else "output_layer.weight"
        if not shape.tied or arch.moe:
            mtp[f"{hf_prefix}shared_head.head.weight"] = ours[head][:v]
        if arch.moe:  # DeepSeek-V3's layout: each MTP layer ships the embedding it reads
            mtp[f"{hf_prefix}embed_tokens.weight"] = ours["embedding.word_embeddings.weight"][:v]
    return _own(main), _own(mtp)


def _own(tensors: Tensors) -> Tensors:
    """Contiguous copies that share no storage (safetensors refuses shared tensors)."""
    return {k: t.detach().clone().contiguous() for k, t in tensors.items()}


def _pad_vocab(t: torch.Tensor, shape: Shape, name: str) -> torch.Tensor:
    if t.shape[0] != shape.vocab_size:
        raise HFError(f"{name} has {t.shape[0]} rows, config.json says vocab_size="
                      f"{shape.vocab_size}")
    padded = t.new_zeros((shape.padded_vocab,) + tuple(t.shape[1:]))
    padded[: shape.vocab_size] = t
    return padded


def from_hf(main: Tensors, mtp: Tensors, arch: Architecture, shape: Shape,
            mtp_from_file: int = 0) -> Tensors:
    """Our state dict from HF tensors. ``mtp_from_file``: how many of our MTP modules to take
    from ``mtp`` (the others are left out, for the caller to initialise)."""
    emb = f"{arch.embedding}.weight"
    ours: Tensors = {"embedding.word_embeddings.weight": _pad_vocab(main[emb], shape, emb)}
    for i in range(shape.num_layers):
        _layer_from_hf(main, f"{arch.layer_prefix}{i}.", f"decoder.layers.{i}.", arch, shape,
                       ours)
    for p in PARAMS:
        if f"{arch.final_norm}.{p}" in main:
            ours[f"decoder.final_layernorm.{p}"] = main[f"{arch.final_norm}.{p}"]
    if not shape.tied:
        out = f"{arch.output}.weight"
        ours["output_layer.weight"] = _pad_vocab(main[out], shape, out)
    for k in range(mtp_from_file):
        ours_prefix, hf_prefix = f"mtp.layers.{k}.", f"{arch.layer_prefix}{shape.num_layers + k}."
        for name, hf_name in MTP_OWN:
            for p in PARAMS:
                if f"{hf_prefix}{hf_name}.{p}" in mtp:
                    ours[f"{ours_prefix}{name}.{p}"] = mtp[f"{hf_prefix}{hf_name}.{p}"]
        _layer_from_hf(mtp, hf_prefix, ours_prefix + "transformer_layer.", arch, shape, ours)
    return ours

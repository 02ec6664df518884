"""Model sizes and FLOPs of the GPT + MTP model, counted from the config alone.

Used by ``--dry-run`` (any world size, no processes started) and by the training log's
TFLOP/s. Parameter counts per stage and rank live in ``mtp_megatron.plan.memory``;
tests check both against built megatron-core models.

FLOPs are per token, forward = 2 x multiply-adds, training = 3 x forward; attention
scores count the full s x s product (Megatron's convention, no causal discount).

Mixture of Experts: an MoE layer holds a router (``E x h``), ``E`` routed experts of width
``--moe-ffn-hidden-size`` and the shared experts (``--moe-shared-expert-intermediate-size``);
a token passes the router, its top-k experts and the shared experts, so its FLOPs count
the *active* experts only. The MTP layers have the last decoder layer's type.

Multi-latent attention (``--multi-latent-attention``, ``n`` heads): the query comes from
the hidden state through a ``--q-lora-rank`` latent (``h x q_lora + q_lora x n(d_qk +
d_pe)``; without it ``h x n(d_qk + d_pe)``), keys and values from one latent
(``h x (kv_lora + d_pe)`` down, ``kv_lora x n(d_qk + d_v)`` up), the output projection
is ``n d_v x h``; its scores cost ``2 s n (d_qk + d_pe)`` and ``2 s n d_v`` per token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List

from mtp_megatron.config import RunConfig


@dataclass(frozen=True)
class Sizes:
    h: int
    heads: int
    kv: int  # key/value width: kv_channels x query groups
    ffn: int
    vocab: int
    seq: int
    bias: bool
    swiglu: bool
    norm: int  # parameters of one norm: weight (RMSNorm) or weight + bias (LayerNorm)
    learned_pos: bool
    max_pos: int
    experts: int = 0  # routed experts per MoE layer (0: dense)
    topk: int = 0
    moe_ffn: int = 0
    shared: int = 0  # total shared-expert width
    mla: bool = False  # multi-latent attention: the widths below (0 without)
    q_lora: int = 0  # 0: queries straight from the hidden state
    kv_lora: int = 0
    qk: int = 0  # per-head query/key width without RoPE
    pe: int = 0  # per-head RoPE width (the key's part shared by all heads)
    v: int = 0


def sizes(cfg: RunConfig, vocab_size: int) -> Sizes:
    m = cfg.model
    return Sizes(
        h=m.hidden_size, heads=m.num_attention_heads,
        kv=m.hidden_size // m.num_attention_heads * m.query_groups,
        ffn=m.ffn_size, vocab=vocab_size, seq=m.seq_length, bias=not m.disable_bias_linear,
        swiglu=m.swiglu, norm=m.hidden_size * (1 if m.normalization == "RMSNorm" else 2),
        learned_pos=m.position_embedding_type == "learned_absolute",
        max_pos=m.max_position_embeddings or m.seq_length,
        experts=m.num_experts or 0, topk=m.moe_router_topk if m.moe else 0,
        moe_ffn=m.moe_ffn_size if m.moe else 0,
        shared=m.moe_shared_expert_intermediate_size or 0,
        **_mla_sizes(m),
    )


def _mla_sizes(m) -> Dict[str, int]:
    if not m.multi_latent_attention:
        return {}
    return dict(mla=True, q_lora=m.q_lora_rank or 0, kv_lora=m.kv_lora_rank,
                qk=m.qk_head_dim, pe=m.qk_pos_emb_head_dim, v=m.v_head_dim)


def mla_matmul_params(s: Sizes) -> Dict[str, int]:
    """Multi-latent attention's projections by megatron-core's module name."""
    q = s.heads * (s.qk + s.pe)
    parts = dict(linear_q_down_proj=s.h * s.q_lora, linear_q_up_proj=s.q_lora * q) \
        if s.q_lora else dict(linear_q_proj=s.h * q)
    parts.update(linear_kv_down_proj=s.h * (s.kv_lora + s.pe),
                 linear_kv_up_proj=s.kv_lora * s.heads * (s.qk + s.v),
                 linear_proj=s.heads * s.v * s.h)
    return parts


def attention_matmul_params(s: Sizes) -> int:
    if s.mla:
        return sum(mla_matmul_params(s).values())
    return s.h * (s.h + 2 * s.kv) + s.h * s.h  # QKV, output projection


def attention_score_flops(s: Sizes) -> int:
    """Forward FLOPs per token of one layer's QK^T and AV (full s x s)."""
    if s.mla:
        return 2 * s.seq * s.heads * (s.qk + s.pe + s.v)
    return 2 * 2 * s.seq * s.h


def mlp_matmul_params(s: Sizes, width: int) -> int:
    """One MLP of ``width``: fc1 (two halves with SwiGLU) and fc2."""
    return s.h * width * (2 if s.swiglu else 1) + width * s.h


def layer_matmul_params(s: Sizes, moe: bool = False, active: bool = False) -> int:
    """Weights of one transformer layer that take part in matmuls: dense, or MoE with all
    experts (``active=False``) or a token's top-k (``active=True``)."""
    if not moe:
        return attention_matmul_params(s) + mlp_matmul_params(s, s.ffn)
    experts = s.topk if active else s.experts
    return (attention_matmul_params(s) + s.experts * s.h + experts * mlp_matmul_params(
        s, s.moe_ffn) + (mlp_matmul_params(s, s.shared) if s.shared else 0))


def layer_types(cfg: RunConfig) -> Dict[str, List[bool]]:
    """MoE (True) or dense per decoder layer and per MTP layer (the last layer's type)."""
    decoder = [bool(t) for t in cfg.model.moe_layers]
    depth = cfg.mtp.mtp_num_layers if cfg.mtp.enabled else 0
    return {"decoder": decoder, "mtp": [decoder[-1]] * depth}


def model_params(cfg: RunConfig, vocab_size: int) -> Dict[str, int]:
    """Matmul weights of the whole model (embedding and MTP included, norms not):
    ``total`` held, ``active`` used per token (the same for a dense model)."""
    s = sizes(cfg, vocab_size)
    types = layer_types(cfg)
    mtp_glue = 2 * s.h * s.h  # eh_proj per MTP layer
    mtp_layers = 1 if cfg.mtp.mtp_use_repeated_layer and types["mtp"] else len(types["mtp"])
    out = {}
    for key, active in (("total", False), ("active", True)):
        layers = [layer_matmul_params(s, moe, active) for moe in types["decoder"]]
        layers += [layer_matmul_params(s, moe, active) + mtp_glue
                   for moe in types["mtp"][:mtp_layers]]
        head = 0 if not cfg.model.untie_embeddings_and_output_weights else s.vocab * s.h
        out[key] = sum(layers) + s.vocab * s.h + head
    return out


def flops_per_token(cfg: RunConfig, vocab_size: int, *, with_mtp: bool = True) -> Dict[str, float]:
    """Training FLOPs per token (forward + backward), split by where they are spent."""
    s = sizes(cfg, vocab_size)
    attention = attention_score_flops(s)  # QK^T and AV, per token, per layer (forward)
    types = layer_types(cfg)

    def layer(moe: bool) -> float:  # a token's forward FLOPs: the active experts only
        return 2 * layer_matmul_params(s, moe, active=True) + attention

    parts = {
        "decoder": sum(layer(moe) for moe in types["decoder"]),
        "logits": 2 * s.h * s.vocab,
        "mtp_layers": 0.0,
        "eh_proj": 0.0,
        "mtp_logits": 0.0,
    }
    depth = cfg.mtp.mtp_num_layers if (with_mtp and cfg.mtp.enabled) else 0
    parts["mtp_layers"] = sum(layer(moe) for moe in types["mtp"][:depth])
    parts["eh_proj"] = depth * 2 * (2 * s.h * s.h)
    parts["mtp_logits"] = depth * 2 * s.h * s.vocab
    parts = {k: 3.0 * v for k, v in parts.items()}
    parts["total"] = sum(parts.values())
    return parts

"""Model sizes and FLOPs of the GPT + MTP model, counted from the config alone.

Used by ``--dry-run`` (any world size, no processes started) and by the training log's
TFLOP/s. Parameter counts per stage and rank live in ``mtp_megatron.plan.memory``;
tests check both against built megatron-core models.

FLOPs are per token, forward = 2 x multiply-adds, training = 3 x forward; attention
scores count the full s x s product (Megatron's convention, no causal discount).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict

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


def sizes(cfg: RunConfig, vocab_size: int) -> Sizes:
    m = cfg.model
    return Sizes(
        h=m.hidden_size, heads=m.num_attention_heads,
        kv=m.hidden_size // m.num_attention_heads * m.query_groups,
        ffn=m.ffn_size, vocab=vocab_size, seq=m.seq_length, bias=not m.disable_bias_linear,
        swiglu=m.swiglu, norm=m.hidden_size * (1 if m.normalization == "RMSNorm" else 2),
        learned_pos=m.position_embedding_type == "learned_absolute",
        max_pos=m.max_position_embeddings or m.seq_length,
    )


def layer_matmul_params(s: Sizes) -> int:
    """Weights of one transformer layer that take part in matmuls."""
    qkv = s.h * (s.h + 2 * s.kv)
    proj = s.h * s.h
    fc1 = s.h * s.ffn * (2 if s.swiglu else 1)
    fc2 = s.ffn * s.h
    return qkv + proj + fc1 + fc2


def flops_per_token(cfg: RunConfig, vocab_size: int, *, with_mtp: bool = True) -> Dict[str, float]:
    """Training FLOPs per token (forward + backward), split by where they are spent."""
    s = sizes(cfg, vocab_size)
    attention = 2 * 2 * s.seq * s.h  # QK^T and AV, per token, per layer (forward)
    layer = 2 * layer_matmul_params(s) + attention
    parts = {
        "decoder": cfg.model.num_layers * layer,
        "logits": 2 * s.h * s.vocab,
        "mtp_layers": 0.0,
        "eh_proj": 0.0,
        "mtp_logits": 0.0,
    }
    depth = cfg.mtp.mtp_num_layers if (with_mtp and cfg.mtp.enabled) else 0
    parts["mtp_layers"] = depth * layer
    parts["eh_proj"] = depth * 2 * (2 * s.h * s.h)
    parts["mtp_logits"] = depth * 2 * s.h * s.vocab
    parts = {k: 3.0 * v for k, v in parts.items()}
    parts["total"] = sum(parts.values())
    return parts

"""Parameters and FLOPs of the GPT + MTP model, counted from the config alone.

Used by ``--dry-run`` (any world size, no processes started) and by the training log's
TFLOP/s. Tests check the counts against built megatron-core models.

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
    learned_pos: bool
    max_pos: int


def sizes(cfg: RunConfig, vocab_size: int) -> Sizes:
    m = cfg.model
    return Sizes(
        h=m.hidden_size, heads=m.num_attention_heads,
        kv=m.hidden_size // m.num_attention_heads * m.query_groups,
        ffn=m.ffn_size, vocab=vocab_size, seq=m.seq_length, bias=not m.disable_bias_linear,
        swiglu=m.swiglu, learned_pos=m.position_embedding_type == "learned_absolute",
        max_pos=m.max_position_embeddings or m.seq_length,
    )


def layer_matmul_params(s: Sizes) -> int:
    """Weights of one transformer layer that take part in matmuls."""
    qkv = s.h * (s.h + 2 * s.kv)
    proj = s.h * s.h
    fc1 = s.h * s.ffn * (2 if s.swiglu else 1)
    fc2 = s.ffn * s.h
    return qkv + proj + fc1 + fc2


def layer_params(s: Sizes) -> int:
    """All parameters of one transformer layer (2 norms, biases when enabled)."""
    biases = 0
    if s.bias:
        biases = (s.h + 2 * s.kv) + s.h + s.ffn * (2 if s.swiglu else 1) + s.h
    return layer_matmul_params(s) + biases + 2 * s.h


def mtp_layer_params(s: Sizes) -> int:
    """One MTP module: enorm, hnorm, eh_proj (2h -> h, no bias), a layer, final norm."""
    return 2 * s.h + 2 * s.h * s.h + layer_params(s) + s.h


def embedding_params(s: Sizes) -> int:
    return s.vocab * s.h + (s.max_pos * s.h if s.learned_pos else 0)


@dataclass(frozen=True)
class StageParams:
    decoder: int
    embedding: int
    output: int
    final_norm: int
    mtp: int

    @property
    def total(self) -> int:
        return self.decoder + self.embedding + self.output + self.final_norm + self.mtp


def stage_params(cfg: RunConfig, vocab_size: int, pp_rank: int) -> StageParams:
    """Parameters held by one pipeline stage (summed over its TP shards and chunks)."""
    s = sizes(cfg, vocab_size)
    pp = cfg.parallel.pipeline_model_parallel_size
    first, last = pp_rank == 0, pp_rank == pp - 1
    tied = not cfg.model.untie_embeddings_and_output_weights
    mtp_here = last and cfg.mtp.enabled
    # The first stage owns the embedding; a last stage that runs MTP (or ties the output
    # head to the embedding) keeps its own copy, synchronised with the first.
    embedding = embedding_params(s) if first else 0
    if not first and mtp_here:
        embedding = embedding_params(s)
    # With tied weights the last stage's logits use the embedding it holds (its own on
    # the first stage, the MTP stage's copy); otherwise it has an output head. (Without
    # MTP, a later last stage keeps the tied copy as its output head.)
    output = s.vocab * s.h if last and not (tied and (first or mtp_here)) else 0
    return StageParams(
        decoder=cfg.model.num_layers // pp * layer_params(s),
        embedding=embedding,
        output=output,
        final_norm=s.h if last else 0,
        mtp=cfg.mtp.mtp_num_layers * mtp_layer_params(s) if mtp_here else 0,
    )


def unique_params(cfg: RunConfig, vocab_size: int) -> int:
    """Parameters of the model, each shared weight counted once."""
    s = sizes(cfg, vocab_size)
    tied = not cfg.model.untie_embeddings_and_output_weights
    mtp = cfg.mtp.mtp_num_layers * mtp_layer_params(s) if cfg.mtp.enabled else 0
    return (embedding_params(s) + cfg.model.num_layers * layer_params(s) + s.h
            + (0 if tied else s.vocab * s.h) + mtp)


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

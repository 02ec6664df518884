"""Bytes per rank: parameters (one TP shard), gradients, optimizer state, activations.

Parameters per rank split each weight the way megatron-core does: QKV, fc1, eh_proj
and the (vocab-parallel) embedding/output by columns, the attention projection and fc2
by rows; norms, row-parallel biases and learned positions are replicated on every TP rank.

Bytes per parameter follow megatron-core's DDP + optimizer as we build them: weights in
the params dtype, gradients in an fp32 buffer (``grad_reduce_in_fp32``), Adam's two fp32
moments plus an fp32 master copy under bf16/fp16; ``--use-distributed-optimizer`` shards
the optimizer state (not the gradient buffer) over the data-parallel ranks.

Activations follow Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large
Transformer Models"), generalised to GQA, SwiGLU and any FFN width: per token and layer
the saved tensors are the two norm inputs, the QKV and fc1 inputs (split by TP only with
sequence parallelism), Q/K/V, the attention output, the fc1 output and the fc2 input
(split by TP), the s x s attention probabilities unless attention is fused (Transformer
Engine's flash attention), and 1-byte dropout masks when dropout is on. The loss head
keeps the fp32 softmax of the logits, V/TP per token, once for the LM head and once per
MTP depth. Not counted: CUDA context, NCCL buffers, allocator fragmentation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Tuple

from mtp_megatron.config import RunConfig
from mtp_megatron.model.counting import (
    Sizes,
    attention_matmul_params,
    layer_types,
    mla_matmul_params,
    mlp_matmul_params,
    sizes,
)
from mtp_megatron.plan.layout import chunk_layers

GIB = 1024**3


@dataclass(frozen=True)
class Shards:
    """Parameters split over the TP ranks, parameters every TP rank holds whole, and the
    routed experts' parameters, split over the ETP x EP ranks of a stage."""

    split: int
    replicated: int
    experts: int = 0

    def per_rank(self, tp: int, expert_split: int = 1) -> int:
        return self.split // tp + self.replicated + self.experts // expert_split

    @property
    def whole(self) -> int:
        return self.split + self.replicated + self.experts

    def __mul__(self, n: int) -> "Shards":
        return Shards(self.split * n, self.replicated * n, self.experts * n)

    def __add__(self, other: "Shards") -> "Shards":
        return Shards(self.split + other.split, self.replicated + other.replicated,
                      self.experts + other.experts)


def _mlp_shards(s: Sizes, width: int) -> Shards:
    """A TP-split MLP of ``width``: fc1 and its bias by columns, fc2 by rows."""
    g = 2 if s.swiglu else 1
    split = mlp_matmul_params(s, width) + (width * g if s.bias else 0)
    return Shards(split, s.h if s.bias else 0)  # fc2's (row-parallel) bias is whole


def _mla_shards(cfg: RunConfig, s: Sizes) -> Shards:
    """Multi-latent attention and the layer's two norms: every projection split over TP
    on the local backend; Transformer Engine keeps the down projections whole. The latent
    norms (--qk-layernorm) are whole; only the output projection has a bias (whole)."""
    parts = mla_matmul_params(s)
    down = parts.get("linear_q_down_proj", 0) + parts["linear_kv_down_proj"]
    whole = down if cfg.model.transformer_impl == "transformer_engine" else 0
    per_width = s.norm // s.h
    norms = per_width * ((s.q_lora + s.kv_lora) if cfg.model.qk_layernorm else 0)
    return Shards(sum(parts.values()) - whole,
                  2 * s.norm + whole + norms + (s.h if s.bias else 0))


def layer_shards(cfg: RunConfig, s: Sizes, moe: bool = False) -> Shards:
    """One transformer layer, dense or MoE: attention, then the MLP, or the router
    (whole on every TP rank), the routed experts (split over ETP x EP) and the shared
    experts (split over TP)."""
    g = 2 if s.swiglu else 1
    attention = _mla_shards(cfg, s) if s.mla else Shards(attention_matmul_params(s), 2 * s.norm)
    if s.bias and not s.mla:
        attention += Shards(s.h + 2 * s.kv, s.h)  # QKV bias split, projection bias whole
    if not moe:
        return attention + _mlp_shards(s, s.ffn)
    expert = mlp_matmul_params(s, s.moe_ffn) + ((s.moe_ffn * g + s.h) if s.bias else 0)
    out = attention + Shards(0, s.experts * s.h, s.experts * expert)
    return out + _mlp_shards(s, s.shared) if s.shared else out


def mtp_shards(cfg: RunConfig, s: Sizes, moe: bool = False) -> Shards:
    """One MTP module: enorm, hnorm, eh_proj (column-parallel, 2h -> h), a layer, a norm."""
    return Shards(2 * s.h * s.h, 3 * s.norm) + layer_shards(cfg, s, moe)


def _decoder_shards(cfg: RunConfig, s: Sizes, pp_rank: int) -> Shards:
    """The decoder layers a stage holds (all its virtual chunks), dense or MoE each."""
    types = layer_types(cfg)["decoder"]
    total = Shards(0, 0)
    for start, end in chunk_layers(cfg, pp_rank):
        for moe in types[start:end]:
            total += layer_shards(cfg, s, moe)
    return total


def stage_shards(cfg: RunConfig, vocab_size: int, pp_rank: int) -> Dict[str, Shards]:
    """What one stage holds, by part (a model replica's share, all its TP ranks)."""
    s = sizes(cfg, vocab_size)
    pp = cfg.parallel.pipeline_model_parallel_size
    first, last = pp_rank == 0, pp_rank == pp - 1
    tied = not cfg.model.untie_embeddings_and_output_weights
    mtp_here = last and cfg.mtp.enabled
    none = Shards(0, 0)
    embedding = Shards(s.vocab * s.h, s.max_pos * s.h if s.learned_pos else 0)
    # Tied weights: logits use the embedding this stage holds (its own, or the MTP copy).
    output = last and not (tied and (first or mtp_here))
    # --mtp-use-repeated-layer: one MTP module's weights, run at every depth
    depth = (1 if cfg.mtp.mtp_use_repeated_layer else cfg.mtp.mtp_num_layers) if mtp_here else 0
    return {
        "decoder": _decoder_shards(cfg, s, pp_rank),
        "embedding": embedding if (first or mtp_here) else none,
        "output": Shards(s.vocab * s.h, 0) if output else none,
        "final_norm": Shards(0, s.norm) if last else none,
        "mtp": mtp_shards(cfg, s, layer_types(cfg)["decoder"][-1]) * depth,
    }


def stage_params(cfg: RunConfig, vocab_size: int, pp_rank: int) -> Dict[str, int]:
    """Parameters of one stage, summed over its TP ranks, by part and ``total``."""
    parts = {k: v.whole for k, v in stage_shards(cfg, vocab_size, pp_rank).items()}
    parts["total"] = sum(parts.values())
    return parts


def rank_params(cfg: RunConfig, vocab_size: int, pp_rank: int) -> Dict[str, int]:
    """Parameters on one rank of stage ``pp_rank`` (all ranks of a stage hold the same
    count), by part, ``total``, and ``experts``: how many of them are routed experts'."""
    par = cfg.parallel
    tp, experts = par.tensor_model_parallel_size, par.expert_tensor_size * \
        par.expert_model_parallel_size
    shards = stage_shards(cfg, vocab_size, pp_rank)
    parts = {k: v.per_rank(tp, experts) for k, v in shards.items()}
    parts["total"] = sum(parts.values())
    parts["experts"] = sum(v.experts for v in shards.values()) // experts
    return parts


@dataclass(frozen=True)
class StateBytes:
    """Model and optimizer state on one rank."""

    weights: int
    grads: int
    optimizer: int

    @property
    def total(self) -> int:
        return self.weights + self.grads + self.optimizer


def state_bytes(cfg: RunConfig, params: int, expert_params: int = 0) -> StateBytes:
    """One rank's weights, gradients and Adam state for ``params`` parameters, of which
    ``expert_params`` are routed experts' (their optimizer state is sharded over the
    expert-data-parallel ranks, the others' over DP x CP)."""
    train, par = cfg.training, cfg.parallel
    half = train.bf16 or train.fp16
    optimizer_per_param = 8 + (4 if half else 0)  # Adam m, v (+ fp32 master weights)
    dense = (params - expert_params) * optimizer_per_param
    experts = expert_params * optimizer_per_param
    if par.use_distributed_optimizer:
        dense = -(-dense // (par.data_parallel_size * par.context_parallel_size))
        experts = -(-experts // par.expert_data_parallel_size)
    return StateBytes(weights=params * (2 if half else 4), grads=params * 4,
                      optimizer=dense + experts)


def activation_dtype_bytes(cfg: RunConfig) -> int:
    return 2 if (cfg.training.bf16 or cfg.training.fp16) else 4


def fused_attention(cfg: RunConfig) -> bool:
    """Transformer Engine's fused (flash) attention keeps no s x s probabilities.

    Without ``--transformer-impl`` a GPU run picks Transformer Engine, so plans assume it.
    """
    return cfg.model.transformer_impl != "local"


def layer_activation_bytes_per_token(cfg: RunConfig, s: Sizes, moe: bool = False) -> float:
    """Bytes one transformer layer saves for backward, per token, on one rank.

    An MoE layer keeps, instead of the MLP's: the router's fp32 scores (E), and per
    routed copy of the token (top-k of them) the permuted expert input (h), the expert's
    fc1 output and fc2 input; the shared experts as an MLP split by TP. On average a
    rank's experts receive top-k copies of each of its own tokens, times ETP (gathered
    over the expert-TP ranks) at 1/ETP of the width: ETP cancels out."""
    par, model = cfg.parallel, cfg.model
    tp = par.tensor_model_parallel_size
    act = activation_dtype_bytes(cfg)
    g = 2 if s.swiglu else 1
    seq_split = tp if par.sequence_parallel else 1
    sequence = act * 4 * s.h + (2 * s.h if model.hidden_dropout > 0 else 0)
    mlp = s.ffn * g + s.ffn
    if moe:
        mlp = (s.shared * g + s.shared) if s.shared else 0
        sequence += 4 * s.experts + act * s.topk * (s.h + s.moe_ffn * g + s.moe_ffn)
    split = act * (_attention_saved_width(s) + mlp)
    if not fused_attention(cfg) and cfg.training.recompute_granularity != "selective":
        probs = s.heads * s.seq
        split += act * probs
        if model.attention_dropout > 0:
            split += probs + act * probs  # mask + dropped probabilities
    return sequence / seq_split + split / tp


def _attention_saved_width(s: Sizes) -> int:
    """Per token, what attention saves split by TP: Q, K, V and the attention output (MLA:
    also its latents, counted as split though TP ranks hold them whole: an estimate)."""
    if not s.mla:
        return (s.h + 2 * s.kv) + s.h
    return (2 * s.heads * (s.qk + s.pe) + 2 * s.heads * s.v + s.q_lora + s.kv_lora
            + s.pe)


def layer_input_bytes_per_token(cfg: RunConfig, s: Sizes) -> float:
    """What a fully recomputed layer keeps: its input (split by TP with sequence parallel)."""
    tp = cfg.parallel.tensor_model_parallel_size
    seq_split = tp if cfg.parallel.sequence_parallel else 1
    return activation_dtype_bytes(cfg) * s.h / seq_split


def chunk_activation_bytes_per_token(cfg: RunConfig, s: Sizes, num_layers: int,
                                     moe_layers: float = 0) -> Tuple[float, float]:
    """``(kept, transient)`` bytes per token for a chunk of ``num_layers`` layers.

    ``kept`` is held per in-flight micro-batch; ``transient`` once, while a recomputed
    group is re-run in backward. ``--recompute-granularity full``: uniform keeps one
    input per group of ``--recompute-num-layers`` and re-runs a group at a time; block
    recomputes the first ``--recompute-num-layers`` layers (their inputs kept) and keeps
    the others whole. Selective is in :func:`layer_activation_bytes_per_token`.
    ``moe_layers`` of the chunk's layers are MoE (an average layer is used for the mix).
    """
    train = cfg.training
    layer = layer_activation_bytes_per_token(cfg, s)
    if moe_layers and num_layers:
        moe = layer_activation_bytes_per_token(cfg, s, moe=True)
        layer = (moe_layers * moe + (num_layers - moe_layers) * layer) / num_layers
    if train.recompute_granularity != "full" or num_layers == 0:
        return num_layers * layer, 0.0
    n = min(train.recompute_num_layers, num_layers)
    inputs = layer_input_bytes_per_token(cfg, s)
    if train.recompute_method == "uniform":
        return -(-num_layers // n) * inputs, n * layer
    return n * inputs + (num_layers - n) * layer, layer


def head_activation_bytes_per_token(cfg: RunConfig, s: Sizes, depth: int) -> Dict[str, float]:
    """The last stage's extras per token: LM head, and per MTP depth its norms/concat,
    its transformer layer and its logits."""
    tp = cfg.parallel.tensor_model_parallel_size
    act = activation_dtype_bytes(cfg)
    seq_split = tp if cfg.parallel.sequence_parallel else 1
    logits = 4 * s.vocab / tp  # fp32 softmax kept by vocab-parallel cross entropy
    lm_head = act * 2 * s.h / seq_split + logits  # final norm input, output-layer input
    # enorm + hnorm inputs, eh_proj input (2h), final norm + output-layer inputs
    mtp_glue = act * 6 * s.h / seq_split
    mtp_layer = mtp_glue + layer_activation_bytes_per_token(
        cfg, s, moe=layer_types(cfg)["decoder"][-1])
    train = cfg.training
    if depth and train.recompute_granularity == "full" and train.recompute_method == "uniform":
        # megatron-core 0.16.1 checkpoints each MTP layer (eh_proj + layer): it keeps the
        # two inputs (hidden states and embeddings) and re-runs one layer at a time
        mtp_layer = 2 * layer_input_bytes_per_token(cfg, s)
    return {
        "lm_logits": lm_head,
        "mtp_layers": depth * mtp_layer,
        "mtp_logits": depth * logits,
    }


def in_flight_chunks(cfg: RunConfig, pp_rank: int) -> int:
    """Micro-batches (times virtual chunks) whose activations a stage holds at its peak.

    1F1B: stage r holds pp - r; interleaved: megatron-core's warmup count + 1 chunks.
    """
    pp = cfg.parallel.pipeline_model_parallel_size
    m = cfg.num_microbatches
    vpp = cfg.virtual_pipeline_size
    if pp == 1:
        return 1
    if not vpp:
        return min(pp - pp_rank, m)
    return min((pp - pp_rank - 1) * 2 + (vpp - 1) * pp + 1, m * vpp)

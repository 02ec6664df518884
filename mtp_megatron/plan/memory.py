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
from mtp_megatron.model.counting import Sizes, layer_matmul_params, sizes

GIB = 1024**3


@dataclass(frozen=True)
class Shards:
    """Parameters split over the TP ranks, and parameters every TP rank holds whole."""

    split: int
    replicated: int

    def per_rank(self, tp: int) -> int:
        return self.split // tp + self.replicated

    @property
    def whole(self) -> int:
        return self.split + self.replicated

    def __mul__(self, n: int) -> "Shards":
        return Shards(self.split * n, self.replicated * n)


def layer_shards(cfg: RunConfig, s: Sizes) -> Shards:
    """One transformer layer."""
    g = 2 if s.swiglu else 1
    split = layer_matmul_params(s)
    replicated = 2 * s.norm
    if s.bias:
        split += (s.h + 2 * s.kv) + s.ffn * g
        replicated += 2 * s.h  # the row-parallel biases: attention proj and fc2
    return Shards(split, replicated)


def mtp_shards(cfg: RunConfig, s: Sizes) -> Shards:
    """One MTP module: enorm, hnorm, eh_proj (column-parallel, 2h -> h), a layer, a norm."""
    layer = layer_shards(cfg, s)
    return Shards(2 * s.h * s.h + layer.split, 3 * s.norm + layer.replicated)


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
        "decoder": layer_shards(cfg, s) * (cfg.model.num_layers // pp),
        "embedding": embedding if (first or mtp_here) else none,
        "output": Shards(s.vocab * s.h, 0) if output else none,
        "final_norm": Shards(0, s.norm) if last else none,
        "mtp": mtp_shards(cfg, s) * depth,
    }


def stage_params(cfg: RunConfig, vocab_size: int, pp_rank: int) -> Dict[str, int]:
    """Parameters of one stage, summed over its TP ranks, by part and ``total``."""
    parts = {k: v.whole for k, v in stage_shards(cfg, vocab_size, pp_rank).items()}
    parts["total"] = sum(parts.values())
    return parts


def rank_params(cfg: RunConfig, vocab_size: int, pp_rank: int) -> Dict[str, int]:
    """Parameters on one rank of stage ``pp_rank`` (all TP ranks of a stage hold the same)."""
    tp = cfg.parallel.tensor_model_parallel_size
    parts = {k: v.per_rank(tp) for k, v in stage_shards(cfg, vocab_size, pp_rank).items()}
    parts["total"] = sum(parts.values())
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


def state_bytes(cfg: RunConfig, params: int) -> StateBytes:
    train, par = cfg.training, cfg.parallel
    half = train.bf16 or train.fp16
    optimizer_per_param = 8 + (4 if half else 0)  # Adam m, v (+ fp32 master weights)
    optimizer = params * optimizer_per_param
    if par.use_distributed_optimizer:
        shards = par.data_parallel_size * par.context_parallel_size
        optimizer = -(-optimizer // shards)
    return StateBytes(weights=params * (2 if half else 4), grads=params * 4, optimizer=optimizer)


def activation_dtype_bytes(cfg: RunConfig) -> int:
    return 2 if (cfg.training.bf16 or cfg.training.fp16) else 4


def fused_attention(cfg: RunConfig) -> bool:
    """Transformer Engine's fused (flash) attention keeps no s x s probabilities.

    Without ``--transformer-impl`` a GPU run picks Transformer Engine, so plans assume it.
    """
    return cfg.model.transformer_impl != "local"


def layer_activation_bytes_per_token(cfg: RunConfig, s: Sizes) -> float:
    """Bytes one transformer layer saves for backward, per token, on one rank."""
    par, model = cfg.parallel, cfg.model
    tp = par.tensor_model_parallel_size
    act = activation_dtype_bytes(cfg)
    g = 2 if s.swiglu else 1
    seq_split = tp if par.sequence_parallel else 1
    sequence = act * 4 * s.h + (2 * s.h if model.hidden_dropout > 0 else 0)
    split = act * ((s.h + 2 * s.kv) + s.h + s.ffn * g + s.ffn)
    if not fused_attention(cfg) and cfg.training.recompute_granularity != "selective":
        probs = s.heads * s.seq
        split += act * probs
        if model.attention_dropout > 0:
            split += probs + act * probs  # mask + dropped probabilities
    return sequence / seq_split + split / tp


def layer_input_bytes_per_token(cfg: RunConfig, s: Sizes) -> float:
    """What a fully recomputed layer keeps: its input (split by TP with sequence parallel)."""
    tp = cfg.parallel.tensor_model_parallel_size
    seq_split = tp if cfg.parallel.sequence_parallel else 1
    return activation_dtype_bytes(cfg) * s.h / seq_split


def chunk_activation_bytes_per_token(cfg: RunConfig, s: Sizes, num_layers: int
                                     ) -> Tuple[float, float]:
    """``(kept, transient)`` bytes per token for a chunk of ``num_layers`` layers.

    ``kept`` is held per in-flight micro-batch; ``transient`` once, while a recomputed
    group is re-run in backward. ``--recompute-granularity full``: uniform keeps one
    input per group of ``--recompute-num-layers`` and re-runs a group at a time; block
    recomputes the first ``--recompute-num-layers`` layers (their inputs kept) and keeps
    the others whole. Selective is in :func:`layer_activation_bytes_per_token`.
    """
    train = cfg.training
    layer = layer_activation_bytes_per_token(cfg, s)
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
    mtp_layer = mtp_glue + layer_activation_bytes_per_token(cfg, s)
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

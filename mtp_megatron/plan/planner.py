"""The plan of a run, computed from the config alone: no processes, no model.

    plan = build_plan(cfg, gpu_memory_gb=80, mfu=0.4)
    plan.stages[-1].rank_params["mtp"]     # MTP parameters on one last-stage rank
    plan.stages[0].total_bytes             # a first-stage rank's memory estimate
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional

from mtp_megatron.config import RunConfig, padded_vocab_size
from mtp_megatron.model.counting import flops_per_token, layer_types, sizes
from mtp_megatron.plan import memory
from mtp_megatron.plan.layout import StageLayout, stage_layouts, world_size

# Vocabularies used when --vocab-size is not given, kept here so planning imports no
# torch: the mock tokenizer's (data.datasets.MOCK_VOCAB_SIZE) and the byte-level one's
# (256 bytes + EOD + pad, data.tokenizers). Other tokenizers: pass --vocab-size.
DEFAULT_VOCAB = 512
BYTE_LEVEL_VOCAB = 258
# H100 SXM dense bf16 tensor-core peak; MFU is measured against it.
H100_BF16_TFLOPS = 989.0
# The GPU memory --dry-run checks against when --gpu-memory-gb is not given (an 80 GB
# H100/A100); the check is then advice, not a failure.
DEFAULT_GPU_MEMORY_GB = 80.0


@dataclass(frozen=True)
class StagePlan:
    """One pipeline stage, and one (any) of its ranks."""

    layout: StageLayout
    stage_params: Dict[str, int]  # one model replica's share, summed over its TP ranks
    rank_params: Dict[str, int]  # one rank
    state: memory.StateBytes
    activations: Dict[str, float]  # bytes per micro-batch on one rank, by part
    in_flight: int  # micro-batches (x virtual chunks) held at the stage's peak
    activation_peak: float

    @property
    def activation_per_microbatch(self) -> float:
        return sum(self.activations.values())

    @property
    def total_bytes(self) -> float:
        return self.state.total + self.activation_peak


@dataclass(frozen=True)
class Plan:
    cfg: RunConfig
    vocab_size: int
    stages: List[StagePlan]
    flops: Dict[str, float]
    flops_without_mtp: Dict[str, float]
    mfu: float
    peak_tflops: float
    gpu_memory_gb: Optional[float]
    gpu_memory_assumed: bool = False  # the default, not --gpu-memory-gb

    @property
    def world_size(self) -> int:
        return world_size(self.cfg)

    @property
    def tokens_per_second(self) -> float:
        """Training throughput of the whole job at ``mfu`` of the GPUs' peak."""
        return self.mfu * self.peak_tflops * 1e12 * self.world_size / self.flops["total"]

    @property
    def seconds_per_iteration(self) -> float:
        train = self.cfg.training
        return train.global_batch_size * self.cfg.model.seq_length / self.tokens_per_second

    def fits(self, stage: StagePlan) -> Optional[bool]:
        if self.gpu_memory_gb is None:
            return None
        return stage.total_bytes <= self.gpu_memory_gb * memory.GIB

    @property
    def all_fit(self) -> Optional[bool]:
        if self.gpu_memory_gb is None:
            return None
        return all(self.fits(stage) for stage in self.stages)


def plan_vocab_size(cfg: RunConfig) -> int:
    default = DEFAULT_VOCAB
    if not cfg.data.mock_data and cfg.data.tokenizer_type == "byte-level":
        default = BYTE_LEVEL_VOCAB
    return padded_vocab_size(cfg.model.vocab_size or default,
                             cfg.model.make_vocab_size_divisible_by,
                             cfg.parallel.tensor_model_parallel_size)


def _activations(cfg: RunConfig, layout: StageLayout, vocab: int) -> Dict[str, float]:
    """Bytes one rank of this stage saves for one micro-batch, by part."""
    s = sizes(cfg, vocab)
    par = cfg.parallel
    tokens = cfg.training.micro_batch_size * cfg.model.seq_length / par.context_parallel_size
    types = layer_types(cfg)["decoder"]
    moe_layers = sum(sum(types[start:end]) for start, end in layout.layers)
    kept, transient = memory.chunk_activation_bytes_per_token(
        cfg, s, layout.num_layers // len(layout.layers), moe_layers / len(layout.layers))
    parts = {"decoder": kept * len(layout.layers)}
    if layout.pp_rank == par.pipeline_model_parallel_size - 1:
        depth = cfg.mtp.mtp_num_layers if cfg.mtp.enabled else 0
        parts.update(memory.head_activation_bytes_per_token(cfg, s, depth))
        if depth and cfg.training.recompute_granularity == "full" \
                and cfg.training.recompute_method == "uniform":
            transient = max(transient, memory.layer_activation_bytes_per_token(
                cfg, s, moe=types[-1]))
    if transient:
        parts["recompute"] = transient  # one group re-run at a time, not per micro-batch
    return {name: per_token * tokens for name, per_token in parts.items()}


def _stage_plan(cfg: RunConfig, layout: StageLayout, vocab: int) -> StagePlan:
    rank_params = memory.rank_params(cfg, vocab, layout.pp_rank)
    acts = _activations(cfg, layout, vocab)
    in_flight = memory.in_flight_chunks(cfg, layout.pp_rank)
    per_chunk = acts["decoder"] / len(layout.layers)
    head = sum(v for k, v in acts.items() if k != "decoder")
    # The head (logits, MTP) runs once per micro-batch in the last chunk, whose backward
    # follows its forward directly on the last stage: one micro-batch of it at a time.
    peak = in_flight * per_chunk + head
    return StagePlan(
        layout=layout,
        stage_params=memory.stage_params(cfg, vocab, layout.pp_rank),
        rank_params=rank_params,
        state=memory.state_bytes(cfg, rank_params["total"], rank_params["experts"]),
        activations=acts,
        in_flight=in_flight,
        activation_peak=peak,
    )


def build_plan(cfg: RunConfig, *, gpu_memory_gb: Optional[float] = None, mfu: float = 0.4,
               peak_tflops: float = H100_BF16_TFLOPS, gpu_memory_assumed: bool = False) -> Plan:
    """Everything --dry-run prints, as numbers."""
    vocab = plan_vocab_size(cfg)
    return Plan(
        cfg=cfg,
        vocab_size=vocab,
        stages=[_stage_plan(cfg, layout, vocab) for layout in stage_layouts(cfg)],
        flops=flops_per_token(cfg, vocab),
        flops_without_mtp=flops_per_token(cfg, vocab, with_mtp=False),
        mfu=mfu,
        peak_tflops=peak_tflops,
        gpu_memory_gb=gpu_memory_gb,
        gpu_memory_assumed=gpu_memory_assumed,
    )

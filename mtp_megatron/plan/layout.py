"""Which rank holds what: megatron-core's rank order and the pipeline stage contents.

megatron-core orders ranks "tp-cp-ep-dp-pp" (TP fastest, PP slowest)::

    rank = tp + TP * (cp + CP * (dp + DP * pp))

so every pipeline stage is one contiguous block of TP x CP x DP ranks and every TP
group is TP consecutive ranks. The embedding lives on the first stage (first virtual
chunk), the final norm, output layer and the MTP layers on the last stage (last chunk).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Tuple

from mtp_megatron.config import RunConfig


@dataclass(frozen=True)
class Coord:
    """A rank's place in the grid."""

    tp: int
    cp: int
    dp: int
    pp: int


def _sizes(cfg: RunConfig) -> Tuple[int, int, int, int]:
    par = cfg.parallel
    return (par.tensor_model_parallel_size, par.context_parallel_size,
            par.data_parallel_size, par.pipeline_model_parallel_size)


def world_size(cfg: RunConfig) -> int:
    tp, cp, dp, pp = _sizes(cfg)
    return tp * cp * dp * pp


def coord_of(cfg: RunConfig, rank: int) -> Coord:
    tp, cp, dp, _ = _sizes(cfg)
    return Coord(tp=rank % tp, cp=rank // tp % cp, dp=rank // (tp * cp) % dp,
                 pp=rank // (tp * cp * dp))


def expert_coord_of(cfg: RunConfig, rank: int) -> Tuple[int, int, int]:
    """A rank's ``(etp, ep, edp)``: megatron-core regroups each stage's TP x CP x DP ranks
    for the experts in the order etp-ep-edp (ETP fastest)."""
    par = cfg.parallel
    tp, cp, dp, _ = _sizes(cfg)
    etp, ep = par.expert_tensor_size, par.expert_model_parallel_size
    inside = rank % (tp * cp * dp)
    return inside % etp, inside // etp % ep, inside // (etp * ep)


def rank_of(cfg: RunConfig, coord: Coord) -> int:
    tp, cp, dp, _ = _sizes(cfg)
    return coord.tp + tp * (coord.cp + cp * (coord.dp + dp * coord.pp))


@dataclass(frozen=True)
class StageLayout:
    """One pipeline stage: its ranks, decoder layers (per virtual chunk) and extras."""

    pp_rank: int
    first_rank: int
    last_rank: int
    layers: Tuple[Tuple[int, int], ...]  # [start, end) per virtual chunk, 0-based
    holds: Tuple[str, ...]

    @property
    def num_layers(self) -> int:
        return sum(end - start for start, end in self.layers)


def chunk_layers(cfg: RunConfig, pp_rank: int) -> Tuple[Tuple[int, int], ...]:
    """Decoder layers of each virtual chunk of a stage (megatron-core's interleaving)."""
    pp = cfg.parallel.pipeline_model_parallel_size
    vpp = cfg.virtual_pipeline_size or 1
    per_chunk = cfg.model.num_layers // (pp * vpp)
    return tuple(((v * pp + pp_rank) * per_chunk, (v * pp + pp_rank + 1) * per_chunk)
                 for v in range(vpp))


def stage_holds(cfg: RunConfig, pp_rank: int) -> Tuple[str, ...]:
    """What besides decoder layers a stage holds, in words."""
    pp = cfg.parallel.pipeline_model_parallel_size
    first, last = pp_rank == 0, pp_rank == pp - 1
    tied = not cfg.model.untie_embeddings_and_output_weights
    vpp = cfg.virtual_pipeline_size
    holds: List[str] = []
    if first:
        holds.append("embedding" + (" (chunk 0)" if vpp else ""))
    if last:
        if first:
            holds.append("output layer = embedding (tied)" if tied else "output layer")
        elif not tied:
            holds.append("output layer")
        elif not cfg.mtp.enabled:
            holds.append("output layer (tied copy of the embedding, synced with stage 0)")
        if not first and cfg.mtp.enabled:
            tied_note = ", also the tied output layer" if tied else ""
            holds.append(f"embedding copy for MTP (synced with stage 0{tied_note})")
        holds.append("final norm")
        if cfg.mtp.enabled:
            where = f" (chunk {vpp - 1})" if vpp else ""
            holds.append(f"MTP x{cfg.mtp.mtp_num_layers}{where}")
    return tuple(holds)


def stage_layouts(cfg: RunConfig) -> List[StageLayout]:
    tp, cp, dp, pp = _sizes(cfg)
    block = tp * cp * dp
    return [
        StageLayout(pp_rank=p, first_rank=p * block, last_rank=(p + 1) * block - 1,
                    layers=chunk_layers(cfg, p), holds=stage_holds(cfg, p))
        for p in range(pp)
    ]


def span(first: int, last: int) -> str:
    return str(first) if first == last else f"{first}-{last}"


def group_spans(start: int, size: int, count: int, stride: int, limit: int = 4) -> str:
    """``count`` groups of ``size`` consecutive ranks, ``stride`` apart: '0-7, 8-15, ..'."""
    shown = [span(start + i * stride, start + i * stride + size - 1)
             for i in range(min(count, limit))]
    if count > limit:
        last = start + (count - 1) * stride
        shown.append(f"... ({count} groups), {span(last, last + size - 1)}")
    return ", ".join(shown)

"""How the model and the batch are split over ranks (``parallel:`` in YAML)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

from mtp_megatron.config.fields import (
    ConfigError,
    check_int,
    check_types,
    flag_of,
    option,
)
from mtp_megatron.config.moe import DISPATCHERS

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ParallelConfig:
    """How the model and the batch are split over ranks (Megatron's order tp-cp-dp-pp)."""

    tensor_model_parallel_size: int = option(1, "Tensor parallel size (TP).", type=int)
    pipeline_model_parallel_size: int = option(1, "Pipeline parallel size (PP).", type=int)
    num_layers_per_virtual_pipeline_stage: Optional[int] = option(
        None, "Layers per virtual pipeline stage (interleaved schedule).", type=int
    )
    context_parallel_size: int = option(1, "Context parallel size (CP).", type=int)
    sequence_parallel: bool = option(False, "Sequence parallelism (needs TP > 1).", type=bool)
    use_distributed_optimizer: bool = option(
        False, "Shard optimizer state over data parallel ranks.", type=bool
    )
    overlap_grad_reduce: bool = option(
        False, "Overlap the data-parallel gradient reduce-scatter/all-reduce with backward "
        "(megatron-core DDP buckets).", type=bool,
    )
    overlap_param_gather: bool = option(
        False, "Overlap the distributed optimizer's parameter all-gather with the next "
        "forward (needs --use-distributed-optimizer).", type=bool,
    )
    ddp_bucket_size: Optional[int] = option(
        None, "Elements per DDP gradient bucket (default: megatron-core's, "
        "max(40M, 1M x DP) with overlap).", type=int,
    )
    expert_model_parallel_size: int = option(
        1, "Expert parallel size (EP): the experts of each MoE layer split over EP "
        "data-parallel ranks.", type=int,
    )
    expert_tensor_parallel_size: Optional[int] = option(
        None, "Tensor parallel size inside each expert (ETP; default: TP).", type=int
    )
    moe_token_dispatcher_type: str = option(
        "allgather", "How tokens reach their experts' ranks: allgather or alltoall.",
        type=str, choices=DISPATCHERS,
    )
    world_size: Optional[int] = option(
        None, "World size (default: from the launcher; set it for --dry-run).", type=int
    )
    distributed_timeout_minutes: int = option(
        10, "Timeout of collectives (NCCL/gloo), in minutes: raise it when rank 0 builds a "
        "large dataset index while the others wait.", type=int
    )

    def __post_init__(self):
        check_types(self)
        for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size",
                     "context_parallel_size"):
            check_int(flag_of(name), getattr(self, name), 1)
        check_int("--expert-model-parallel-size", self.expert_model_parallel_size, 1)
        check_int("--expert-tensor-parallel-size", self.expert_tensor_parallel_size, 1,
                  allow_none=True)
        check_int("--num-layers-per-virtual-pipeline-stage",
                  self.num_layers_per_virtual_pipeline_stage, 1, allow_none=True)
        check_int("--world-size", self.world_size, 1, allow_none=True)
        check_int("--distributed-timeout-minutes", self.distributed_timeout_minutes, 1)
        check_int("--ddp-bucket-size", self.ddp_bucket_size, 1, allow_none=True)
        if self.ddp_bucket_size and not self.overlap_grad_reduce:
            logger.warning("--ddp-bucket-size has no effect without --overlap-grad-reduce "
                           "(megatron-core reduces the whole gradient buffer at once).")
        if self.overlap_param_gather and not self.use_distributed_optimizer:
            raise ConfigError("--overlap-param-gather", True,
                              "only with --use-distributed-optimizer",
                              "the parameter all-gather exists only when the optimizer is "
                              "sharded; add --use-distributed-optimizer or drop "
                              "--overlap-param-gather")
        if self.sequence_parallel and self.tensor_model_parallel_size == 1:
            raise ConfigError("--sequence-parallel", True,
                              "only with --tensor-model-parallel-size > 1")
        if self.num_layers_per_virtual_pipeline_stage and self.pipeline_model_parallel_size == 1:
            raise ConfigError(
                "--num-layers-per-virtual-pipeline-stage",
                self.num_layers_per_virtual_pipeline_stage,
                "only with --pipeline-model-parallel-size > 1",
            )
        if self.world_size is not None and self.world_size % self.model_parallel_size:
            raise ConfigError(
                "--world-size", self.world_size,
                f"a multiple of TP x PP x CP = {self.model_parallel_size}",
            )

    @property
    def model_parallel_size(self) -> int:
        return (self.tensor_model_parallel_size * self.pipeline_model_parallel_size
                * self.context_parallel_size)

    @property
    def expert_tensor_size(self) -> int:
        """ETP as built: --expert-tensor-parallel-size, else TP (Megatron-LM's default)."""
        return self.expert_tensor_parallel_size or self.tensor_model_parallel_size

    @property
    def expert_data_parallel_size(self) -> int:
        """Replicas of each expert: the stage's TP x CP x DP ranks over ETP x EP."""
        stage = self.tensor_model_parallel_size * self.context_parallel_size \
            * self.data_parallel_size
        return stage // (self.expert_tensor_size * self.expert_model_parallel_size)

    @property
    def data_parallel_size(self) -> int:
        return (self.world_size or self.model_parallel_size) // self.model_parallel_size

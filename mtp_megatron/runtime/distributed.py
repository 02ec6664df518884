"""Start and stop the process groups: CUDA + NCCL with a GPU, CPU + gloo without."""

from __future__ import annotations

import datetime
import random

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

from mtp_megatron.config import RunConfig
from mtp_megatron.runtime import cpu_bridge
from mtp_megatron.runtime.launch_env import LaunchEnv


def initialize(cfg: RunConfig, launch: LaunchEnv) -> torch.device:
    """Process group, model-parallel groups and seeds. Returns this rank's device."""
    par = cfg.parallel  # preflight() already matched --world-size with the launcher
    if torch.cuda.is_available():
        torch.cuda.set_device(launch.local_rank)
        device, backend = torch.device("cuda", launch.local_rank), "nccl"
    else:
        cpu_bridge.install()
        device, backend = torch.device("cpu"), "gloo"
    dist.init_process_group(
        backend=backend,
        init_method=f"tcp://{launch.master_addr}:{launch.master_port}",
        rank=launch.rank,
        world_size=launch.world_size,
        timeout=datetime.timedelta(minutes=10),
    )
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=par.tensor_model_parallel_size,
        pipeline_model_parallel_size=par.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=cfg.virtual_pipeline_size,
        context_parallel_size=par.context_parallel_size,
    )
    set_seeds(cfg.training.seed)
    return device


def set_seeds(seed: int) -> None:
    """Megatron's seeding: a different stream per pipeline stage, tracked TP streams."""
    seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def shutdown() -> None:
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def is_last_rank() -> bool:
    return dist.get_rank() == dist.get_world_size() - 1

"""Start and stop the process groups: CUDA + NCCL with a GPU, CPU + gloo without.

The default group is NCCL alone on GPUs: every collective the package issues goes
through :mod:`mtp_megatron.runtime.comm`, which allocates on the group's device, so no
gloo companion is needed (megatron-core still builds its own gloo data-parallel groups,
``create_gloo_process_groups=True``, for the distributed optimizer). See docs/gpu.md.
"""

from __future__ import annotations

import datetime
import logging
import random

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

from mtp_megatron.config import RunConfig
from mtp_megatron.runtime import comm, cpu_bridge, mcore_compat, strict_device
from mtp_megatron.runtime.launch_env import LaunchEnv

logger = logging.getLogger("mtp_megatron")


def select_cuda_device(local_rank: int, visible: int) -> int:
    """The CUDA ordinal this process uses, among the ``visible`` GPUs it can see.

    * all of the node's GPUs visible (torchrun, ``srun`` with ``--gpus-per-node``):
      the ``local_rank``-th;
    * one GPU visible (``srun --gpus-per-task=1``, or CUDA_VISIBLE_DEVICES set per
      process): ordinal 0, whatever the local rank (SLURM_LOCALID > 0 is no ordinal
      there);
    * more processes on the node than visible GPUs otherwise: an error (two ranks on
      one GPU is not a layout NCCL accepts).
    """
    if visible < 1:
        raise RuntimeError("no CUDA device is visible to this process")
    if local_rank < visible:
        return local_rank
    if visible == 1:
        return 0
    raise RuntimeError(
        f"local rank {local_rank} but this process sees only {visible} GPUs: start at most "
        f"{visible} processes per node (--nproc-per-node / --ntasks-per-node), or bind one "
        "GPU per task (srun --gpus-per-task=1)"
    )


def initialize(cfg: RunConfig, launch: LaunchEnv) -> torch.device:
    """Process group, model-parallel groups and seeds. Returns this rank's device."""
    par = cfg.parallel  # preflight() already matched --world-size with the launcher
    mcore_compat.line()  # a tested megatron-core release, or a ConfigError naming them
    if torch.cuda.is_available():
        index = select_cuda_device(launch.local_rank, torch.cuda.device_count())
        torch.cuda.set_device(index)
        device, backend = torch.device("cuda", index), "nccl"
    else:
        cpu_bridge.install()
        device, backend = torch.device("cpu"), "gloo"
    if strict_device.requested():
        strict_device.install()
    dist.init_process_group(
        backend=backend,
        init_method=f"tcp://{launch.master_addr}:{launch.master_port}",
        rank=launch.rank,
        world_size=launch.world_size,
        timeout=datetime.timedelta(minutes=par.distributed_timeout_minutes),
    )
    comm.setup(device)
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=par.tensor_model_parallel_size,
        pipeline_model_parallel_size=par.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=cfg.virtual_pipeline_size,
        context_parallel_size=par.context_parallel_size,
        expert_model_parallel_size=par.expert_model_parallel_size,
        expert_tensor_parallel_size=par.expert_tensor_size,
        distributed_timeout_minutes=par.distributed_timeout_minutes,
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
    comm.teardown()
    strict_device.uninstall()
    cpu_bridge.uninstall()  # megatron-core and torch as they were before initialize()


def is_last_rank() -> bool:
    return dist.get_rank() == dist.get_world_size() - 1

"""CUDA environment the launcher sets itself, before CUDA is initialised.

megatron-core overlaps tensor-parallel communication with compute (sequence parallel's
all-gather/reduce-scatter, the async TP all-reduce of linear layers, TE's TP comm
overlap) by issuing them on one hardware queue in order; that needs
``CUDA_DEVICE_MAX_CONNECTIONS=1`` in the environment when the CUDA context is created
(megatron-core only warns when it is missing). SLURM scripts export it; torchrun and
plain launches did not, so the launcher sets it here, for every launch path.

    apply_cuda_env(cfg)      # in cli.main(), before the Trainer touches CUDA
"""

from __future__ import annotations

import logging
import os
from typing import MutableMapping, Optional

logger = logging.getLogger("mtp_megatron")

MAX_CONNECTIONS = "CUDA_DEVICE_MAX_CONNECTIONS"


def needs_single_connection(cfg) -> bool:
    """Tensor parallelism (with or without sequence parallel) overlaps TP comms."""
    return cfg.parallel.tensor_model_parallel_size > 1 or cfg.parallel.sequence_parallel


def apply_cuda_env(cfg, env: Optional[MutableMapping[str, str]] = None,
                   cuda_available: Optional[bool] = None) -> Optional[str]:
    """Set ``CUDA_DEVICE_MAX_CONNECTIONS=1`` where megatron-core needs it; returns the
    value now in effect (None when nothing applies). A different value the user set is
    kept, with a warning."""
    env = os.environ if env is None else env
    if cuda_available is None:
        import torch

        cuda_available = torch.cuda.is_available()
    if not cuda_available or not needs_single_connection(cfg):
        return env.get(MAX_CONNECTIONS)
    current = env.get(MAX_CONNECTIONS)
    if current is None:
        env[MAX_CONNECTIONS] = "1"
    elif current != "1":
        logger.warning("%s=%s: megatron-core overlaps tensor-parallel communication only "
                       "with 1; keeping the value you set.", MAX_CONNECTIONS, current)
    return env[MAX_CONNECTIONS]

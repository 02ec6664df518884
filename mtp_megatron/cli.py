"""The launcher's body: parse and validate, then plan (--dry-run) or train.

User mistakes (:class:`ConfigError`) end with one clear line on stderr and exit code 2,
never a traceback.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Optional, Sequence

from mtp_megatron.config import ConfigError, load_config

logger = logging.getLogger("mtp_megatron")


def _setup_logging() -> None:
    rank = os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))
    logging.basicConfig(
        level=logging.INFO, stream=sys.stdout,
        format=f"[%(asctime)s rank{rank}] %(message)s", datefmt="%H:%M:%S",
    )
    for noisy in ("megatron", "torch"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def main(argv: Optional[Sequence[str]] = None) -> int:
    _setup_logging()
    try:
        cfg, options = load_config(argv)
        if options.dry_run:
            from mtp_megatron.plan import print_plan

            print_plan(cfg, gpu_memory_gb=options.gpu_memory_gb, mfu=options.mfu)
            return 0
        from mtp_megatron.runtime.preflight import preflight

        launch, transformer_impl = preflight(cfg)
        from mtp_megatron.runtime.cuda_env import apply_cuda_env

        apply_cuda_env(cfg)  # before CUDA is initialised (the Trainer does it)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from mtp_megatron.checkpoint import CheckpointError
    from mtp_megatron.training.faults import NonFiniteStepError
    from mtp_megatron.training.trainer import Trainer

    trainer = None
    try:
        trainer = Trainer(cfg, launch, transformer_impl)
        trainer.train()
    except (ConfigError, CheckpointError, NonFiniteStepError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2 if isinstance(err, ConfigError) else 3
    finally:
        if trainer is not None:
            trainer.close()
        else:
            from mtp_megatron.runtime.distributed import shutdown

            shutdown()
    return 0

"""Checks that need the machine but no process group: run before anything starts.

Each failure is a :class:`ConfigError` naming the flag, so every rank exits with the
same clear message instead of one rank failing inside a collective.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Tuple

import torch

from mtp_megatron.config import ConfigError, RunConfig
from mtp_megatron.runtime.accel import check_fp8_runtime, resolve_transformer_impl
from mtp_megatron.runtime.launch_env import LaunchEnv, read_launch_env


def preflight(cfg: RunConfig, env=None) -> Tuple[LaunchEnv, str]:
    """Returns the launch environment and the layer implementation to build."""
    launch = read_launch_env(os.environ if env is None else env)
    world = cfg.parallel.world_size
    if world is not None and world != launch.world_size:
        raise ConfigError("--world-size", world, f"the launcher's world size {launch.world_size}")
    if launch.world_size % cfg.parallel.model_parallel_size:
        raise ConfigError(
            "--nproc-per-node/--nnodes", launch.world_size,
            f"a multiple of TP x PP x CP = {cfg.parallel.model_parallel_size}",
        )
    # FP8 first: without a GPU or TE its message names --fp8-format and the cause.
    check_fp8_runtime(cfg.training.fp8_format, cfg.training.fp8_recipe)
    transformer_impl = resolve_transformer_impl(cfg.model.transformer_impl)
    if cfg.training.fp8_format and transformer_impl != "transformer_engine":
        raise ConfigError(
            "--fp8-format", cfg.training.fp8_format,
            "only with --transformer-impl transformer_engine",
        )
    if cfg.logging.tensorboard_dir and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError(
            "--tensorboard-dir", cfg.logging.tensorboard_dir, "only with tensorboard installed",
            "pip install -e .[tensorboard]",
        )
    if cfg.checkpoint.async_save and not torch.cuda.is_available():
        raise ConfigError(
            "--async-save", True, "only on a GPU",
            "megatron-core's async checkpoint writer needs CUDA; drop --async-save on CPU "
            "(the synchronous save is used without it)",
        )
    _check_writable("--output-dir", cfg.logging.output_dir)
    if cfg.checkpoint.save:
        _check_writable("--save", cfg.checkpoint.save)
    if cfg.checkpoint.load and not os.path.isdir(cfg.checkpoint.load):
        raise ConfigError("--load", cfg.checkpoint.load, "an existing checkpoint directory",
                          "no such directory")
    return launch, transformer_impl


def _check_writable(flag: str, path: str) -> None:
    probe = path
    while probe and not os.path.exists(probe):
        probe = os.path.dirname(probe)
    probe = probe or "."
    if not os.path.isdir(probe) or not os.access(probe, os.W_OK):
        raise ConfigError(flag, path, "a directory this user can write", f"{probe} is not writable")

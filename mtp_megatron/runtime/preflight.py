"""Checks that need the machine but no process group: run before anything starts.

The pure rules (divisibility, flag combinations) belong to the config sections and
``RunConfig``; only what depends on this machine or launcher is checked here: the
launcher's world size, the GPU and libraries (FP8, TE, tensorboard, wandb), paths.
Each failure is a :class:`ConfigError` naming the flag, so every rank exits with the
same clear message instead of one rank failing inside a collective.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from typing import Tuple

import torch

from mtp_megatron.config import ConfigError, RunConfig
from mtp_megatron.config.moe import check_parallel_moe
from mtp_megatron.runtime.accel import check_fp8_runtime, resolve_transformer_impl
from mtp_megatron.runtime.launch_env import LaunchEnv, read_launch_env


def preflight(cfg: RunConfig, env=None) -> Tuple[LaunchEnv, str]:
    """Returns the launch environment and the layer implementation to build."""
    launch = read_launch_env(os.environ if env is None else env)
    _check_world_size(cfg, launch.world_size)
    if cfg.parallel.world_size is None:  # the expert grid against the ranks launched
        check_parallel_moe(cfg.model, dataclasses.replace(cfg.parallel,
                                                          world_size=launch.world_size))
    # FP8 first: without a GPU or TE its message names --fp8-format and the cause. That
    # FP8 needs --transformer-impl transformer_engine (not local) is a pure rule: RunConfig.
    check_fp8_runtime(cfg.training.fp8_format, cfg.training.fp8_recipe)
    transformer_impl = resolve_transformer_impl(cfg.model.transformer_impl)
    if cfg.logging.tensorboard_dir and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError(
            "--tensorboard-dir", cfg.logging.tensorboard_dir, "only with tensorboard installed",
            "pip install -e .[tensorboard]",
        )
    if cfg.logging.wandb_project and importlib.util.find_spec("wandb") is None:
        raise ConfigError(
            "--wandb-project", cfg.logging.wandb_project, "only with wandb installed",
            "pip install -e .[wandb]",
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
        what = ("is a file, expected a directory" if os.path.exists(cfg.checkpoint.load)
                else "no such directory")
        raise ConfigError("--load", cfg.checkpoint.load, "an existing checkpoint directory", what)
    return launch, transformer_impl


def _check_world_size(cfg: RunConfig, launched: int) -> None:
    """The launcher started as many ranks as the config expects (``ParallelConfig`` has
    already checked that --world-size is a multiple of TP x PP x CP; ``load_config``, that
    it is torchrun's or srun's world size: what is left is a plain ``python`` start)."""
    given = cfg.parallel.world_size
    if given is not None and given != launched:
        raise ConfigError("--world-size", given, f"the launcher's world size {launched}")
    expected = given or cfg.parallel.model_parallel_size
    if given is None and launched != expected:  # a plain `python` run with TP x PP x CP > 1
        raise ConfigError(
            "--nproc-per-node x --nnodes", launched,
            f"a multiple of TP x PP x CP = {expected}", "start it with torchrun or srun",
        )


def _check_writable(flag: str, path: str) -> None:
    """``path``, or its closest existing parent (created later), is a writable directory."""
    probe = path
    while probe and not os.path.exists(probe):
        probe = os.path.dirname(probe)
    probe = probe or "."
    if not os.path.isdir(probe):
        why = (f"{path} is a file, expected a directory" if probe == path
               else f"{probe} is a file, so no directory can be made under it")
        raise ConfigError(flag, path, "a directory this user can write", why)
    if not os.access(probe, os.W_OK):
        raise ConfigError(flag, path, "a directory this user can write", f"{probe} is not writable")

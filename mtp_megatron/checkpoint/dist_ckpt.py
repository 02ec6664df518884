"""Save and load the whole training state with megatron-core ``dist_checkpointing``.

What a checkpoint holds (``torch_dist`` format): the model (resharded on load: any
TP/PP/DP layout loads into any other), the optimizer, the LR scheduler, RNG states
(python, numpy, torch, the model-parallel tracker), the iteration, consumed samples
and the resolved config.

    save_checkpoint(state, cfg.checkpoint.save)
    iteration, consumed = load_checkpoint(state, cfg.checkpoint.load, checkpoint=cfg.checkpoint)
    load_model_weights("runs/x/checkpoints", model_chunks)   # inference: weights only
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist
import yaml
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.dist_checkpointing.serialization import StrictHandling
from torch.distributed.checkpoint.api import CheckpointException

from mtp_megatron.checkpoint.layout import (
    CONFIG_NAME,
    CheckpointError,
    iteration_dir,
    partial_dir,
    partial_saves,
    resolve_load_dir,
    write_tracker,
)
from mtp_megatron.config import CheckpointConfig, RunConfig, to_dict
from mtp_megatron.runtime import comm, cpu_bridge

logger = logging.getLogger("mtp_megatron")

CHECKPOINT_VERSION = 1
# Keys in the checkpoint that this load does not ask for (e.g. the optimizer when
# --no-load-optim) are fine; missing ones are errors.
LENIENT = StrictHandling.ASSUME_OK_UNEXPECTED
# torch.distributed.checkpoint reports a failed read as CheckpointException, which
# derives from BaseException, not Exception.
LOAD_ERRORS = (Exception, CheckpointException)
# Settings that must match between the checkpoint and the model it is loaded into.
SHAPE_KEYS = {
    "model": ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups",
              "ffn_hidden_size", "swiglu", "disable_bias_linear", "normalization",
              "untie_embeddings_and_output_weights", "position_embedding_type"),
    "mtp": ("mtp_num_layers",),
}


@dataclass
class TrainState:
    """Everything a checkpoint saves and restores, for one rank."""

    model: List[torch.nn.Module]
    optimizer: Any
    scheduler: Any
    cfg: RunConfig
    iteration: int = 0
    consumed_samples: int = 0


def _metadata(use_distributed_optimizer: bool) -> Dict[str, Any]:
    """``sharded_state_dict`` metadata as Megatron-LM passes it for megatron-core 0.16."""
    md = {
        "singleton_local_shards": False,
        "chained_optim_avoid_prefix": True,
        "dp_cp_group": parallel_state.get_data_parallel_group(with_context_parallel=True),
    }
    if use_distributed_optimizer:
        md["distrib_optim_sharding_type"] = "dp_reshardable"
    return md


def _model_key(index: int, chunks: int) -> str:
    return "model" if chunks == 1 else f"model{index}"


def _model_state(model: List[torch.nn.Module], metadata) -> Dict[str, Any]:
    return {
        _model_key(i, len(model)): _unwrap(chunk).sharded_state_dict(metadata=metadata)
        for i, chunk in enumerate(model)
    }


def _unwrap(chunk):
    return getattr(chunk, "module", chunk)


def _tracker_device() -> str:
    """Whose generator states the model-parallel RNG tracker holds: "cuda" (megatron-core's
    CUDA tracker) or "cpu" (the CPU bridge's); the two are not interchangeable."""
    tracker = tensor_parallel.get_cuda_rng_tracker()
    return "cpu" if isinstance(tracker, cpu_bridge.CpuRNGStatesTracker) else "cuda"


def _rng_state() -> ShardedObject:
    """This rank's RNG states, gathered over DP and stored per (PP, TP) rank (Megatron's way)."""
    state = {
        "random": random.getstate(),
        "np": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
        "tracker_device": _tracker_device(),
    }
    states = comm.all_gather_object(state, group=parallel_state.get_data_parallel_group())
    pp, tp = (parallel_state.get_pipeline_model_parallel_rank(),
              parallel_state.get_tensor_model_parallel_rank())
    pp_size, tp_size = (parallel_state.get_pipeline_model_parallel_world_size(),
                        parallel_state.get_tensor_model_parallel_world_size())
    return ShardedObject("rng_state", states, (pp_size, tp_size), (pp, tp),
                         replica_id=parallel_state.get_data_parallel_rank())


def _set_rng_state(states: List[Dict[str, Any]], directory: str = "") -> None:
    """Restore this rank's RNG states. The host generators (python, numpy, torch CPU)
    always load; the CUDA generator and the model-parallel tracker only on the device
    type that saved them (a CPU-saved checkpoint resumed on a GPU keeps this run's
    freshly seeded device streams, with a warning, like a layout change)."""
    state = states[parallel_state.get_data_parallel_rank()]
    random.setstate(state["random"])
    np.random.set_state(state["np"])
    torch.set_rng_state(state["torch"])
    saved = state.get("tracker_device", "cpu")  # checkpoints before this key: CPU only
    here = _tracker_device()
    if saved != here:
        if dist.get_rank() == 0:
            logger.warning("%s saved its device RNG states on %s, this run is on %s: CUDA and "
                           "model-parallel RNG states not loaded (host RNG states are)",
                           directory or "the checkpoint", saved, here)
        return
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _layout(cfg: RunConfig) -> Dict[str, int]:
    par = cfg.parallel
    return {"tp": par.tensor_model_parallel_size, "pp": par.pipeline_model_parallel_size,
            "dp": par.data_parallel_size, "vpp": cfg.virtual_pipeline_size or 1}


def save_checkpoint(state: TrainState, save_dir: str) -> str:
    """Save on every rank; commit (rename + tracker) on rank 0 once all have finished."""
    start = time.perf_counter()
    rank = dist.get_rank()
    final, work = iteration_dir(save_dir, state.iteration), partial_dir(save_dir, state.iteration)
    if rank == 0:
        os.makedirs(save_dir, exist_ok=True)
        shutil.rmtree(work, ignore_errors=True)  # a leftover of an interrupted save
        os.makedirs(work)
    comm.barrier()
    md = _metadata(state.cfg.parallel.use_distributed_optimizer)
    model_sd = _model_state(state.model, md)
    sharded = dict(model_sd)
    sharded["optimizer"] = state.optimizer.sharded_state_dict(model_sd, is_loading=False,
                                                              metadata=md)
    sharded["rng_state"] = _rng_state()
    sharded["common"] = {
        "iteration": state.iteration,
        "consumed_samples": state.consumed_samples,
        "opt_param_scheduler": state.scheduler.state_dict(),
        "checkpoint_version": CHECKPOINT_VERSION,
        "layout": _layout(state.cfg),
    }
    dist_checkpointing.save(sharded, work, async_sharded_save=False)
    comm.barrier()
    if rank == 0:
        with open(os.path.join(work, CONFIG_NAME), "w") as fh:
            yaml.safe_dump(to_dict(state.cfg), fh, sort_keys=False)
        shutil.rmtree(final, ignore_errors=True)  # re-saving the same iteration
        os.replace(work, final)
        write_tracker(save_dir, state.iteration)
    comm.barrier()
    logger.info("saved checkpoint %s in %.2f s", final, time.perf_counter() - start) \
        if rank == dist.get_world_size() - 1 else None
    return final


def check_compatible(directory: str, cfg: RunConfig) -> Dict[str, Any]:
    """Compare the checkpoint's model shape with ``cfg``; raise naming the path and field."""
    path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isfile(path):
        raise CheckpointError(f"{directory}: missing {CONFIG_NAME}; not saved by mtp_megatron?")
    saved = yaml.safe_load(open(path))
    ours = to_dict(cfg)
    for section, keys in SHAPE_KEYS.items():
        for key in keys:
            if saved.get(section, {}).get(key) != ours[section][key]:
                raise CheckpointError(
                    f"{directory} was saved with {section}.{key}="
                    f"{saved.get(section, {}).get(key)!r} but this run has "
                    f"--{key.replace('_', '-')}={ours[section][key]!r}; use the same value "
                    "(the weights have other shapes)"
                )
    return saved


def _describe(error: Optional[BaseException]) -> str:
    if error is None:
        return "failed on another rank"
    return f"{type(error).__name__}: {str(error).splitlines()[0][:300] if str(error) else ''}"


def _agree(ok: bool) -> bool:
    """True on every rank only if ``ok`` on every rank (so no rank hangs alone)."""
    return comm.all_ranks(ok)


def load_checkpoint(state: TrainState, load_dir: str, *, checkpoint: CheckpointConfig) -> None:
    """Restore ``state`` in place from the latest complete checkpoint under ``load_dir``."""
    for leftover in partial_saves(load_dir):
        logger.warning("ignoring interrupted save %s (never loaded)", leftover)
    directory, iteration = resolve_load_dir(load_dir)
    check_compatible(directory, state.cfg)
    start = time.perf_counter()
    md = _metadata(state.cfg.parallel.use_distributed_optimizer)
    model_sd = _model_state(state.model, md)
    load_optim = not (checkpoint.no_load_optim or checkpoint.finetune)
    sharded = dict(model_sd)
    if load_optim:
        sharded["optimizer"] = state.optimizer.sharded_state_dict(model_sd, is_loading=True,
                                                                  metadata=md)
    error, rng = None, None
    try:
        loaded = dist_checkpointing.load(sharded, directory, strict=LENIENT)
        common = dist_checkpointing.load_common_state_dict(directory)["common"]
        if common.get("layout") == _layout(state.cfg) and not (
                checkpoint.no_load_rng or checkpoint.finetune):
            rng = dist_checkpointing.load(
                {"rng_state": _rng_state()}, directory, strict=LENIENT
            )["rng_state"]
    except LOAD_ERRORS as exc:  # a missing shard, a truncated file: name the path
        error = exc
    if not _agree(error is None):
        raise CheckpointError(
            f"{directory}: cannot be loaded, it is incomplete or corrupt "
            f"({_describe(error)})"
        )
    for i, chunk in enumerate(state.model):
        _unwrap(chunk).load_state_dict(loaded[_model_key(i, len(state.model))], strict=True)
    if load_optim:
        state.optimizer.load_state_dict(loaded["optimizer"])
        state.scheduler.load_state_dict(common["opt_param_scheduler"])
    else:  # bf16/fp16: the fp32 main copies still hold the initial weights (Megatron-LM's fix)
        state.optimizer.reload_model_params()
    same_layout = common.get("layout") == _layout(state.cfg)
    if not (checkpoint.no_load_rng or checkpoint.finetune):
        if same_layout:
            _set_rng_state(rng, directory)
        else:
            logger.warning("%s was saved with layout %s, this run is %s: RNG states not loaded",
                           directory, common.get("layout"), _layout(state.cfg))
    if checkpoint.finetune:
        state.iteration, state.consumed_samples = 0, 0
    else:
        state.iteration, state.consumed_samples = iteration, common["consumed_samples"]
    if dist.get_rank() == dist.get_world_size() - 1:
        logger.info("loaded checkpoint %s (iteration %d) in %.2f s", directory, iteration,
                    time.perf_counter() - start)


def load_model_weights(path: str, model_chunks: List[torch.nn.Module]) -> Dict[str, Any]:
    """Load only the model weights (any saved layout) into freshly built chunks.

    ``path`` is a save root or an ``iter_N`` directory. Returns the saved config dict.
    """
    directory, _ = resolve_load_dir(path)
    saved = yaml.safe_load(open(os.path.join(directory, CONFIG_NAME)))
    md = _metadata(False)
    sharded = _model_state(model_chunks, md)
    try:
        loaded = dist_checkpointing.load(sharded, directory, strict=LENIENT)
    except LOAD_ERRORS as exc:
        raise CheckpointError(f"{directory}: cannot load the model weights ({exc})") from None
    for i, chunk in enumerate(model_chunks):
        _unwrap(chunk).load_state_dict(loaded[_model_key(i, len(model_chunks))], strict=True)
    return saved

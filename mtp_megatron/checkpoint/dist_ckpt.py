"""Save and load the whole training state with megatron-core ``dist_checkpointing``.

What a checkpoint holds (``torch_dist`` format): the model (resharded on load: any
TP/PP/DP layout loads into any other), the optimizer, the LR scheduler, RNG states
(python, numpy, torch, the model-parallel tracker), the iteration, consumed samples
and the resolved config.

    save_checkpoint(state, cfg.checkpoint.save)
    save_model_weights([model], cfg, "ckpt")   # weights only: load it with --finetune
    load_checkpoint(state, cfg.checkpoint.load, checkpoint=cfg.checkpoint)  # fills state
    state.iteration, state.consumed_samples                  # where training resumes
    load_model_weights("runs/x/checkpoints", model_chunks)   # inference: weights only
"""

from __future__ import annotations

import logging
import os
import random
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

from mtp_megatron.checkpoint.commit import SaveGuard
from mtp_megatron.checkpoint.layout import (
    CONFIG_NAME,
    CheckpointError,
    partial_saves,
    resolve_load_dir,
)
from mtp_megatron.config import CheckpointConfig, RunConfig, to_dict

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


def _rng_state() -> ShardedObject:
    """This rank's RNG states, gathered over DP and stored per (PP, TP) rank (Megatron's way)."""
    state = {
        "random": random.getstate(),
        "np": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    dp_size = parallel_state.get_data_parallel_world_size()
    states = [None] * dp_size
    dist.all_gather_object(states, state, group=parallel_state.get_data_parallel_group())
    pp, tp = (parallel_state.get_pipeline_model_parallel_rank(),
              parallel_state.get_tensor_model_parallel_rank())
    pp_size, tp_size = (parallel_state.get_pipeline_model_parallel_world_size(),
                        parallel_state.get_tensor_model_parallel_world_size())
    return ShardedObject("rng_state", states, (pp_size, tp_size), (pp, tp),
                         replica_id=parallel_state.get_data_parallel_rank())


def _set_rng_state(states: List[Dict[str, Any]]) -> None:
    state = states[parallel_state.get_data_parallel_rank()]
    random.setstate(state["random"])
    np.random.set_state(state["np"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _layout(cfg: RunConfig) -> Dict[str, int]:
    par = cfg.parallel
    return {"tp": par.tensor_model_parallel_size, "pp": par.pipeline_model_parallel_size,
            "dp": par.data_parallel_size, "vpp": cfg.virtual_pipeline_size or 1}


def sharded_state(state: TrainState) -> Dict[str, Any]:
    """What a checkpoint holds (shared by the synchronous and the --async-save path)."""
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
    return sharded


def save_checkpoint(state: TrainState, save_dir: str) -> str:
    """Save on every rank; commit (rename + tracker) on rank 0 once all have finished.

    Any failure (disk full, read-only, ...) is the same CheckpointError on every rank;
    the previous checkpoint stays intact (see checkpoint/commit.py).
    """
    guard = SaveGuard(save_dir, state.iteration, keep_last=state.cfg.checkpoint.ckpt_keep_last)
    guard.prepare()
    return _write(guard, sharded_state(state), state.cfg)


def save_model_weights(model: List[torch.nn.Module], cfg: RunConfig, save_dir: str,
                       iteration: int = 0) -> str:
    """A weights-only checkpoint (no optimizer, scheduler or RNG), e.g. an imported model.

    Training starts from it with ``--load DIR --finetune`` in any layout.
    """
    guard = SaveGuard(save_dir, iteration)
    guard.prepare()
    sharded = dict(_model_state(model, _metadata(False)))
    sharded["common"] = {"iteration": iteration, "consumed_samples": 0,
                         "checkpoint_version": CHECKPOINT_VERSION, "layout": _layout(cfg),
                         "weights_only": True}
    return _write(guard, sharded, cfg)


def _write(guard: SaveGuard, sharded: Dict[str, Any], cfg: RunConfig) -> str:
    """Write ``sharded`` into the guard's partial directory and commit it."""
    start = time.perf_counter()
    with guard.writing():
        dist_checkpointing.save(sharded, guard.work, async_sharded_save=False)
    final = guard.commit({CONFIG_NAME: yaml.safe_dump(to_dict(cfg), sort_keys=False)})
    if dist.get_rank() == dist.get_world_size() - 1:
        logger.info("saved checkpoint %s in %.2f s", final, time.perf_counter() - start)
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
    """One line for an error: torch's CheckpointException (whose text is a traceback per
    rank) is described by the first rank's underlying error."""
    if error is None:
        return "failed on another rank"
    if isinstance(error, CheckpointException) and error.failures:
        rank, (inner, _) = next(iter(error.failures.items()))
        return f"{_describe(inner)}, reading on rank {rank}"
    text = str(error).strip().splitlines()[0][:300] if str(error).strip() else ""
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _agree(ok: bool) -> bool:
    """True on every rank only if ``ok`` on every rank (so no rank hangs alone)."""
    flag = torch.tensor([0 if ok else 1], dtype=torch.int32)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return flag.item() == 0


def _weights_only(directory: str) -> bool:
    try:
        common = dist_checkpointing.load_common_state_dict(directory)["common"]
    except LOAD_ERRORS:
        return False  # unreadable: the load below names the path
    return bool(common.get("weights_only"))


def load_checkpoint(state: TrainState, load_dir: str, *, checkpoint: CheckpointConfig) -> None:
    """Restore ``state`` in place from the latest complete checkpoint under ``load_dir``."""
    for leftover in partial_saves(load_dir):
        logger.warning("ignoring interrupted save %s (never loaded)", leftover)
    directory, iteration = resolve_load_dir(load_dir)
    check_compatible(directory, state.cfg)
    if not checkpoint.finetune and _weights_only(directory):
        raise CheckpointError(
            f"{directory} holds model weights only (no optimizer, iteration or RNG state; "
            "e.g. imported from Hugging Face): start from it with --finetune"
        )
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
    same_layout = common.get("layout") == _layout(state.cfg)
    if not (checkpoint.no_load_rng or checkpoint.finetune):
        if same_layout:
            _set_rng_state(rng)
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
        raise CheckpointError(f"{directory}: cannot load the model weights, it is incomplete or "
                              f"corrupt ({_describe(exc)})") from None
    for i, chunk in enumerate(model_chunks):
        _unwrap(chunk).load_state_dict(loaded[_model_key(i, len(model_chunks))], strict=True)
    return saved

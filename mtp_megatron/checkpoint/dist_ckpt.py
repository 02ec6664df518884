"""Save and load the whole training state with megatron-core ``dist_checkpointing``.

What a checkpoint holds (``torch_dist`` format): the model (resharded on load: any
TP/PP/DP layout loads into any other), the optimizer, the LR scheduler, RNG states
(python, numpy, torch, the model-parallel tracker), the iteration, consumed samples,
the model's vocabulary sizes and the resolved config.

    save_checkpoint(state, cfg.checkpoint.save)
    save_model_weights([model], cfg, "ckpt")   # weights only: load it with --finetune
    load_checkpoint(state, cfg.checkpoint.load, checkpoint=cfg.checkpoint)  # fills state
    state.iteration, state.consumed_samples                  # where training resumes
    load_model_weights("runs/x/checkpoints", model_chunks)   # inference: weights only

Optimizer state formats. The plain (and --bf16/--fp16) optimizer stores one tensor per
parameter state under the parameter's own key, so it reshards like the model. The
distributed optimizer (--use-distributed-optimizer) has several formats in megatron-core
0.16 (``DistributedOptimizer.sharded_state_dict``); we save ``fully_reshardable`` with
``distrib_optim_fully_reshardable_mem_efficient`` (Megatron-LM's
``--dist-ckpt-optim-fully-reshardable``):

* ``fully_reshardable``: at save, each DP group gathers its optimizer shards (over gloo,
  on CPU) to DP rank 0, which writes them per *model parameter* like the plain optimizer.
  A checkpoint therefore loads into any TP/PP/DP layout, which is what this package
  promises for the model. Its cost is one gather per save and, on DP rank 0, host memory
  for the fp32 optimizer state of one model-parallel shard (12 bytes per parameter: about
  4 GB for a 350M model), which is fine at the sizes this package targets.
* ``dp_reshardable`` (Megatron-LM's default) writes every rank's flat buffer shard with no
  communication, but the layout is that of the DDP buckets: it reshards over DP only,
  not TP/PP. Checkpoints in that format (e.g. from Megatron-LM) still load when TP and PP
  are unchanged; otherwise the load stops and says to use --no-load-optim.
* ``fully_sharded_model_space`` is deprecated in megatron-core 0.16.

megatron-core (0.16.1 and 0.19.2) builds the ``fully_reshardable`` tensors from the wrong
offsets when a DDP buffer has padding between buckets (its "param range exceeds unpadded buffer"
warning): the save and the load wrap its call in
:func:`~mtp_megatron.checkpoint.distopt_ranges.padded_world_tensors`, whose docstring has
the cause and which runs lost state before the fix.

The format a checkpoint was written in is stored in its content metadata
(``dist_checkpointing.save(..., content_metadata=...)``) and read back on load, as
Megatron-LM does, so loading never guesses.

Resuming with changed settings: :func:`check_compatible` compares the checkpoint's
run_config.yaml (and the vocabulary sizes in its common state) with this run, and names
the field. Shapes must match. The optimizer's state format (precision, distributed
optimizer) may change only when the optimizer is not loaded: ``--no-load-optim`` keeps the
iteration and LR schedule, ``--finetune`` restarts at iteration 0; in both cases the
weights are loaded (cast to this run's precision) and the fp32 main weights of a
--bf16/--fp16 optimizer are rebuilt from them.
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
from megatron.core.optimizer.distrib_optimizer import HAVE_APEX_OR_TE, DistributedOptimizer
from torch.distributed.checkpoint.api import CheckpointException

from mtp_megatron.checkpoint.commit import SaveGuard
from mtp_megatron.checkpoint.compat import check_compatible, check_schedule
from mtp_megatron.checkpoint.distopt_ranges import distributed_optimizers, padded_world_tensors
from mtp_megatron.checkpoint.layout import (
    CONFIG_NAME,
    CheckpointError,
    partial_saves,
    resolve_load_dir,
)
from mtp_megatron.checkpoint.optimizer_state import align_saved_groups, restore_schedule
from mtp_megatron.config import CheckpointConfig, RunConfig, to_dict
from mtp_megatron.runtime import comm, cpu_bridge, mcore_compat
from mtp_megatron.runtime.optimizer_parts import sub_optimizers
from mtp_megatron.runtime.wrapped import innermost

logger = logging.getLogger("mtp_megatron")

CHECKPOINT_VERSION = 1
# Keys in the checkpoint that this load does not ask for (e.g. the optimizer when
# --no-load-optim) are fine; missing ones are errors.
LENIENT = StrictHandling.ASSUME_OK_UNEXPECTED
# torch.distributed.checkpoint reports a failed read as CheckpointException, which
# derives from BaseException, not Exception.
LOAD_ERRORS = (Exception, CheckpointException)
# The distributed optimizer's checkpoint format (see the module docstring).
DISTRIB_OPTIM_FORMAT = "fully_reshardable"
# Content metadata keys that describe how the sharded state dicts were built.
CONTENT_KEYS = ("singleton_local_shards", "chained_optim_avoid_prefix",
                "distrib_optim_sharding_type", "distrib_optim_fully_reshardable_mem_efficient")


@dataclass
class TrainState:
    """Everything a checkpoint saves and restores, for one rank."""

    model: List[torch.nn.Module]
    optimizer: Any
    scheduler: Any
    cfg: RunConfig
    iteration: int = 0
    consumed_samples: int = 0
    # The vocabulary before padding (--vocab-size or the tokenizer's); saved so a resume
    # with another vocabulary is refused instead of loading silently.
    vocab_size: Optional[int] = None
    # Rows from here on have masked logits (checkpoint/vocab.py); None: every row scores.
    live_rows: Optional[int] = None


def _content_metadata(use_distributed_optimizer: bool) -> Dict[str, Any]:
    """How this run builds its sharded state dicts (saved in the checkpoint)."""
    content = {"singleton_local_shards": False, "chained_optim_avoid_prefix": True}
    if use_distributed_optimizer:
        content["distrib_optim_sharding_type"] = DISTRIB_OPTIM_FORMAT
        content["distrib_optim_fully_reshardable_mem_efficient"] = True
    return content


def _metadata(content: Dict[str, Any]) -> Dict[str, Any]:
    """``sharded_state_dict`` metadata as Megatron-LM passes it for megatron-core 0.16."""
    md = {key: content[key] for key in CONTENT_KEYS if key in content}
    md["dp_cp_group"] = parallel_state.get_data_parallel_group(with_context_parallel=True)
    return md


def _model_key(index: int, chunks: int) -> str:
    return "model" if chunks == 1 else f"model{index}"


def _model_state(model: List[torch.nn.Module], metadata) -> Dict[str, Any]:
    return {
        _model_key(i, len(model)): _unwrap(chunk).sharded_state_dict(metadata=metadata)
        for i, chunk in enumerate(model)
    }


def _unwrap(chunk):
    """The module whose state dict is the model's: inside DDP (Float16Module passes through)."""
    return getattr(chunk, "module", chunk)




def _prepare_distributed_optimizer_for_load(optimizer) -> None:
    """Give a fresh distributed optimizer the state megatron-core expects before a load.

    megatron-core (0.16.1 and 0.19.2) without Apex or Transformer Engine (CPU, or a GPU
    without them) runs torch's Adam, and
    ``DistributedOptimizer.sharded_state_dict(is_loading=True)`` first calls
    ``state_dict()``, which reads each parameter's Adam ``step`` and asserts there is
    exactly one value (``assert len(steps) == 1``): on an optimizer that has not
    stepped yet there are none. Allocate the state (zeros; the load overwrites it).
    """
    if HAVE_APEX_OR_TE or not mcore_compat.needs("torch_adam_step"):
        return
    for sub in distributed_optimizers(optimizer):
        inner = sub.optimizer
        if len(inner.state) == 0:
            sub.init_state_fn(inner, sub.config)
            for group in inner.param_groups:
                for param in group["params"]:
                    inner.state[param]["step"] = torch.tensor(0.0, device="cpu")


def _load_optimizer(optimizer, state_dict) -> None:
    """``optimizer.load_state_dict``, with megatron-core's torch-Adam path fixed (0.16.1
    and 0.19.2; ``mcore_compat.WORKAROUNDS["torch_adam_step"]``).

    Without Apex or Transformer Engine (CPU, or a GPU without them) the distributed
    optimizer wraps torch's Adam, which keeps a ``step`` tensor per parameter, and
    megatron-core's ``DistributedOptimizer.load_state_dict`` then (1) fails loading a
    ``fully_reshardable`` state (``KeyError: 'step'``: it copies every state key but the
    format does not store ``step``) and (2) gives every parameter one shared ``step``
    tensor, which torch's Adam increments in place once per parameter per step, so a
    resumed run's bias correction would drift. Here: load the non-tensor state (this sets
    ``step``), set the step tensors aside while the parameter state is copied in with
    megatron-core's own loader for the format, then give each parameter its own copy.
    """
    align_saved_groups(optimizer, state_dict)  # this run's --lr/--min-lr, see optimizer_state.py
    if HAVE_APEX_OR_TE or not distributed_optimizers(optimizer) \
            or not mcore_compat.needs("torch_adam_step"):
        optimizer.load_state_dict(state_dict)
        return
    subs = sub_optimizers(optimizer)
    parts = [state_dict] if len(subs) == 1 else list(state_dict)
    if len(subs) > 1 and isinstance(state_dict, dict):  # {0: dense, 1: experts} (MoE)
        parts = [part for _, part in sorted(state_dict.items())]
    for sub, part in zip(subs, parts):
        if not isinstance(sub, DistributedOptimizer):
            sub.load_state_dict(part)
            continue
        part = dict(part)
        param_state = part.pop("param_state", None)
        fmt = part.pop("param_state_sharding_type", None)
        sub.load_state_dict(part)
        states = sub.optimizer.state
        steps = {p: st.pop("step") for p, st in states.items() if "step" in st}
        try:
            if param_state is not None:
                _PARAM_STATE_LOADERS[fmt](sub, param_state)
        finally:
            for param, step in steps.items():
                states[param]["step"] = step.clone()
    if len(subs) > 1:
        optimizer._synchronize_steps()


_PARAM_STATE_LOADERS = {
    "fully_reshardable": DistributedOptimizer.load_parameter_state_from_fully_reshardable,
    "dp_reshardable": DistributedOptimizer.load_parameter_state_from_dp_reshardable,
    "fully_sharded_model_space": DistributedOptimizer.load_parameter_state_from_fs_model_space,
    "dp_zero_gather_scatter": DistributedOptimizer.load_parameter_state_from_dp_zero,
}


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


def _rank_independent(common: Dict[str, Any]) -> Dict[str, Any]:
    """The common state without what legitimately differs per rank, for megatron-core's
    cross-rank consistency check at save: the memory-efficient ``fully_reshardable``
    format gathers the optimizer state on DP rank 0 only (``param_state`` is None
    elsewhere)."""
    optimizer = common.get("optimizer")
    if not isinstance(optimizer, dict) or "param_state" not in optimizer:
        return common
    return dict(common, optimizer={k: v for k, v in optimizer.items() if k != "param_state"})


def _layout(cfg: RunConfig) -> Dict[str, int]:
    par = cfg.parallel
    return {"tp": par.tensor_model_parallel_size, "pp": par.pipeline_model_parallel_size,
            "dp": par.data_parallel_size, "vpp": cfg.virtual_pipeline_size or 1}


def save_kwargs(cfg: RunConfig) -> Dict[str, Any]:
    """``dist_checkpointing.save`` arguments shared by the synchronous and async saves."""
    return {"content_metadata": _content_metadata(cfg.parallel.use_distributed_optimizer),
            "preprocess_common_before_consistancy_check": _rank_independent}


def sharded_state(state: TrainState) -> Dict[str, Any]:
    """What a checkpoint holds (shared by the synchronous and the --async-save path)."""
    md = _metadata(_content_metadata(state.cfg.parallel.use_distributed_optimizer))
    model_sd = _model_state(state.model, md)
    sharded = dict(model_sd)
    with padded_world_tensors(state.optimizer):  # megatron-core's range bug
        sharded["optimizer"] = state.optimizer.sharded_state_dict(model_sd, is_loading=False,
                                                                  metadata=md)
    _share_common_step(sharded["optimizer"])
    sharded["rng_state"] = _rng_state()
    sharded["common"] = {
        "iteration": state.iteration,
        "consumed_samples": state.consumed_samples,
        "opt_param_scheduler": state.scheduler.state_dict(),
        "checkpoint_version": CHECKPOINT_VERSION,
        "layout": _layout(state.cfg),
        "vocab": _vocab_record(state.model, state.vocab_size, state.live_rows),
    }
    return sharded


def _vocab_record(model: List[torch.nn.Module], vocab_size: Optional[int],
                  live_rows: Optional[int]) -> Dict[str, Any]:
    """The vocabulary sizes a resume keeps (``checkpoint/vocab.py``)."""
    padded = innermost(model[0]).vocab_size
    return {"vocab_size": vocab_size, "padded_vocab_size": padded,
            "live_rows": live_rows or padded}


def _share_common_step(optimizer_sd: Dict[str, Any]) -> None:
    """Every rank's optimizer state gets the Adam ``common_step`` the others have.

    megatron-core (0.16 and 0.19) saves the step shared by all parameters as common
    state, which ``dist_checkpointing`` takes from rank 0 only. With
    ``--freeze-main-model`` and PP > 1 the first stages hold no trainable parameter,
    hence no step: the stages that train would lose theirs and a resume would fail in
    torch's Adam (``KeyError: 'step'``). Every rank steps together, so the step is one
    number: the largest over ranks (-1: none anywhere).
    """
    parts = [optimizer_sd] if "state" in optimizer_sd else \
        [v for v in optimizer_sd.values() if isinstance(v, dict) and "state" in v]
    parts = [p for p in parts if isinstance(p["state"], dict)]
    steps = [p["state"].get("common_step") for p in parts]
    local = max((float(s) for s in steps if s is not None), default=-1.0)
    shared = comm.reduce_values([local], op="max")[0]
    if shared < 0:
        return
    for part, step in zip(parts, steps):
        if step is None:
            part["state"]["common_step"] = torch.tensor(shared, device="cpu")


def save_checkpoint(state: TrainState, save_dir: str) -> str:
    """Save on every rank; commit (rename + tracker) on rank 0 once all have finished.

    Any failure (disk full, read-only, ...) is the same CheckpointError on every rank;
    the previous checkpoint stays intact (see checkpoint/commit.py).
    """
    guard = SaveGuard(save_dir, state.iteration, keep_last=state.cfg.checkpoint.ckpt_keep_last)
    guard.prepare()
    return _write(guard, sharded_state(state), state.cfg, save_kwargs(state.cfg))


def save_model_weights(model: List[torch.nn.Module], cfg: RunConfig, save_dir: str,
                       iteration: int = 0, extra: Optional[Dict[str, Any]] = None) -> str:
    """A weights-only checkpoint (no optimizer, scheduler or RNG), e.g. an imported model;
    ``extra`` goes into its common state (the importer's Hugging Face token ids).

    Training starts from it with ``--load DIR --finetune`` in any layout.
    """
    guard = SaveGuard(save_dir, iteration)
    guard.prepare()
    content = _content_metadata(False)
    sharded = dict(_model_state(model, _metadata(content)))
    sharded["common"] = {"iteration": iteration, "consumed_samples": 0,
                         "checkpoint_version": CHECKPOINT_VERSION, "layout": _layout(cfg),
                         "weights_only": True, "vocab": _vocab_record(model, None, None),
                         **(extra or {})}
    return _write(guard, sharded, cfg, {"content_metadata": content,
                                        "preprocess_common_before_consistancy_check":
                                            _rank_independent})


def _write(guard: SaveGuard, sharded: Dict[str, Any], cfg: RunConfig,
           kwargs: Dict[str, Any]) -> str:
    """Write ``sharded`` into the guard's partial directory and commit it."""
    start = time.perf_counter()
    with guard.writing(), mcore_compat.checkpoint_notices_silenced():
        dist_checkpointing.save(sharded, guard.work, async_sharded_save=False, **kwargs)
    final = guard.commit({CONFIG_NAME: yaml.safe_dump(to_dict(cfg), sort_keys=False)})
    if dist.get_rank() == dist.get_world_size() - 1:
        logger.info("saved checkpoint %s in %.2f s", final, time.perf_counter() - start)
    return final


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
    return comm.all_ranks(ok)


def common_state(directory: str) -> Dict[str, Any]:
    """A checkpoint's ``common`` record (iteration, vocabulary, layout, ...); {} when it
    cannot be read (a load reports that, naming the cause)."""
    try:
        common = dist_checkpointing.load_common_state_dict(directory).get("common")
    except LOAD_ERRORS:
        return {}
    return common if isinstance(common, dict) else {}


def _read_common(directory: str) -> Dict[str, Any]:
    try:
        return dist_checkpointing.load_common_state_dict(directory)
    except LOAD_ERRORS as exc:
        raise CheckpointError(
            f"{directory}: cannot be loaded, it is incomplete or corrupt ({_describe(exc)})"
        ) from None


def _load_content(directory: str, common_all: Dict[str, Any], state: TrainState,
                  load_optim: bool) -> Dict[str, Any]:
    """The sharded-state-dict settings to load with: the checkpoint's own, checked."""
    content = dist_checkpointing.load_content_metadata(preloaded_state_dict=common_all)
    if content is None:  # saved before content metadata: our old dp_reshardable default
        content = _content_metadata(False)
        if state.cfg.parallel.use_distributed_optimizer:
            content["distrib_optim_sharding_type"] = "dp_reshardable"
    if not (load_optim and state.cfg.parallel.use_distributed_optimizer):
        return {k: v for k, v in content.items() if not k.startswith("distrib_optim")}
    fmt = content.get("distrib_optim_sharding_type")
    saved_layout = common_all["common"].get("layout") or {}
    ours = _layout(state.cfg)
    same_mp = (saved_layout.get("tp"), saved_layout.get("pp")) == (ours["tp"], ours["pp"])
    if fmt not in DistributedOptimizer.checkpoint_fully_reshardable_formats and not same_mp:
        raise CheckpointError(
            f"{directory}: its distributed-optimizer state is in megatron-core's {fmt!r} "
            f"format, which reshards over data parallel ranks only, and it was saved with "
            f"TP={saved_layout.get('tp')} PP={saved_layout.get('pp')} (this run: "
            f"TP={ours['tp']} PP={ours['pp']}); resume with the saved TP/PP, or load the "
            "weights only with --no-load-optim (or --finetune)"
        )
    return content


def load_checkpoint(state: TrainState, load_dir: str, *, checkpoint: CheckpointConfig) -> None:
    """Restore ``state`` in place from the latest complete checkpoint under ``load_dir``."""
    for leftover in partial_saves(load_dir):
        logger.warning("ignoring interrupted save %s (never loaded)", leftover)
    directory, iteration = resolve_load_dir(load_dir)
    common_all = _read_common(directory)
    check_compatible(directory, state.cfg, checkpoint=checkpoint, vocab_size=state.vocab_size,
                     padded_vocab_size=innermost(state.model[0]).vocab_size,
                     live_rows=state.live_rows, common=common_all.get("common", {}))
    if not checkpoint.finetune and common_all.get("common", {}).get("weights_only"):
        raise CheckpointError(
            f"{directory} holds model weights only (no optimizer, iteration or RNG state; "
            "e.g. imported from Hugging Face): start from it with --finetune"
        )
    saved_schedule = common_all.get("common", {}).get("opt_param_scheduler")
    schedule_changes = []
    if saved_schedule and not checkpoint.finetune:  # refused before any weight is read
        schedule_changes = check_schedule(directory, state.scheduler, saved_schedule,
                                          checkpoint)
    start = time.perf_counter()
    load_optim = not (checkpoint.no_load_optim or checkpoint.finetune)
    md = _metadata(_load_content(directory, common_all, state, load_optim))
    model_sd = _model_state(state.model, md)
    sharded = dict(model_sd)
    if load_optim:
        _prepare_distributed_optimizer_for_load(state.optimizer)
        with padded_world_tensors(state.optimizer):
            sharded["optimizer"] = state.optimizer.sharded_state_dict(
                model_sd, is_loading=True, metadata=md)
    error, rng = None, None
    try:
        loaded = dist_checkpointing.load(sharded, directory, strict=LENIENT)
        common = common_all["common"]
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
        _load_optimizer(state.optimizer, loaded["optimizer"])
    elif state.cfg.training.bf16 or state.cfg.training.fp16:
        # The fp32 main weights were initialised from the model before the load; rebuild
        # them from the loaded weights, or the first step would write the old ones back.
        state.optimizer.reload_model_params()
    if saved_schedule and not checkpoint.finetune:  # --no-load-optim too: the step goes on
        restore_schedule(state.scheduler, state.optimizer, saved_schedule,
                         override=checkpoint.override_opt_param_scheduler)
        if schedule_changes and dist.get_rank() == dist.get_world_size() - 1:
            logger.warning("LR schedule on resume from %s: %s (%s)", directory,
                           "this run's flags" if checkpoint.override_opt_param_scheduler
                           else "the checkpoint's; this run's flags have no effect",
                           "; ".join(schedule_changes))
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
    with open(os.path.join(directory, CONFIG_NAME)) as fh:
        saved = yaml.safe_load(fh)
    md = _metadata(_content_metadata(False))
    sharded = _model_state(model_chunks, md)
    try:
        loaded = dist_checkpointing.load(sharded, directory, strict=LENIENT)
    except LOAD_ERRORS as exc:
        raise CheckpointError(f"{directory}: cannot load the model weights, it is incomplete or "
                              f"corrupt ({_describe(exc)})") from None
    for i, chunk in enumerate(model_chunks):
        _unwrap(chunk).load_state_dict(loaded[_model_key(i, len(model_chunks))], strict=True)
    return saved

"""Full (unsharded) weights in and out of a sharded model, in memory.

megatron-core describes every local parameter as a ``ShardedTensor``: a global key,
the global shape, and where this rank's piece sits in it (TP splits, the layer axis
added for pipeline stages, the two halves of a SwiGLU ``linear_fc1``, the MTP stage's
copy of the word embedding). :func:`full_weights` assembles those pieces into global
tensors on a rank that holds the whole model; :func:`load_full_weights` copies the
matching slices of global tensors into any layout (TP, PP, VPP, DP); the same slices
let :func:`compare_to_full` check a layout against a single-rank model.

    full = full_weights(single_rank_chunks)          # {key: global tensor}
    load_full_weights(tp2_pp2_chunks, full)          # same initial weights, any layout

This is ``dist_checkpointing``'s resharding without the files: the keys and offsets are
megatron-core's own (``model.sharded_state_dict()``).
"""

from __future__ import annotations

import contextlib
from typing import Dict, Iterator, List, Optional, Tuple

import torch
from megatron.core import parallel_state
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories


def _unwrap(chunk):
    return chunk.module if hasattr(chunk, "module") else chunk


@contextlib.contextmanager
def _unused_output_weight_hidden(model):
    """Hide the output weight megatron-core allocates but never uses (a model built
    without ``builder._drop_unused_output_weight``).

    With MTP and tied embeddings on a pipeline stage other than the first, the MTP
    stage's copy of the word embedding is the output head, yet ``GPTModel`` still
    allocates ``output_layer.weight``; ``sharded_state_dict()`` then fails its own
    assertion that this weight is absent. It is left out while the dict is built.
    """
    layer = getattr(model, "output_layer", None)
    hide = (getattr(model, "mtp_process", False) and model.share_embeddings_and_output_weights
            and not model.pre_process and layer is not None and layer.weight is not None)
    if not hide:
        yield
        return
    weight = layer._parameters["weight"]
    layer._parameters["weight"] = None
    try:
        yield
    finally:
        layer._parameters["weight"] = weight


def sharded_tensors(chunks) -> Iterator[ShardedTensor]:
    """Every ``ShardedTensor`` of this rank's chunks (SwiGLU factories expanded).

    Their ``data`` are the parameters themselves (or views of them), so writing into
    ``data`` writes the model.
    """
    metadata = {"dp_cp_group": parallel_state.get_data_parallel_group(with_context_parallel=True)}
    for chunk in chunks:
        model = _unwrap(chunk)
        with _unused_output_weight_hidden(model):
            sharded = model.sharded_state_dict(metadata=metadata)
        apply_factories(sharded)  # in place: no ShardedTensorFactory is left
        for value in nested_values(sharded):
            if isinstance(value, ShardedTensor):
                yield value


def local_slice(sh: ShardedTensor) -> Tuple:
    """Index of this shard in its global tensor (prepended axes select one entry)."""
    index = []
    for axis, offset in enumerate(sh.global_offset):
        if axis < sh.prepend_axis_num:
            index.append(offset)
        else:
            size = sh.local_shape[axis - sh.prepend_axis_num]
            index.append(slice(offset, offset + size))
    return tuple(index)


def _params_by_storage(chunks) -> Dict[int, torch.nn.Parameter]:
    return {p.untyped_storage().data_ptr(): p for c in chunks for p in _unwrap(c).parameters()}


def _view_of(data: torch.Tensor, attr: Optional[str], params) -> Optional[torch.Tensor]:
    """``data`` itself, or the same view of its parameter's ``attr`` (e.g. main_grad)."""
    if attr is None:
        return data
    param = params.get(data.untyped_storage().data_ptr())
    if param is None:  # a buffer (the MoE router's expert bias): no gradient
        return None
    other = getattr(param, attr, None)
    if other is None:
        return None
    if param.stride() != other.stride():
        raise ValueError(f"{attr} is not laid out like its parameter")
    offset = data.storage_offset() - param.storage_offset() + other.storage_offset()
    return other.as_strided(data.size(), data.stride(), offset)


def full_weights(chunks, attr: Optional[str] = None) -> Dict[str, torch.Tensor]:
    """Global fp32 CPU tensors of a model that lives entirely on this rank (TP = PP = 1).

    ``attr`` takes a tensor attached to each parameter instead of the weight, e.g.
    ``"main_grad"`` for the gradients megatron-core's DDP accumulated. Raises
    ``ValueError`` if some global tensor is not fully covered by this rank.
    """
    params = _params_by_storage(chunks)
    full: Dict[str, torch.Tensor] = {}
    covered: Dict[str, int] = {}
    for sh in sharded_tensors(chunks):
        local = _view_of(sh.data, attr, params)
        if local is None:
            continue
        if sh.key not in full:
            full[sh.key] = torch.zeros(sh.global_shape, dtype=torch.float32, device="cpu")
            covered[sh.key] = 0
        full[sh.key][local_slice(sh)] = local.detach().float().cpu()
        covered[sh.key] += local.numel()
    for key, tensor in full.items():
        if covered[key] < tensor.numel():
            raise ValueError(
                f"{key}: this rank holds {covered[key]} of {tensor.numel()} values; "
                "full_weights needs a single-rank model (TP = PP = 1)"
            )
    return full


def load_full_weights(chunks, full: Dict[str, torch.Tensor]) -> List[str]:
    """Copy each local shard's slice of ``full`` into the model; returns the keys used.

    Raises ``KeyError`` for a local shard with no global tensor in ``full``.
    """
    used = []
    with torch.no_grad():
        for sh in sharded_tensors(chunks):
            if sh.key not in full:
                raise KeyError(f"no global tensor for {sh.key}")
            sh.data.copy_(full[sh.key][local_slice(sh)])
            used.append(sh.key)
    return used


def compare_to_full(chunks, full: Dict[str, torch.Tensor],
                    attr: Optional[str] = None) -> Dict[str, float]:
    """Largest absolute difference per key between this rank's shards and ``full``.

    With ``attr`` (e.g. ``"main_grad"``) the tensor attached to each parameter is
    compared instead of the weight; parameters without it are skipped.
    """
    params = _params_by_storage(chunks)
    diffs: Dict[str, float] = {}
    for sh in sharded_tensors(chunks):
        local = _view_of(sh.data, attr, params)
        if local is None:
            continue
        diff = (local.detach().float().cpu() - full[sh.key][local_slice(sh)]).abs().max().item()
        diffs[sh.key] = max(diffs.get(sh.key, 0.0), diff)
    return diffs

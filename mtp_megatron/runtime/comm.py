"""Every collective mtp_megatron issues itself, on the device its group's backend serves.

NCCL serves CUDA tensors only, gloo CPU tensors (torch's ``Backend.backend_capability``):
an all-reduce of a tensor made with a bare ``torch.tensor(...)`` (a CPU tensor) under
NCCL fails with "No backend type associated with device type cpu". So nothing else in
the package calls ``torch.distributed`` collectives (``tests/unit/test_comm.py`` walks
the package's AST to keep it so); the helpers here allocate their own tensors on
:func:`device_of` the group, and check every tensor handed in::

    comm.setup(device)                         # distributed.initialize does this
    stop = comm.any_rank(signal_received)      # flags every rank must agree on
    ok = comm.all_ranks(load_ok)
    latest = comm.reduce_values([a, b], op="max")        # -> [float, float]
    comm.all_reduce(stats, group=dp_group)     # in place; must live on device_of(dp_group)
    pieces = comm.all_gather(ids, group=tp_group)
    states = comm.all_gather_object(state, group=dp_group)
    comm.barrier()

The default process group is NCCL alone on GPUs (no gloo companion, see docs/gpu.md),
gloo on CPU.
"""

from __future__ import annotations

from typing import Any, List, Optional, Sequence

import torch
import torch.distributed as dist

_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
_device: Optional[torch.device] = None


class DeviceMismatchError(RuntimeError):
    """A collective got a tensor on another device than its group's backend serves."""


def setup(device: torch.device) -> None:
    """Record this rank's device (``cuda:N`` under NCCL, ``cpu`` under gloo)."""
    global _device
    _device = torch.device(device)


def teardown() -> None:
    global _device
    _device = None


def device_of(group=None) -> torch.device:
    """The device whose tensors ``group``'s backend moves: this rank's CUDA device for
    NCCL (alone or in a composite ``cpu:gloo,cuda:nccl``), the CPU for gloo."""
    backend = str(dist.get_backend(group)).lower()
    if "nccl" in backend:
        if _device is not None and _device.type == "cuda":
            return _device
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def check_device(tensor: torch.Tensor, group=None, what: str = "collective") -> None:
    """Raise DeviceMismatchError unless ``tensor`` is on :func:`device_of` ``group``."""
    want = device_of(group)
    got = tensor.device
    if got.type != want.type or (want.index is not None and got.index != want.index):
        raise DeviceMismatchError(
            f"{what}: tensor on {got}, but the {dist.get_backend(group)} group moves tensors "
            f"on {want}; allocate it with device=comm.device_of(group)"
            + (" (a tensor made without device= is on meta under "
               "MTP_MEGATRON_STRICT_DEVICE=1)" if got.type == "meta" else "")
        )


def all_reduce(tensor: torch.Tensor, op: str = "sum", group=None) -> torch.Tensor:
    """In-place all-reduce of ``tensor`` (on ``device_of(group)``); returns it."""
    check_device(tensor, group, "all_reduce")
    dist.all_reduce(tensor, op=_OPS[op], group=group)
    return tensor


def reduce_values(values: Sequence[float], op: str = "max", group=None,
                  dtype: torch.dtype = torch.float64) -> List[float]:
    """All-reduce a few host numbers (one small collective, one host sync)."""
    tensor = torch.tensor(list(values), dtype=dtype, device=device_of(group))
    dist.all_reduce(tensor, op=_OPS[op], group=group)
    return tensor.tolist()


def any_rank(flag: bool, group=None) -> bool:
    """True on every rank when ``flag`` is True on at least one."""
    return reduce_values([float(bool(flag))], op="max", group=group, dtype=torch.int32)[0] > 0


def all_ranks(flag: bool, group=None) -> bool:
    """True on every rank only if ``flag`` is True on every rank (so none hangs alone)."""
    return not any_rank(not flag, group=group)


def all_gather(tensor: torch.Tensor, group=None) -> List[torch.Tensor]:
    """Every rank's ``tensor`` (same shape on all), in group-rank order."""
    check_device(tensor, group, "all_gather")
    out = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, tensor.contiguous(), group=group)
    return out


def all_gather_object(obj: Any, group=None) -> List[Any]:
    """Every rank's picklable ``obj``, in group-rank order (torch moves the pickled
    bytes on the backend's device itself: the current CUDA device under NCCL)."""
    out: List[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def broadcast_object(obj: Any, src: int = 0, group=None) -> Any:
    """``src``'s picklable ``obj`` on every rank (like :func:`all_gather_object`, torch
    moves the bytes on the backend's device itself)."""
    message = [obj]
    dist.broadcast_object_list(message, src=src, group=group)
    return message[0]


def barrier(group=None) -> None:
    """Wait for every rank of ``group``; under NCCL on this rank's own GPU."""
    dev = device_of(group)
    if dev.type == "cuda":
        dist.barrier(group=group, device_ids=[dev.index])
    else:
        dist.barrier(group=group)

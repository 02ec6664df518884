"""Strict device mode for the CPU test tiers: package tensors made without ``device=``
land on ``meta``.

On CPU with gloo a bare ``torch.tensor([...])`` is on the right device by accident; on
a GPU with NCCL the same line is a CPU tensor that NCCL cannot move ("No backend type
associated with device type cpu"). With ``MTP_MEGATRON_STRICT_DEVICE=1`` (set by the
test launchers) :func:`distributed.initialize <mtp_megatron.runtime.distributed.initialize>`
installs :class:`PackageDefaultMeta`: a torch function mode that gives every tensor
factory call (``torch.tensor``, ``zeros``, ``arange``, ...) *made from mtp_megatron's
own code* without a device the device ``meta``. Such a tensor fails loudly wherever it
is used: in a ``comm`` collective (``comm.check_device``), on the first read back to the
host (``.item()``, ``.tolist()``, ``if tensor``: a direct ``dist.all_reduce`` of a meta
tensor is a silent no-op, c10d registers meta kernels), or mixed with real tensors.
megatron-core's and torch's own factory calls (their frames are not ours) are left
alone, so the model, optimizer and checkpointing run as usual.

    MTP_MEGATRON_STRICT_DEVICE=1 torchrun ... launch/pretrain_gpt_mtp.py ...

Cost: one Python call per torch function on the main thread (a few microseconds each);
test-only.
"""

from __future__ import annotations

import os
import sys
from typing import Optional

from torch.overrides import TorchFunctionMode
from torch.utils._device import _device_constructors

STRICT_ENV = "MTP_MEGATRON_STRICT_DEVICE"
PACKAGE = "mtp_megatron"
FORWARDER = "mtp_megatron.runtime.cpu_bridge"  # its _CpuTorch factories serve megatron-core

_mode: Optional["PackageDefaultMeta"] = None


def requested(environ=os.environ) -> bool:
    return environ.get(STRICT_ENV, "") not in ("", "0")


class PackageDefaultMeta(TorchFunctionMode):
    """Tensor factories called from ``mtp_megatron.*`` without ``device=`` go to meta."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _device_constructors() and kwargs.get("device") is None:
            if _is_package(_caller()):
                kwargs["device"] = "meta"
        return func(*args, **kwargs)


def _caller() -> str:
    """Module of the code that called the factory, looking through the CPU bridge's
    forwarding wrappers (they call torch on megatron-core's behalf)."""
    frame = sys._getframe(2)
    while frame is not None and frame.f_globals.get("__name__") == FORWARDER:
        frame = frame.f_back
    return frame.f_globals.get("__name__", "") if frame is not None else ""


def _is_package(module: str) -> bool:
    return module == PACKAGE or module.startswith(PACKAGE + ".")


def install() -> None:
    """Enter the mode on this thread (idempotent); :func:`uninstall` leaves it."""
    global _mode
    if _mode is None:
        _mode = PackageDefaultMeta()
        _mode.__enter__()


def uninstall() -> None:
    global _mode
    if _mode is not None:
        mode, _mode = _mode, None
        mode.__exit__(None, None, None)


def active() -> bool:
    return _mode is not None

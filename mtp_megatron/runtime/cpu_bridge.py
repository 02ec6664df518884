"""Bridge megatron-core 0.16.1's CUDA-only calls so it trains on CPU with gloo.

megatron-core assumes a GPU in a handful of places that have nothing to do with the
maths (device strings, RNG bookkeeping, type-name asserts). On a machine without CUDA
each of them fails with "Torch not compiled with CUDA enabled". :func:`install` patches
exactly those places, and only when ``torch.cuda.is_available()`` is False: on a GPU
machine it does nothing. Each patch says what it fixes and why it is safe.

    from mtp_megatron.runtime import cpu_bridge
    cpu_bridge.install()   # idempotent; a no-op when CUDA is present
    cpu_bridge.uninstall() # restores everything (tests)

It checks the installed megatron-core against :data:`SUPPORTED_MCORE`, the versions the
patches were written for, and refuses others with a message that says which to install.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import types
from typing import Any, List, Optional, Tuple

import torch
from megatron.core.tensor_parallel.random import CudaRNGStatesTracker

from mtp_megatron.config import ConfigError

logger = logging.getLogger(__name__)

_INSTALLED = False
_UNDO: List[Tuple[Any, str, Any]] = []  # (owner, attribute, previous value), in order
_MISSING = object()
_MODULES_WITH_CUDA_FACTORIES = (
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.grad_scaler",
    "megatron.core.rerun_state_machine",
    "megatron.core.tensor_parallel.data",
    "megatron.core.transformer.utils",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.utils",  # local_multi_tensor_l2_norm (grad norm without apex)
)
_ORIG_TENSOR_TYPE = torch.Tensor.type


def _cpu_device(device):
    """Map a "cuda" device request to "cpu"; leave everything else alone."""
    if device is None:
        return None
    if isinstance(device, int) or str(device).startswith("cuda"):
        return "cpu"
    return device


class _CpuTorch(types.ModuleType):
    """A stand-in for the ``torch`` module inside one megatron-core module.

    Factory functions called with ``device="cuda"`` get ``device="cpu"``; every
    other attribute is torch's own. Installed as ``<module>.torch`` only.
    """

    _FACTORIES = ("zeros", "ones", "empty", "empty_like", "full", "tensor", "arange")

    def __init__(self):
        super().__init__("torch")

    def __getattr__(self, name):
        attr = getattr(torch, name)
        if name in self._FACTORIES:

            @functools.wraps(attr)
            def factory(*args, **kwargs):
                if "device" in kwargs:
                    kwargs["device"] = _cpu_device(kwargs["device"])
                return attr(*args, **kwargs)

            return factory
        return attr


def _cuda_type_name(self, *args, **kwargs):
    """``Tensor.type()`` that names a CPU tensor as its CUDA twin (used only inside
    the megatron-core functions that assert on CUDA type names)."""
    name = _ORIG_TENSOR_TYPE(self, *args, **kwargs)
    # Idempotent: under a torch function mode the original method dispatches back here.
    if not args and not kwargs and self.device.type == "cpu" and ".cuda." not in name:
        return name.replace("torch.", "torch.cuda.", 1)
    return name


@contextlib.contextmanager
def _cpu_tensors_pass_cuda_type_checks():
    torch.Tensor.type = _cuda_type_name
    try:
        yield
    finally:
        torch.Tensor.type = _ORIG_TENSOR_TYPE


def _with_cuda_type_names(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with _cpu_tensors_pass_cuda_type_checks():
            return fn(*args, **kwargs)

    return wrapper


# The megatron-core versions whose internals the patches below were written against:
# every name patched here exists and means the same in 0.16.x. Another minor version may
# rename or move them, and a silently missing patch fails far from its cause.
SUPPORTED_MCORE = (">=0.16.1", "<0.17")


def megatron_core_version() -> str:
    from importlib.metadata import version

    return version("megatron-core")


def check_megatron_core_version(found: Optional[str] = None) -> None:
    """Raise :class:`ConfigError` unless megatron-core is in :data:`SUPPORTED_MCORE`."""
    from packaging.specifiers import SpecifierSet

    found = megatron_core_version() if found is None else found
    wanted = ",".join(SUPPORTED_MCORE)
    if found not in SpecifierSet(wanted, prereleases=True):
        raise ConfigError(
            "megatron-core", found, f"{wanted} on a machine without CUDA",
            "mtp_megatron/runtime/cpu_bridge.py patches megatron-core internals by name as "
            f"they are in those versions; pip install 'megatron-core{wanted}'",
        )


def _patch(owner, name: str, value) -> None:
    """Set ``owner.name = value``, remembering the old value for :func:`uninstall`."""
    _UNDO.append((owner, name, owner.__dict__.get(name, _MISSING)))
    setattr(owner, name, value)


def install() -> bool:
    """Install the CPU patches if CUDA is unavailable. Returns True if installed.

    Raises :class:`ConfigError` when the installed megatron-core is not a version the
    patches were written for (:data:`SUPPORTED_MCORE`).
    """
    global _INSTALLED
    if torch.cuda.is_available():
        return False
    if _INSTALLED:
        return True
    check_megatron_core_version()

    from megatron.core.optimizer import clip_grads, distrib_optimizer
    from megatron.core.optimizer import optimizer as mcore_opt_module
    from megatron.core.tensor_parallel import random as mcore_random

    # RoPE (`inv_freq.to(torch.cuda.current_device())`), the MTP loss tracker and the
    # param/grad buffers ask for "the current CUDA device"; without CUDA the only
    # device is the CPU, so answer that instead of raising.
    _patch(torch.cuda, "current_device", lambda: "cpu")

    # Pipeline p2p calls `torch.cuda.synchronize()` after batched send/recv so the
    # CUDA stream has finished; gloo ops on CPU tensors are already complete.
    _patch(torch.cuda, "synchronize", lambda *args, **kwargs: None)

    # `weight.data.cuda()` when the MTP/last stage ties its embedding copy to the
    # first stage (PP > 1), and `.cuda()` in optimizer state reloads: there is no
    # GPU to move to, so the tensor stays where it is.
    _patch(torch.Tensor, "cuda", lambda self, *args, **kwargs: self)

    # These modules allocate small bookkeeping tensors with `device="cuda"`: token
    # counters (schedules), overflow flags and loss scales (optimizers, grad scaler,
    # clipping), the rerun state machine's flags, the broadcast of batch sizes.
    for module in _MODULES_WITH_CUDA_FACTORIES:
        _patch(importlib.import_module(module), "torch", _CpuTorch())

    # The CUDA RNG tracker (model-parallel seeds, forked around dropout) stores and
    # swaps CUDA generator states; keep per-name CPU generator states instead.
    for name in ("_CUDA_RNG_STATE_TRACKER", "_CUDA_RNG_STATE_TRACKER_INITIALIZED"):
        _patch(mcore_random, name, getattr(mcore_random, name))
    _patch(mcore_random, "CudaRNGStatesTracker", CpuRNGStatesTracker)
    mcore_random.initialize_rng_tracker(force_reset=True)

    # Activation recompute (`tensor_parallel.checkpoint`) saves and restores the CPU
    # generator, the tracker's states and "the CUDA generator"; without CUDA there is
    # none (dropout draws from the CPU generator, already saved), so that part is empty.
    mcore_random._get_cuda_rng_state = lambda *args, **kwargs: torch.empty(
        0, dtype=torch.uint8, device="cpu")
    mcore_random._set_cuda_rng_state = lambda *args, **kwargs: None

    # Grad clipping asserts `grad.type() == 'torch.cuda.FloatTensor'`, and the
    # (distributed) mixed-precision optimizers reject anything not named
    # `torch.cuda.*Tensor`; the checks are about dtype, which CPU tensors satisfy.
    clip = _with_cuda_type_names(clip_grads.clip_grad_by_total_norm_fp32)
    _patch(clip_grads, "clip_grad_by_total_norm_fp32", clip)
    _patch(mcore_opt_module, "clip_grad_by_total_norm_fp32", clip)
    for cls in (
        distrib_optimizer.DistributedOptimizer,
        mcore_opt_module.Float16OptimizerWithFloat16Params,
    ):
        _patch(cls, "__init__", _with_cuda_type_names(cls.__init__))

    _INSTALLED = True
    logger.debug("CPU bridge for megatron-core installed")
    return True


def uninstall() -> None:
    """Undo :func:`install` (tests that must not leave torch patched for later ones)."""
    global _INSTALLED
    while _UNDO:
        owner, name, old = _UNDO.pop()
        if old is _MISSING:
            delattr(owner, name)
        else:
            setattr(owner, name, old)
    _INSTALLED = False


class CpuRNGStatesTracker(CudaRNGStatesTracker):
    """megatron-core's RNG tracker with CPU generator states in place of CUDA ones.

    ``add`` seeds a named state; ``fork`` swaps torch's default (CPU) generator to it
    and back, which is what the CUDA tracker does with the CUDA generator. The states
    are CPU byte tensors, so ``get_states``/``set_states`` checkpoint them as usual.
    """

    def add(self, name, seed):
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        if name in self.states_:
            raise Exception(f"rng state {name} already exists")
        self._is_initialized = True
        self.seeds_.add(seed)
        self.states_[name] = torch.Generator().manual_seed(seed).get_state()

    @contextlib.contextmanager
    def fork(self, name="model-parallel-rng"):
        if name not in self.states_:
            raise Exception(f"rng state {name} is not added")
        outer = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outer)

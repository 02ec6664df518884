"""Bridge megatron-core's CUDA-only calls so it trains on a machine without a GPU.

megatron-core assumes a GPU in a handful of places that have nothing to do with the
maths (device strings, streams, RNG bookkeeping, type-name asserts). Without a usable GPU
each fails: "Torch not compiled with CUDA enabled" with the CPU-only torch wheel, "Found
no NVIDIA driver" with a CUDA build of torch on a machine without one (the registry's
torch on Python 3.12). :func:`install` bridges exactly those places, and only when
``torch.cuda.is_available()`` is False: on a GPU machine it does nothing.

Every patch is scoped and undoable: it replaces a name *inside the megatron-core module
that needs it* (that module's ``torch`` becomes :class:`_CpuTorch`, whose ``cuda`` is
:class:`_CpuCuda`), or wraps one megatron-core function so that a patch of torch holds
only while that function runs. Nothing in ``torch`` itself stays patched. All of it goes
through one undo list; :func:`uninstall` (called at shutdown) restores everything.

    from mtp_megatron.runtime import cpu_bridge
    cpu_bridge.install()   # idempotent; a no-op when CUDA is present
    cpu_bridge.uninstall() # restores everything (shutdown, tests)

Which modules need the CPU ``torch`` differs per megatron-core release:
:func:`mtp_megatron.runtime.mcore_compat.cpu_bridge_modules` owns that table.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import types
from typing import Any, List, Tuple

import torch
from megatron.core.tensor_parallel.random import CudaRNGStatesTracker

from mtp_megatron.runtime import mcore_compat

logger = logging.getLogger(__name__)

_INSTALLED = False
_UNDO: List[Tuple[Any, str, Any]] = []  # (owner, attribute, previous value), in order
_MISSING = object()
_ORIG_TENSOR_TYPE = torch.Tensor.type


def _cpu_device(device):
    """Map a "cuda" device request to "cpu"; leave everything else alone."""
    if device is None:
        return None
    if isinstance(device, int) or str(device).startswith("cuda"):
        return "cpu"
    return device


class _NullStream:
    """A CUDA stream stand-in: on the CPU every op is complete when it returns, so there
    is nothing to wait for."""

    def wait_event(self, *args, **kwargs):
        return None

    def wait_stream(self, *args, **kwargs):
        return None

    def synchronize(self):
        return None

    def record_event(self, *args, **kwargs):
        return _NullEvent()


class _NullEvent:
    """A recorded CUDA event stand-in (the MoE alltoall dispatcher synchronizes on one):
    complete from the start."""

    def synchronize(self):
        return None

    def wait(self, *args, **kwargs):
        return None

    def query(self):
        return True


class _CpuCuda(types.ModuleType):
    """A stand-in for ``torch.cuda`` inside one megatron-core module: "the current CUDA
    device" is the CPU, synchronisation and streams are no-ops (CPU ops and gloo
    collectives on CPU tensors are complete when they return). Every other attribute is
    ``torch.cuda``'s own (``is_available()`` still says False)."""

    def __init__(self):
        super().__init__("torch.cuda")

    @staticmethod
    def current_device():
        return "cpu"

    @staticmethod
    def synchronize(*args, **kwargs):
        return None

    @staticmethod
    def current_stream(*args, **kwargs):
        return _NullStream()

    @staticmethod
    def Stream(*args, **kwargs):  # noqa: N802 (torch's name)
        return _NullStream()

    @staticmethod
    def stream(*args, **kwargs):
        return contextlib.nullcontext()

    @staticmethod
    def empty_cache():
        return None

    def __getattr__(self, name):
        return getattr(torch.cuda, name)


class _CpuTorch(types.ModuleType):
    """A stand-in for the ``torch`` module inside one megatron-core module.

    Factory functions called with ``device="cuda"`` get ``device="cpu"``, ``cuda`` is
    :class:`_CpuCuda`; every other attribute is torch's own. Installed as
    ``<module>.torch`` only.
    """

    _FACTORIES = ("zeros", "ones", "empty", "empty_like", "full", "tensor", "arange")

    def __init__(self):
        super().__init__("torch")
        self.cuda = _CpuCuda()
        for name in self._FACTORIES:
            setattr(self, name, self._factory(getattr(torch, name)))

    @staticmethod
    def _factory(attr):
        @functools.wraps(attr)
        def factory(*args, **kwargs):
            if "device" in kwargs:
                kwargs["device"] = _cpu_device(kwargs["device"])
            return attr(*args, **kwargs)

        return factory

    def __getattr__(self, name):
        return getattr(torch, name)


def _cuda_type_name(self, *args, **kwargs):
    """``Tensor.type()`` that names a CPU tensor as its CUDA twin (used only inside
    the megatron-core functions that assert on CUDA type names)."""
    name = _ORIG_TENSOR_TYPE(self, *args, **kwargs)
    # Idempotent: under a torch function mode the original method dispatches back here.
    if not args and not kwargs and self.device.type == "cpu" and ".cuda." not in name:
        return name.replace("torch.", "torch.cuda.", 1)
    return name


def _numpy_on_host(fn):
    """megatron-core's ``maybe_move_tensor_to_cpu`` that also gives a CPU tensor as numpy
    when ``as_numpy`` is asked for (it does so for CUDA tensors only)."""

    @functools.wraps(fn)
    def wrapper(tensor, *args, **kwargs):
        out = fn(tensor, *args, **kwargs)
        if kwargs.get("as_numpy") and torch.is_tensor(out):
            return out.numpy()
        return out

    return wrapper


def _tensor_stays(self, *args, **kwargs):
    """``Tensor.cuda()`` without a GPU: the tensor stays where it is."""
    return self


@contextlib.contextmanager
def _tensor_methods(**methods):
    """Replace ``torch.Tensor`` methods for the duration of the block only."""
    saved = {name: torch.Tensor.__dict__.get(name, _MISSING) for name in methods}
    for name, method in methods.items():
        setattr(torch.Tensor, name, method)
    try:
        yield
    finally:
        for name, method in saved.items():
            if method is _MISSING:
                delattr(torch.Tensor, name)  # inherited from torch._C.TensorBase again
            else:
                setattr(torch.Tensor, name, method)


def _scoped(fn, **methods):
    """``fn`` with the given Tensor methods replaced while (and only while) it runs."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with _tensor_methods(**methods):
            return fn(*args, **kwargs)

    wrapper.__wrapped_by_cpu_bridge__ = True
    return wrapper


def _patch(owner, name: str, value) -> None:
    """Set ``owner.name = value``, remembering the old value for :func:`uninstall`."""
    _UNDO.append((owner, name, owner.__dict__.get(name, _MISSING)))
    setattr(owner, name, value)


def _resolve(path: str):
    """``"package.module:Class.attr"`` -> (owner object, attribute name)."""
    module_name, _, attr_path = path.partition(":")
    owner = importlib.import_module(module_name)
    *parents, name = attr_path.split(".")
    for parent in parents:
        owner = getattr(owner, parent)
    return owner, name


def install() -> bool:
    """Install the CPU patches if CUDA is unavailable. Returns True if installed.

    Raises :class:`~mtp_megatron.config.ConfigError` when the installed megatron-core is
    not a release this package is tested with (``mcore_compat.check_supported``).
    """
    global _INSTALLED
    if torch.cuda.is_available():
        return False
    if _INSTALLED:
        return True
    mcore_compat.line()
    from megatron.core.tensor_parallel import random as mcore_random

    try:
        # Device strings, streams, synchronisation and small bookkeeping tensors made with
        # device="cuda" (token counters, overflow flags, loss scales, the MTP tracker,
        # RoPE's inv_freq, p2p shape exchange): the module's `torch` is the CPU stand-in.
        for module in mcore_compat.cpu_bridge_modules():
            _patch(importlib.import_module(module), "torch", _CpuTorch())

        # `weight.data.cuda()` when the MTP/last stage ties its embedding copy to the
        # first stage (PP > 1), and `.cuda()` when a loss scale is reloaded: there is no
        # GPU to move to, so the tensor stays where it is, inside those functions only.
        for path in mcore_compat.cpu_bridge_tensor_cuda_callers():
            owner, name = _resolve(path)
            _patch(owner, name, _scoped(getattr(owner, name), cuda=_tensor_stays))

        # Grad clipping asserts `grad.type() == 'torch.cuda.FloatTensor'`, and the
        # (distributed) mixed-precision optimizers reject anything not named
        # `torch.cuda.*Tensor`; the checks are about dtype, which CPU tensors satisfy.
        for path in mcore_compat.cpu_bridge_type_name_checkers():
            owner, name = _resolve(path)
            _patch(owner, name, _scoped(getattr(owner, name), type=_cuda_type_name))

        # The MoE alltoall dispatcher hands its split sizes to all_to_all_single, which
        # takes a list of ints: megatron-core moves them to host numpy for CUDA tensors
        # only, and a CPU tensor reaches all_to_all_single as a tensor (a TypeError).
        for path in mcore_compat.cpu_bridge_host_numpy_callers():
            owner, name = _resolve(path)
            _patch(owner, name, _numpy_on_host(getattr(owner, name)))

        # torch.compile'd bookkeeping (the aux-loss-free router's token counter) runs
        # eagerly: a cold compile costs ~8 s per process on CPU for one vector addition.
        for path in mcore_compat.cpu_bridge_eager_functions():
            owner, name = _resolve(path)
            compiled = owner.__dict__[name]
            _patch(owner, name, getattr(compiled, "_torchdynamo_orig_callable", compiled))

        # The CUDA RNG tracker (model-parallel seeds, forked around dropout) stores and
        # swaps CUDA generator states; keep per-name CPU generator states instead.
        for name in ("_CUDA_RNG_STATE_TRACKER", "_CUDA_RNG_STATE_TRACKER_INITIALIZED"):
            _patch(mcore_random, name, getattr(mcore_random, name))
        _patch(mcore_random, "CudaRNGStatesTracker", CpuRNGStatesTracker)
        mcore_random.initialize_rng_tracker(force_reset=True)

        # Activation recompute (`tensor_parallel.checkpoint`) saves and restores the CPU
        # generator, the tracker's states and "the CUDA generator"; without CUDA there is
        # none (dropout draws from the CPU generator, already saved), so that part is empty.
        _patch(mcore_random, "_get_cuda_rng_state", _no_cuda_rng_state)
        _patch(mcore_random, "_set_cuda_rng_state", _set_no_cuda_rng_state)
    except BaseException:
        uninstall()
        raise

    _INSTALLED = True
    logger.debug("CPU bridge for megatron-core installed")
    return True


def _no_cuda_rng_state(*args, **kwargs):
    return torch.empty(0, dtype=torch.uint8, device="cpu")


def _set_no_cuda_rng_state(*args, **kwargs):
    return None


def uninstall() -> None:
    """Undo :func:`install`: every megatron-core name it replaced is restored."""
    global _INSTALLED
    while _UNDO:
        owner, name, old = _UNDO.pop()
        if old is _MISSING:
            delattr(owner, name)
        else:
            setattr(owner, name, old)
    _INSTALLED = False


def installed() -> bool:
    return _INSTALLED


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

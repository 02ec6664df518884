"""The CPU bridge: each patch does what its comment says, only without CUDA, and only
inside the megatron-core modules and functions that need it.

The bridge replaces names inside megatron-core modules, so this module installs it for
its own tests and uninstalls it afterwards: later in-process tests see megatron-core as it
was. torch itself is never left patched (asserted below while it is installed).
"""

import importlib

import pytest
import torch

from mtp_megatron.config import ConfigError
from mtp_megatron.runtime import cpu_bridge, mcore_compat

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the bridge is CPU-only")

_ORIGINAL_CUDA = torch.Tensor.cuda
_ORIGINAL_TYPE = torch.Tensor.type
_ORIGINAL_CURRENT_DEVICE = torch.cuda.current_device
_ORIGINAL_SYNCHRONIZE = torch.cuda.synchronize


@pytest.fixture(scope="module", autouse=True)
def bridge():
    installed_before = cpu_bridge.installed()
    assert cpu_bridge.install() is True
    assert cpu_bridge.install() is True  # idempotent
    yield
    if not installed_before:  # leave the process as this module found it
        cpu_bridge.uninstall()


def test_torch_itself_is_not_patched():
    """No global patch: torch.cuda and Tensor keep their own functions while installed."""
    assert torch.cuda.current_device is _ORIGINAL_CURRENT_DEVICE
    assert torch.cuda.synchronize is _ORIGINAL_SYNCHRONIZE
    assert torch.Tensor.cuda is _ORIGINAL_CUDA and torch.Tensor.type is _ORIGINAL_TYPE
    assert "cuda" not in torch.Tensor.__dict__ and "type" not in torch.Tensor.__dict__
    with pytest.raises((RuntimeError, AssertionError)):  # "not compiled" / "no driver"
        torch.ones(1).cuda()


def test_bridged_modules_see_a_cpu_cuda():
    """Inside every bridged module: the current device is the CPU, synchronisation and
    streams are no-ops, cuda factories allocate on the CPU, the rest is torch's own."""
    for name in mcore_compat.cpu_bridge_modules():
        mod = importlib.import_module(name)
        assert isinstance(mod.torch, cpu_bridge._CpuTorch), name
        assert mod.torch.cuda.current_device() == "cpu"
        assert mod.torch.cuda.synchronize() is None
        stream = mod.torch.cuda.current_stream()
        assert stream.wait_event(object()) is None and stream.wait_stream(stream) is None
        with mod.torch.cuda.stream(mod.torch.cuda.Stream()):
            pass
        assert mod.torch.cuda.is_available() is False
        assert mod.torch.float32 is torch.float32 and mod.torch.Tensor is torch.Tensor
    from megatron.core.pipeline_parallel import schedules

    for factory in ("zeros", "ones", "empty", "tensor", "full", "arange"):
        args = {"tensor": ([1.0],), "full": ((2,), 1.0)}.get(factory, (2,))
        out = getattr(schedules.torch, factory)(*args, device="cuda")
        assert out.device.type == "cpu", factory


def test_tensor_cuda_stays_on_cpu_only_inside_the_callers():
    owner, name = cpu_bridge._resolve(mcore_compat.cpu_bridge_tensor_cuda_callers()[0])
    seen = {}

    def probe(self, *args, **kwargs):
        t = torch.ones(2)
        seen["same"] = t.cuda() is t
        return "ok"

    # the wrapper's scoping, applied to a probe with the same mechanism
    wrapped = cpu_bridge._scoped(probe, cuda=cpu_bridge._tensor_stays)
    assert wrapped(None) == "ok" and seen["same"]
    assert torch.Tensor.cuda is _ORIGINAL_CUDA  # restored after the call
    assert getattr(getattr(owner, name), "__wrapped_by_cpu_bridge__", False)


def test_rng_tracker_forks_named_cpu_streams_and_restores_the_default():
    from megatron.core.tensor_parallel import random as mcore_random

    tracker = mcore_random.get_cuda_rng_tracker()
    assert isinstance(tracker, cpu_bridge.CpuRNGStatesTracker)
    tracker.reset()
    tracker.add("model-parallel-rng", 123)
    torch.manual_seed(0)
    outer_before = torch.get_rng_state()
    with tracker.fork():
        a = torch.rand(4)
    assert torch.equal(torch.get_rng_state(), outer_before)  # default stream untouched
    with tracker.fork():
        b = torch.rand(4)
    assert not torch.equal(a, b)  # the named stream advanced
    fresh = torch.Generator().manual_seed(123)
    assert torch.equal(a, torch.rand(4, generator=fresh))  # seeded as asked
    with pytest.raises(Exception, match="not added"):
        with tracker.fork("unknown"):
            pass
    assert mcore_random._get_cuda_rng_state().numel() == 0
    assert mcore_random._set_cuda_rng_state(torch.empty(0)) is None


def test_cuda_type_checks_pass_only_inside_the_wrapped_functions():
    from megatron.core.optimizer import clip_grads

    p = torch.nn.Parameter(torch.ones(4))
    p.grad = torch.full((4,), 3.0)
    clip_grads.clip_grad_by_total_norm_fp32([p], max_norm=1.0, total_norm=6.0)
    assert torch.allclose(p.grad, torch.full((4,), 3.0 / (6.0 + 1e-6)))
    assert torch.ones(1).type() == "torch.FloatTensor"  # restored outside
    assert "type" not in torch.Tensor.__dict__


def test_recorded_events_are_complete():
    """The MoE alltoall dispatcher synchronizes on an event its DtoH stream recorded."""
    from megatron.core.transformer.moe import token_dispatcher

    event = token_dispatcher.torch.cuda.Stream().record_event()
    assert event.synchronize() is None and event.query() is True


def test_moe_split_sizes_reach_all_to_all_as_host_numpy():
    """all_to_all_single takes split sizes as a list of ints: megatron-core converts CUDA
    tensors only; inside the dispatcher a CPU tensor is converted too."""
    import numpy as np
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    sizes = torch.tensor([3, 5])
    out = token_dispatcher.maybe_move_tensor_to_cpu(sizes, as_numpy=True, record_stream=False)
    assert isinstance(out, np.ndarray) and out.tolist() == [3, 5]
    assert token_dispatcher.maybe_move_tensor_to_cpu(sizes) is sizes
    assert moe_utils.maybe_move_tensor_to_cpu(sizes, as_numpy=True) is sizes  # not patched


def test_the_expert_bias_counter_runs_uncompiled_with_the_same_result():
    """The aux-loss-free router's token counter runs eagerly (no cold torch.compile)."""
    from megatron.core.transformer.moe.router import TopKRouter

    counter = TopKRouter.__dict__["_apply_expert_bias"]
    assert not hasattr(counter, "_torchdynamo_orig_callable")

    class Router:
        enable_expert_bias = True
        local_tokens_per_expert = torch.zeros(3)

    routing = torch.tensor([[True, False, True], [False, False, True]])
    counter(Router, routing)
    assert Router.local_tokens_per_expert.tolist() == [1.0, 0.0, 2.0]
    with torch.no_grad():  # evaluation counts nothing
        counter(Router, routing)
    assert Router.local_tokens_per_expert.tolist() == [1.0, 0.0, 2.0]


@pytest.mark.parametrize("version", ["0.15.3", "0.16.0", "0.17.0", "0.18.2", "0.19.1",
                                     "0.20.0", "1.0.0"])
def test_other_megatron_core_versions_are_refused_by_name(version):
    with pytest.raises(ConfigError, match=rf"megatron-core='{version}'.*>=0\.19\.2,<0\.20 "
                                          r"\(Python 3\.12\) or >=0\.16\.1,<0\.17"):
        mcore_compat.check_supported(version)


def test_supported_versions_pass():
    for version in ("0.16.1", "0.16.2", "0.19.2", "0.19.5", mcore_compat.installed_version()):
        assert mcore_compat.check_supported(version) in mcore_compat.LINES


def test_uninstall_restores_megatron_core():
    from megatron.core.optimizer import clip_grads
    from megatron.core.pipeline_parallel import schedules
    from megatron.core.tensor_parallel import random as mcore_random

    patched_clip = clip_grads.clip_grad_by_total_norm_fp32
    cpu_bridge.uninstall()
    try:
        assert not cpu_bridge.installed() and not cpu_bridge._UNDO
        for name in mcore_compat.cpu_bridge_modules():
            assert importlib.import_module(name).torch is torch, name
        assert mcore_random.CudaRNGStatesTracker is not cpu_bridge.CpuRNGStatesTracker
        assert mcore_random._get_cuda_rng_state is not cpu_bridge._no_cuda_rng_state
        assert clip_grads.clip_grad_by_total_norm_fp32 is not patched_clip
        from megatron.core.transformer.moe import moe_utils, router, token_dispatcher

        assert token_dispatcher.maybe_move_tensor_to_cpu is moe_utils.maybe_move_tensor_to_cpu
        assert hasattr(router.TopKRouter.__dict__["_apply_expert_bias"],
                       "_torchdynamo_orig_callable")
        assert not hasattr(clip_grads.clip_grad_by_total_norm_fp32, "__wrapped_by_cpu_bridge__")
        with pytest.raises((RuntimeError, AssertionError)):
            schedules.torch.zeros(1, device="cuda")
    finally:
        assert cpu_bridge.install() is True


def test_a_failed_install_leaves_nothing_patched(monkeypatch):
    cpu_bridge.uninstall()
    try:
        bad = mcore_compat.cpu_bridge_modules() + ("megatron.core.no_such_module",)
        monkeypatch.setattr(mcore_compat, "cpu_bridge_modules", lambda: bad)
        with pytest.raises(ModuleNotFoundError):
            cpu_bridge.install()
        assert not cpu_bridge.installed() and not cpu_bridge._UNDO
        from megatron.core.pipeline_parallel import schedules

        assert schedules.torch is torch
    finally:
        monkeypatch.undo()
        assert cpu_bridge.install() is True

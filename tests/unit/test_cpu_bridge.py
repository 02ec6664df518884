"""The CPU bridge: each patch does what its comment says, and only without CUDA.

The bridge patches torch and megatron-core process-wide, so this module installs it for
its own tests and uninstalls it afterwards: later in-process tests see torch as it was.
"""

import pytest
import torch

from mtp_megatron.config import ConfigError
from mtp_megatron.runtime import cpu_bridge

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the bridge is CPU-only")

_ORIGINAL_CUDA = torch.Tensor.cuda
_ORIGINAL_CURRENT_DEVICE = torch.cuda.current_device


@pytest.fixture(scope="module", autouse=True)
def bridge():
    installed_before = cpu_bridge._INSTALLED
    assert cpu_bridge.install() is True
    assert cpu_bridge.install() is True  # idempotent
    yield
    if not installed_before:  # leave the process as this module found it
        cpu_bridge.uninstall()


def test_current_device_and_synchronize_answer_for_the_cpu():
    assert torch.cuda.current_device() == "cpu"
    assert torch.cuda.synchronize() is None
    t = torch.ones(3)
    assert t.cuda() is t


def test_cuda_factories_in_patched_modules_allocate_on_cpu():
    from megatron.core.pipeline_parallel import schedules

    for name in ("zeros", "ones", "empty", "tensor"):
        args = ([1.0],) if name == "tensor" else (2,)
        out = getattr(schedules.torch, name)(*args, device="cuda")
        assert out.device.type == "cpu"
    assert schedules.torch.float32 is torch.float32  # everything else is torch's own


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


def test_cuda_type_checks_pass_only_inside_the_wrapped_functions():
    from megatron.core.optimizer import clip_grads

    p = torch.nn.Parameter(torch.ones(4))
    p.grad = torch.full((4,), 3.0)
    clip_grads.clip_grad_by_total_norm_fp32([p], max_norm=1.0, total_norm=6.0)
    assert torch.allclose(p.grad, torch.full((4,), 3.0 / (6.0 + 1e-6)))
    assert torch.ones(1).type() == "torch.FloatTensor"  # restored outside


@pytest.mark.parametrize("version", ["0.15.3", "0.17.0", "1.0.0"])
def test_other_megatron_core_versions_are_refused_by_name(monkeypatch, version):
    with pytest.raises(ConfigError, match=f"megatron-core='{version}'.*>=0.16.1,<0.17"):
        cpu_bridge.check_megatron_core_version(version)
    monkeypatch.setattr(cpu_bridge, "megatron_core_version", lambda: version)
    monkeypatch.setattr(cpu_bridge, "_INSTALLED", False)
    with pytest.raises(ConfigError, match="pip install 'megatron-core>=0.16.1,<0.17'"):
        cpu_bridge.install()


def test_supported_versions_pass():
    for version in ("0.16.1", "0.16.2", cpu_bridge.megatron_core_version()):
        cpu_bridge.check_megatron_core_version(version)


def test_uninstall_restores_torch_and_megatron_core():
    from megatron.core.pipeline_parallel import schedules
    from megatron.core.tensor_parallel import random as mcore_random

    cpu_bridge.uninstall()
    try:
        assert torch.Tensor.cuda is _ORIGINAL_CUDA
        assert torch.cuda.current_device is _ORIGINAL_CURRENT_DEVICE
        assert schedules.torch is torch
        assert mcore_random.CudaRNGStatesTracker is not cpu_bridge.CpuRNGStatesTracker
        with pytest.raises((RuntimeError, AssertionError), match="CUDA"):
            torch.ones(1).cuda()
    finally:
        assert cpu_bridge.install() is True

"""The CPU bridge: each patch does what its comment says, and only without CUDA."""

import pytest
import torch

from mtp_megatron.runtime import cpu_bridge

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the bridge is CPU-only")


@pytest.fixture(scope="module", autouse=True)
def bridge():
    assert cpu_bridge.install() is True
    assert cpu_bridge.install() is True  # idempotent


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

"""GPU runs (skipped without CUDA): NCCL, bf16, local and Transformer Engine specs.

Run on a CUDA machine (e.g. inside an NGC PyTorch container): ``pytest -m gpu tests``.
"""

import pytest
import torch

from tests.functional.launcher import TINY, launch

pytestmark = [pytest.mark.gpu, pytest.mark.functional]


def _impls():
    from mtp_megatron.runtime.accel import te_available

    return ["local"] + (["transformer_engine"] if te_available() else [])


@pytest.mark.parametrize("impl", ["local", "transformer_engine"])
def test_bf16_mtp2_trains_on_one_gpu(impl, tmp_path):
    if impl not in _impls():
        pytest.skip("Transformer Engine is not installed")
    run = launch(TINY + ["--mock-data", "--mtp-num-layers", "2", "--bf16", "--train-iters", "30",
                         "--transformer-impl", impl, "--eval-iters", "2"],
                 output_dir=str(tmp_path), nproc=1, gpu=True)
    assert run.returncode == 0, run
    rows = run.metrics()
    assert rows[-1]["lm loss"] < rows[0]["lm loss"] - 1.0
    assert "mtp_2 loss" in rows[-1]


def test_nccl_data_parallel_when_two_gpus(tmp_path):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    run = launch(TINY + ["--mock-data", "--mtp-num-layers", "1", "--train-iters", "20",
                         "--eval-iters", "2"], output_dir=str(tmp_path), nproc=2,
                 gpu=True)
    assert run.returncode == 0, run
    assert run.metrics()[-1]["lm loss"] < run.metrics()[0]["lm loss"]


MOE_EXAMPLE = ["--config", "examples/dsv3_moe_tiny_cpu.yaml", "--train-iters", "20",
               "--eval-iters", "0", "--bf16"]


@pytest.mark.parametrize("impl,extra", [("local", []),
                                        ("transformer_engine", ["--moe-grouped-gemm"])])
def test_bf16_moe_mtp_trains_on_one_gpu(impl, extra, tmp_path):
    """The DeepSeek-V3-shaped example (multi-latent attention, MLA + MoE MTP layer, expert
    bias) on the GPU: local MLA core attention and experts, and Transformer Engine's MLA
    spec with grouped GEMMs (not testable on CPU)."""
    if impl not in _impls():
        pytest.skip("Transformer Engine is not installed")
    run = launch(MOE_EXAMPLE + ["--transformer-impl", impl] + extra,
                 output_dir=str(tmp_path), nproc=1, gpu=True)
    assert run.returncode == 0, run
    rows = run.metrics()
    assert rows[-1]["lm loss"] < rows[0]["lm loss"] - 0.2
    assert "mtp_1 loss" in rows[-1] and "expert bias max" in rows[-1]


def test_moe_expert_parallel_on_two_gpus(tmp_path):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    run = launch(MOE_EXAMPLE + ["--expert-model-parallel-size", "2"],
                 output_dir=str(tmp_path), nproc=2, gpu=True)
    assert run.returncode == 0, run
    assert run.metrics()[-1]["lm loss"] < run.metrics()[0]["lm loss"]

"""FP8 at startup, as plain Python: every refusal names its flag; the flags reach
megatron-core's TransformerConfig. (Running FP8 is in tests/gpu/test_fp8_gpu.py.)"""

from __future__ import annotations

import pytest
import torch

from mtp_megatron.config import ConfigError, build_config
from mtp_megatron.runtime import accel
from mtp_megatron.runtime.preflight import preflight

FP8 = dict(fp8_format="e4m3", transformer_impl="transformer_engine", bf16=True,
           mtp_num_layers=1)


@pytest.fixture
def gpu(monkeypatch):
    """Pretend to be a GPU machine of a given compute capability with a given TE."""

    def make(capability, te_version="2.5.0", te_checks=None):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: capability)
        monkeypatch.setattr(accel, "te_available", lambda: te_version is not None)
        monkeypatch.setattr(accel, "_te_version", lambda: te_version)
        checks = te_checks or {}
        monkeypatch.setattr(accel, "_te_support_check", lambda name: checks.get(name))

    return make


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_fp8_without_a_gpu_names_the_flag(tmp_path):
    cfg = build_config(None, dict(FP8, transformer_impl=None, output_dir=str(tmp_path)), None)
    with pytest.raises(ConfigError, match="--fp8-format") as err:
        preflight(cfg, {})
    assert "GPU" in str(err.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_fp8_is_refused_before_the_layer_implementation(tmp_path):
    """Asking for TE on a CPU machine with FP8 reports the FP8 problem, not only TE's."""
    cfg = build_config(None, dict(FP8, output_dir=str(tmp_path)), None)
    with pytest.raises(ConfigError, match="--fp8-format"):
        preflight(cfg, {})


def test_fp8_with_the_local_layers_names_the_flag():
    with pytest.raises(ConfigError, match="--fp8-format") as err:
        build_config(None, dict(FP8, transformer_impl="local"), None)
    assert "transformer_engine" in str(err.value)


def test_fp8_on_a_gpu_without_fp8_names_the_flag(gpu):
    gpu((8, 0))
    with pytest.raises(ConfigError, match="--fp8-format") as err:
        accel.check_fp8_runtime("e4m3", "delayed")
    assert "8.0" in str(err.value)


def test_fp8_without_transformer_engine_names_the_flag_and_the_fix(gpu):
    gpu((9, 0), te_version=None)
    with pytest.raises(ConfigError, match="--fp8-format") as err:
        accel.check_fp8_runtime("hybrid", "delayed")
    assert "pip install" in str(err.value)


@pytest.mark.parametrize("capability, recipe, ok", [
    ((8, 9), "delayed", True), ((8, 9), "tensorwise", True), ((8, 9), "blockwise", False),
    ((9, 0), "delayed", True), ((9, 0), "blockwise", True), ((9, 0), "mxfp8", False),
    ((10, 0), "mxfp8", True), ((10, 0), "tensorwise", True),
])
def test_each_recipe_needs_its_gpu(gpu, capability, recipe, ok):
    gpu(capability)
    if ok:
        accel.check_fp8_runtime("e4m3", recipe)
        return
    with pytest.raises(ConfigError, match="--fp8-recipe") as err:
        accel.check_fp8_runtime("e4m3", recipe)
    assert "compute capability" in str(err.value)
    assert "delayed" in str(err.value)  # the message lists what does work here


def test_a_recipe_newer_than_transformer_engine_names_the_flag(gpu):
    gpu((9, 0), te_version="2.1.0")
    with pytest.raises(ConfigError, match="--fp8-recipe") as err:
        accel.check_fp8_runtime("e4m3", "tensorwise")
    assert ">= 2.2" in str(err.value) and "2.1.0" in str(err.value)


def test_transformer_engine_has_the_last_word(gpu):
    """Where TE can tell (its check_*_support functions), its reason is shown."""
    gpu((9, 0), te_checks={"check_fp8_block_scaling_support":
                           (False, "FP8 block scaled GEMM requires CUDA >= 12.9")})
    with pytest.raises(ConfigError, match="--fp8-recipe") as err:
        accel.check_fp8_runtime("e4m3", "blockwise")
    assert "CUDA >= 12.9" in str(err.value)


def test_recipes_match_megatron_core():
    """Our --fp8-recipe choices are megatron-core's, less 'custom' (which needs a
    quantizer factory we do not expose)."""
    from megatron.core.enums import Fp8Recipe

    from mtp_megatron.config.training import FP8_RECIPES

    assert set(FP8_RECIPES) == {r.value for r in Fp8Recipe} - {"custom"}
    assert set(accel.FP8_RECIPE_NEEDS) == set(FP8_RECIPES)


@pytest.mark.parametrize("recipe", ["delayed", "tensorwise", "mxfp8", "blockwise"])
def test_fp8_flags_reach_the_transformer_config(recipe):
    from mtp_megatron.model.builder import transformer_config

    cfg = build_config(None, dict(FP8, fp8_format="hybrid", fp8_recipe=recipe,
                                  fp8_amax_history_len=16), None)
    tconfig = transformer_config(cfg, on_cpu=True)
    assert (tconfig.fp8, tconfig.fp8_recipe, tconfig.fp8_amax_history_len) == \
        ("hybrid", recipe, 16)
    assert tconfig.mtp_num_layers == 1  # the MTP layers read the same config


def test_without_fp8_the_config_has_none():
    from mtp_megatron.model.builder import transformer_config

    tconfig = transformer_config(build_config(None, {"mtp_num_layers": 1}, None), on_cpu=True)
    assert tconfig.fp8 is None

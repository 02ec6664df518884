"""FP8 through Transformer Engine with MTP, on one CUDA GPU (skipped without one).

    pytest -m gpu tests/gpu -v        # see docs/gpu-validation.md for the container

* every --fp8-recipe this GPU and TE support builds TP=1 with D=2 and takes 3 steps;
  the TE modules of the decoder *and* of the MTP layers ran under FP8 with the same
  recipe (megatron-core enters ``get_fp8_context(config)`` around each MTP layer);
* bf16 and FP8 (delayed, hybrid) train the same initial weights on the same batches for
  50 iterations; the lm and per-depth MTP loss curves agree within the tolerance below.
"""

from __future__ import annotations

import pytest

from mtp_megatron.runtime.accel import te_available
from tests.dist_utils import spawn

# Skip (not error) where Transformer Engine is missing: a GPU box without the te extra.
pytestmark = [pytest.mark.gpu, pytest.mark.multirank,  # spawns its rank
              pytest.mark.skipif(not te_available(), reason="Transformer Engine not installed")]

STEPS = 50
# bf16 vs FP8 at every step: |fp8 - bf16| <= ABS_TOL + REL_TOL * bf16 (both mixed
# precision; FP8 GEMMs add quantisation noise of about 1e-2 relative on this model).
ABS_TOL, REL_TOL = 0.05, 0.03
# ... and the mean over the last 10 steps within 1 %.
MEAN_REL_TOL = 0.01

MODEL = dict(
    num_layers=4, hidden_size=256, num_attention_heads=4, ffn_hidden_size=1024,
    seq_length=256, vocab_size=1024, make_vocab_size_divisible_by=128, swiglu=True,
    micro_batch_size=4, global_batch_size=16, lr=1e-3, min_lr=1e-4, lr_warmup_iters=5,
    bf16=True, mock_data=True, transformer_impl="transformer_engine", log_interval=1000,
    mtp_loss_scaling_factor=0.3, init_method_std=0.02,
)


def _config(output_dir, **overrides):
    from tests.reference.harness import tiny_config

    return tiny_config(1, output_dir, **{**MODEL, **overrides})


def _te_modules(chunk, prefix):
    """The TE GEMM modules (linear_qkv/proj/fc1/fc2, eh_proj) under ``prefix``."""
    from transformer_engine.pytorch.module.base import TransformerEngineBaseModule

    return {name: m for name, m in chunk.named_modules()
            if name.startswith(prefix) and isinstance(m, TransformerEngineBaseModule)
            and ("linear" in name.rsplit(".", 1)[-1] or name.endswith("eh_proj"))}


def _recipes_that_run_here():
    import torch

    from mtp_megatron.runtime.accel import FP8_RECIPE_NEEDS, fp8_recipe_support

    capability = torch.cuda.get_device_capability()
    return [r for r in FP8_RECIPE_NEEDS if fp8_recipe_support(r, capability)[0]]


def _build_and_step(rank, world_size, output_dir):
    import math

    from tests.reference.harness import finish, make_trainer

    out = {}
    for recipe in _recipes_that_run_here():
        cfg = _config(output_dir, fp8_format="e4m3", fp8_recipe=recipe, mtp_num_layers=2,
                      train_iters=3, fp8_amax_history_len=16)
        trainer = make_trainer(cfg, "transformer_engine")
        steps = [trainer.train_step() for _ in range(3)]
        gpt = trainer.model[0].module
        ran = {}
        for part in ("decoder", "mtp"):
            modules = _te_modules(gpt, part)
            ran[part] = dict(
                count=len(modules),
                fp8=all(getattr(m, "fp8", False) for m in modules.values()),
                recipes={type(m.fp8_meta.get("recipe")).__name__ for m in modules.values()},
            )
        out[recipe] = dict(
            finite=all(math.isfinite(s.lm_loss) and all(map(math.isfinite, s.mtp_losses))
                       for s in steps),
            depths=[len(s.mtp_losses) for s in steps], ran=ran,
        )
        finish(trainer)
    return out


def _curves(rank, world_size, output_dir):
    from mtp_megatron.model.weights import full_weights, load_full_weights
    from tests.reference.harness import finish, make_trainer

    curves, init = {}, None
    for name, fp8 in (("bf16", {}), ("fp8", dict(fp8_format="hybrid", fp8_recipe="delayed"))):
        trainer = make_trainer(_config(output_dir, mtp_num_layers=2, train_iters=STEPS, **fp8),
                               "transformer_engine")
        if init is None:
            init = full_weights(trainer.model)
        load_full_weights(trainer.model, init)
        # The optimizer already holds fp32 main copies of the bf16 weights it was built
        # with; without this its first step would write those back over ``init``.
        trainer.optimizer.reload_model_params()
        steps = []
        trainer.train(on_step=steps.append)
        curves[name] = [(s.lm_loss, s.mtp_losses) for s in steps]
        finish(trainer)
    return curves


@pytest.fixture(scope="module")
def stepped(tmp_path_factory):
    return spawn(1, _build_and_step, str(tmp_path_factory.mktemp("fp8")), gpu=True)[0]


def test_some_fp8_recipe_runs_here(stepped):
    assert "delayed" in stepped or "tensorwise" in stepped, stepped


def test_fp8_with_mtp_builds_and_steps(stepped):
    for recipe, r in stepped.items():
        assert r["finite"], recipe
        assert r["depths"] == [2, 2, 2], recipe


def test_mtp_layers_run_under_the_decoders_fp8_recipe(stepped):
    for recipe, r in stepped.items():
        decoder, mtp = r["ran"]["decoder"], r["ran"]["mtp"]
        assert decoder["count"] and mtp["count"], recipe
        assert decoder["fp8"] and mtp["fp8"], f"{recipe}: some TE module ran without FP8"
        assert decoder["recipes"] == mtp["recipes"], recipe


def test_bf16_and_fp8_loss_curves_agree(tmp_path):
    curves = spawn(1, _curves, str(tmp_path), gpu=True)[0]
    bf16, fp8 = curves["bf16"], curves["fp8"]
    assert len(bf16) == len(fp8) == STEPS
    assert bf16[-1][0] < bf16[0][0] - 0.5  # it learns, so the comparison means something
    for series in range(3):  # lm, mtp_1, mtp_2
        ref = [s[0] if series == 0 else s[1][series - 1] for s in bf16]
        got = [s[0] if series == 0 else s[1][series - 1] for s in fp8]
        for step, (a, b) in enumerate(zip(got, ref), start=1):
            assert abs(a - b) <= ABS_TOL + REL_TOL * abs(b), f"series {series} step {step}"
        tail_ref, tail_got = sum(ref[-10:]) / 10, sum(got[-10:]) / 10
        assert abs(tail_got - tail_ref) <= MEAN_REL_TOL * tail_ref, f"series {series}"

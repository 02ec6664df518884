"""Per-depth MTP weights and the factor schedule reach megatron-core's gradient.

One spawned CPU rank trains one step per case (D = 3, 4 microbatches with loss-mask
holes, perturbed norms) and compares ``main_grad`` with the gradient of the weighted
objective ``lm + factor(i) * sum_k w_k mtp_k`` of the pure-PyTorch reference
(``tests/reference``), whose weights are written out here (not taken from our config
code). Four ranks then train the same cases as TP2 x PP2 (and one as PP2 + VPP2 x DP2)
from the same initial weights and compare their gradient shards with the same reference
gradient. Every case also checks that the gradient is far from the uniform-weight (or
peak-factor) objective's, so a weighting that silently did nothing would fail.
"""

from __future__ import annotations

import pytest

from tests.dist_utils import spawn

pytestmark = [pytest.mark.multirank, pytest.mark.compat]  # the hook differs per release

LOSS_TOL = 1e-5
GRAD_ATOL, GRAD_RTOL = 1e-6, 1e-4
FACTOR = 0.3

# name -> (--mtp-depth-weights, w_k normalised by hand, extra flags, iterations already
# done before the step, the factor that step must train with)
CASES = {
    "linear": ("linear", (3 / 6, 2 / 6, 1 / 6), {}, 0, FACTOR),
    "exponential": ("exponential", (4 / 7, 2 / 7, 1 / 7), {}, 0, FACTOR),
    # warmup over 4 iterations: iteration 3 trains with 0.3 * 2 / 4
    "list_warmup": ("2,1,3", (2 / 6, 1 / 6, 3 / 6),
                    {"mtp_loss_scaling_factor_warmup_iters": 4}, 2, 0.15),
    # cosine from 0.3 to 0.1 over iterations 1..4: iteration 3 is half way, 0.2
    "linear_cosine": ("linear", (3 / 6, 2 / 6, 1 / 6),
                      {"mtp_loss_scaling_factor_final": 0.1,
                       "mtp_loss_scaling_factor_decay_style": "cosine",
                       "mtp_loss_scaling_factor_decay_iters": 4}, 2, 0.2),
    "exponential_per_token": ("exponential", (4 / 7, 2 / 7, 1 / 7),
                              {"calculate_per_token_loss": True}, 0, FACTOR),
}
# layout -> ((TP, PP, layers per virtual stage), cases)
LAYOUTS = {
    "tp2_pp2": ((2, 2, None), ["linear", "exponential", "list_warmup"]),
    "pp2_vpp2_dp2": ((1, 2, 1), ["exponential"]),
}


def _config(world_size, output_dir, name, tp=1, pp=1, vstage=None, weights=None):
    from tests.reference.harness import tiny_config

    text, _, extra, _, _ = CASES[name]
    return tiny_config(world_size, output_dir, mtp_num_layers=3, train_iters=5,
                       mtp_loss_scaling_factor=FACTOR, clip_grad=0.0,
                       mtp_depth_weights=weights or text,
                       tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                       num_layers_per_virtual_pipeline_stage=vstage, **extra)


def _band_error(mine, ref):
    """Largest |mine - ref| relative to the tolerance band (<= 1 passes), and where."""
    worst, where = 0.0, None
    for name, g in mine.items():
        r = ref[name] if ref[name] is not None else g * 0
        excess = ((g - r).abs() / (GRAD_ATOL + GRAD_RTOL * r.abs())).max().item()
        if excess > worst:
            worst, where = excess, name
    return worst, where


def _to_sharded_keys(trainer, grads_by_ref_name):
    """Reference gradients (state-dict names) keyed like megatron-core's sharded
    tensors: written into the single-rank model's main_grad, read back whole."""
    from mtp_megatron.model.weights import full_weights
    from mtp_megatron.runtime import mcore_compat

    gpt = trainer.model[0].module
    params = dict(gpt.named_parameters())
    by_ref_name = mcore_compat.mtp_layer_state_keys({n: n for n in params})
    for ref_name, param_name in by_ref_name.items():
        params[param_name].main_grad.copy_(grads_by_ref_name[ref_name])
    return {k: v.numpy() for k, v in full_weights(trainer.model, "main_grad").items()}


def _one_rank_case(name, output_dir):
    import dataclasses

    from mtp_megatron.model.weights import full_weights, load_full_weights
    from mtp_megatron.runtime import mcore_compat
    from tests.reference import gpt_mtp as ref
    from tests.reference.harness import (
        before_optimizer_step,
        finish,
        global_batch,
        make_trainer,
        perturb,
        reference_config,
    )

    _, weights, extra, done, factor = CASES[name]
    cfg = _config(1, output_dir, name)
    trainer = make_trainer(cfg)
    init = perturb(full_weights(trainer.model), seed=3)
    load_full_weights(trainer.model, init)
    trainer.state.iteration = done  # as if resumed: the schedule reads the iteration
    gpt = trainer.model[0].module
    grads = {}
    before_optimizer_step(trainer, lambda _: grads.update(mcore_compat.mtp_layer_state_keys(
        {n: p.main_grad.detach().clone() for n, p in gpt.named_parameters()})))
    leaves = ref.leaf_weights(mcore_compat.mtp_layer_state_keys(gpt.state_dict()))
    step = trainer.train_step()
    used_factor = trainer.tconfig.mtp_loss_scaling_factor

    batch = global_batch(trainer, 1)
    per_token = bool(extra.get("calculate_per_token_loss"))
    rescaled = mcore_compat.per_token_mtp_loss_rescaled()
    rcfg = reference_config(cfg, factor=factor, depth_weights=weights)

    def grad_of(config):
        return ref.gradients(leaves, ref.step_objective(leaves, config, batch, per_token,
                                                        rescaled))

    expected = grad_of(rcfg)
    outs = [ref.forward(leaves, rcfg, mb["tokens"], mb["labels"], mb["loss_mask"])
            for mb in batch]
    result = dict(
        grad=_band_error(grads, expected),
        grad_uniform=_band_error(grads, grad_of(dataclasses.replace(rcfg, depth_weights=()))),
        grad_peak=_band_error(grads, grad_of(dataclasses.replace(
            rcfg, mtp_loss_scaling_factor=FACTOR))) if factor != FACTOR else None,
        mtp=(step.mtp_losses, [sum(o["mtp"][k] for o in outs).item() / len(outs)
                               for k in range(3)]),
        factor=(step.mtp_factor, used_factor, step.iteration),
        max_grad=max(g.abs().max().item() for g in grads.values()),
        init={k: v.numpy() for k, v in init.items()},
        expected=_to_sharded_keys(trainer, expected),
        uniform=None,
    )
    result["uniform"] = _to_sharded_keys(
        trainer, grad_of(dataclasses.replace(rcfg, depth_weights=())))
    finish(trainer)
    return result


def _equal_weights_are_megatron_cores(output_dir):
    """'1,1,1' and the default train bit for bit alike: no stand-in is installed."""
    import torch

    from mtp_megatron.model.weights import full_weights, load_full_weights
    from mtp_megatron.training.losses import forward_step
    from tests.reference.harness import finish, make_trainer, perturb

    grads, plain = [], []
    for weights in ("uniform", "1,1,1"):
        trainer = make_trainer(_config(1, output_dir, "linear", weights=weights))
        load_full_weights(trainer.model, perturb(full_weights(trainer.model), seed=3))
        plain.append(trainer.mtp_weighting.forward_step is forward_step)
        trainer.train_step()
        grads.append(full_weights(trainer.model))  # weights after one Adam step
        finish(trainer)
    return plain, all(torch.equal(grads[0][k], grads[1][k]) for k in grads[0])


def _single_rank(rank, world_size, output_dir):
    out = {name: _one_rank_case(name, output_dir) for name in CASES}
    out["equal_weights"] = _equal_weights_are_megatron_cores(output_dir)
    return out


def _layouts(rank, world_size, baseline, output_dir):
    import torch

    from mtp_megatron.model.weights import compare_to_full, load_full_weights
    from tests.reference.harness import before_optimizer_step, finish, make_trainer

    def tensors(arrays):
        return {k: torch.from_numpy(v) for k, v in arrays.items()}

    out = {}
    for layout, ((tp, pp, vstage), names) in LAYOUTS.items():
        for name in names:
            base = baseline[name]
            expected, uniform = tensors(base["expected"]), tensors(base["uniform"])
            trainer = make_trainer(_config(world_size, output_dir, name, tp, pp, vstage))
            load_full_weights(trainer.model, tensors(base["init"]))
            trainer.state.iteration = CASES[name][3]
            seen = {}
            before_optimizer_step(trainer, lambda _: seen.update(  # noqa: B023 (in the loop)
                diff=compare_to_full(trainer.model, expected, "main_grad"),  # noqa: B023
                uniform=compare_to_full(trainer.model, uniform, "main_grad")))  # noqa: B023
            step = trainer.train_step()
            seen["factor"] = step.mtp_factor
            seen["mtp"] = step.mtp_losses
            out[(layout, name)] = seen
            finish(trainer)
            torch.distributed.barrier()
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("depth_weights"))
    baseline = spawn(1, _single_rank, out)[0]
    per_rank = spawn(4, _layouts, baseline, out)
    return baseline, per_rank


@pytest.mark.parametrize("name", list(CASES))
def test_gradient_is_that_of_the_weighted_objective(runs, name):
    r = runs[0][name]
    worst, where = r["grad"]
    assert worst <= 1.0, f"{where}: gradient differs from d(objective) by {worst:.2f} x tolerance"
    assert r["max_grad"] > 1e-3
    assert r["grad_uniform"][0] > 10.0, "the weights changed nothing"
    if r["grad_peak"] is not None:
        assert r["grad_peak"][0] > 10.0, "the schedule changed nothing"


@pytest.mark.parametrize("name", list(CASES))
def test_logged_mtp_losses_stay_unweighted_and_the_factor_is_the_schedules(runs, name):
    r = runs[0][name]
    logged, reference = r["mtp"]
    assert logged == pytest.approx(reference, abs=LOSS_TOL)
    factor, in_config, iteration = r["factor"]
    assert iteration == CASES[name][3] + 1
    assert factor == in_config == pytest.approx(CASES[name][4], abs=1e-15)


def test_equal_weights_are_megatron_cores_computation_bit_for_bit(runs):
    plain, identical = runs[0]["equal_weights"]
    assert plain == [True, True]  # the plain forward step: nothing replaced
    assert identical


@pytest.mark.parametrize("layout,name", [(layout, name) for layout, (_, names) in
                                         LAYOUTS.items() for name in names])
def test_every_layout_gets_the_reference_gradient(runs, layout, name):
    baseline, per_rank = runs
    expected = baseline[name]["expected"]
    seen = [rank[(layout, name)] for rank in per_rank]
    keys = {k for s in seen for k in s["diff"]}
    assert keys == set(expected)  # every parameter is held by some rank
    for s in seen:
        for key, diff in s["diff"].items():
            band = GRAD_ATOL + GRAD_RTOL * float(abs(expected[key]).max())
            assert diff <= band, f"{layout} {name} {key}: {diff:.2e} > {band:.2e}"
    far = max(v for s in seen for v in s["uniform"].values())
    assert far > 10 * GRAD_ATOL, "the weights changed nothing in this layout"
    logged = [s for s in seen if s["mtp"] is not None]
    assert logged and all(s["mtp"] == pytest.approx(baseline[name]["mtp"][1], abs=LOSS_TOL)
                          for s in logged)
    assert all(s["factor"] == pytest.approx(CASES[name][4], abs=1e-15) for s in seen)

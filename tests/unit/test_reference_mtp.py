"""megatron-core's GPT + MTP (through our Trainer) against the pure-PyTorch reference.

One spawned CPU rank runs one training step per case on a single-rank model whose
norm gains and biases were moved off their initial values, with a loss mask that has
holes, and compares what the training log shows (lm loss, each ``mtp_k loss``), the
objective, and the gradient that reached ``main_grad`` with ``tests/reference``.
"""

from __future__ import annotations

import pytest

from tests.dist_utils import spawn

pytestmark = pytest.mark.multirank

LOSS_TOL = 1e-5
GRAD_ATOL, GRAD_RTOL = 1e-6, 1e-4

# (D, tied embeddings, global batch, --calculate-per-token-loss)
ONE_MICROBATCH = [(d, tied, 2, False) for d in (1, 2, 3) for tied in (True, False)]
SCALING = [(2, True, 8, False), (2, False, 8, True)]


def _grad_error(mine, ref):
    """Largest |mine - ref| beyond the tolerance band, relative to GRAD_ATOL (<= 1 passes)."""
    worst, where = 0.0, None
    for name, g in mine.items():
        r = ref[name]
        if r is None:
            r = g * 0
        excess = ((g - r).abs() / (GRAD_ATOL + GRAD_RTOL * r.abs())).max().item()
        if excess > worst:
            worst, where = excess, name
    return worst, where


def _snapshot_grads(gpt, into):
    """main_grad by the reference's (megatron-core 0.16) parameter names."""
    from mtp_megatron.runtime import mcore_compat

    def snapshot(_iteration):
        into.update(mcore_compat.mtp_layer_state_keys(
            {n: p.main_grad.detach().clone() for n, p in gpt.named_parameters()}))
    return snapshot


def _case_id(case):
    return f"D{case[0]}_{'tied' if case[1] else 'untied'}"


def _run_cases(rank, world_size, cases, output_dir):
    import torch

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
        tiny_config,
    )

    results = []
    for depth, tied, gbs, per_token in cases:
        cfg = tiny_config(1, output_dir, mtp_num_layers=depth, global_batch_size=gbs,
                          untie_embeddings_and_output_weights=not tied,
                          calculate_per_token_loss=per_token, train_iters=1, clip_grad=0.0)
        trainer = make_trainer(cfg)
        load_full_weights(trainer.model, perturb(full_weights(trainer.model), seed=depth))
        gpt = trainer.model[0].module
        grads = {}
        before_optimizer_step(trainer, _snapshot_grads(gpt, grads))
        weights = ref.leaf_weights(mcore_compat.mtp_layer_state_keys(gpt.state_dict()))
        step = trainer.train_step()
        finish(trainer)

        rcfg = reference_config(cfg)
        batch = global_batch(trainer, 1)
        outs = [ref.forward(weights, rcfg, mb["tokens"], mb["labels"], mb["loss_mask"])
                for mb in batch]
        # What the log reports: token-weighted lm loss, per-depth mean over microbatches.
        lm = (sum(o["sums"][0] for o in outs) / sum(o["counts"][0] for o in outs)).item()
        mtp = [sum(o["mtp"][k] for o in outs).item() / len(outs) for k in range(depth)]
        factor = cfg.mtp.mtp_loss_scaling_factor / depth
        rescaled = mcore_compat.per_token_mtp_loss_rescaled()
        objective = ref.step_objective(weights, rcfg, batch, per_token, rescaled)
        ref_grads = ref.gradients(weights, objective)
        other = ref.gradients(weights, ref.step_objective(weights, rcfg, batch, not per_token,
                                                          rescaled))
        unchained = ref.ReferenceConfig(**{**rcfg.__dict__, "chain_normed_hidden": False})
        unchained = ref.gradients(weights, ref.step_objective(weights, unchained, batch,
                                                              per_token, rescaled))
        unrescaled = ref.gradients(weights, ref.step_objective(weights, rcfg, batch, per_token,
                                                               not rescaled))
        results.append(dict(
            case=(depth, tied, gbs, per_token),
            lm=(step.lm_loss, lm),
            mtp=(step.mtp_losses, mtp),
            objective=(step.lm_loss + factor * sum(step.mtp_losses), lm + factor * sum(mtp)),
            step_objective=objective.item(),
            grad=_grad_error(grads, ref_grads),
            grad_other_definition=_grad_error(grads, other),
            grad_unchained=_grad_error(grads, unchained),
            grad_other_rescale=_grad_error(grads, unrescaled),
            max_grad=max(g.abs().max().item() for g in grads.values()),
        ))
        torch.distributed.barrier()
    return results


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("reference"))
    return {r["case"]: r for r in spawn(1, _run_cases, ONE_MICROBATCH + SCALING, out)[0]}


@pytest.mark.parametrize("case", ONE_MICROBATCH, ids=_case_id)
def test_losses_and_objective_match_reference(results, case):
    r = results[case]
    (mine_lm, ref_lm), (mine_mtp, ref_mtp) = r["lm"], r["mtp"]
    assert mine_lm == pytest.approx(ref_lm, abs=LOSS_TOL)
    assert len(mine_mtp) == case[0]
    for k, (a, b) in enumerate(zip(mine_mtp, ref_mtp), start=1):
        assert a == pytest.approx(b, abs=LOSS_TOL), f"mtp_{k} loss"
    assert r["objective"][0] == pytest.approx(r["objective"][1], abs=LOSS_TOL)
    assert r["objective"][1] == pytest.approx(r["step_objective"], abs=LOSS_TOL)


@pytest.mark.parametrize("case", ONE_MICROBATCH, ids=_case_id)
def test_gradient_is_that_of_the_objective(results, case):
    worst, where = results[case]["grad"]
    assert worst <= 1.0, f"{where}: gradient differs from d(objective) by {worst:.2f} x tolerance"
    assert results[case]["max_grad"] > 1e-3  # a real gradient, not zeros on both sides


@pytest.mark.parametrize("case", SCALING, ids=["microbatches4", "microbatches4_per_token"])
def test_gradient_scaling_over_microbatches(results, case):
    """4 microbatches with different token counts: the gradient is that of the documented
    objective (docs/mtp-objective.md), and measurably not that of the other mode's."""
    r = results[case]
    worst, where = r["grad"]
    assert worst <= 1.0, f"{where}: gradient differs from d(objective) by {worst:.2f} x tolerance"
    assert r["grad_other_definition"][0] > 10.0
    if case[3]:  # per token: the installed release's rolled-token rule, not the other one
        assert r["grad_other_rescale"][0] > 10.0


@pytest.mark.parametrize("case", [c for c in ONE_MICROBATCH if c[0] > 1],
                         ids=_case_id)
def test_reference_is_sensitive_to_the_mtp_chain(results, case):
    """Chaining depth k's un-normed output into depth k+1 (the other reading of the
    report) gives a gradient far outside the tolerance: the match is not a coincidence."""
    assert results[case]["grad_unchained"][0] > 10.0


def test_reference_needs_no_megatron():
    import ast
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[1] / "reference" / "gpt_mtp.py"
    tree = ast.parse(root.read_text())
    imported = {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert not any(name.startswith("megatron") for name in imported)

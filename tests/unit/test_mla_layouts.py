"""Multi-latent attention + MoE + MTP layouts train the same model as one rank (CPU, gloo).

The MLA sibling of test_moe_layouts.py (same helpers, same checks): a DeepSeek-V3-shaped
tiny model (first layer dense, sigmoid router with expert bias, shared expert, one MTP
layer that is MLA + MoE like the last decoder layer) with multi-latent attention (query
latent, latent norms, YaRN). The single-rank run's perturbed weights are loaded into TP2
(sequence parallel: the latent projections split by columns), PP2 and EP2; over 4 steps
the logged losses, the step-1 gradients and the final weights equal the single-rank ones.
The single-rank run also shows the model learns (loss decreasing) and that ``--dry-run``
counts each rank's parameters exactly. Two spawns: 1 rank, then 2 ranks for all layouts.
"""

from __future__ import annotations

import math

import pytest

from tests.dist_utils import spawn
from tests.unit.test_moe_layouts import CASES as MOE_CASES
from tests.unit.test_moe_layouts import (
    GRAD_TOL,
    LOSS_TOL,
    STEPS,
    WEIGHT_TOL,
    _close,
    _held,
    _numpy,
    _train,
)
from tests.unit.test_reference_moe import MLA

pytestmark = pytest.mark.multirank

CASE = dict(MOE_CASES["dsv3"], **MLA)
LAYOUTS = {
    "tp2": dict(tensor_model_parallel_size=2, sequence_parallel=True),
    "pp2": dict(pipeline_model_parallel_size=2),
    "ep2": dict(expert_model_parallel_size=2),
}


def _config(world_size, output_dir, **parallel):
    from tests.reference.harness import tiny_config

    return tiny_config(world_size, output_dir, train_iters=STEPS, micro_batch_size=1,
                       global_batch_size=4, **dict(CASE, **parallel))


def _single_rank(rank, world_size, output_dir):
    from mtp_megatron.model.weights import full_weights, load_full_weights
    from tests.reference.harness import finish, make_trainer, perturb

    trainer = make_trainer(_config(1, output_dir))
    init = perturb(full_weights(trainer.model), seed=7)
    load_full_weights(trainer.model, init)
    trainer.optimizer.reload_model_params()
    grads = {}
    logs = _train(trainer, lambda: grads.update(full_weights(trainer.model, "main_grad")))
    out = dict(init=_numpy(init), grads=_numpy(grads), logs=logs, held=_held(trainer),
               final=_numpy(full_weights(trainer.model)),
               mtp_attention=[n for n, _ in trainer.model[0].named_parameters()
                              if ".mtp." in n and "self_attention" in n])
    finish(trainer)
    return out


def _layouts(rank, world_size, baseline, output_dir):
    import torch

    from mtp_megatron.model.weights import compare_to_full, load_full_weights
    from tests.reference.harness import finish, make_trainer

    def tensors(arrays):
        return {k: torch.from_numpy(v) for k, v in arrays.items()}

    out = {}
    for name, parallel in LAYOUTS.items():
        trainer = make_trainer(_config(world_size, output_dir, **parallel))
        load_full_weights(trainer.model, tensors(baseline["init"]))
        trainer.optimizer.reload_model_params()
        grads = {}
        logs = _train(trainer, lambda: grads.update(  # noqa: B023 (called in the loop)
            compare_to_full(trainer.model, tensors(baseline["grads"]), "main_grad")))  # noqa: B023
        out[name] = dict(logs=logs, grads=grads, held=_held(trainer),
                         weights=compare_to_full(trainer.model, tensors(baseline["final"])))
        finish(trainer)
        torch.distributed.barrier()
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("mla_layouts"))
    baseline = spawn(1, _single_rank, out)[0]
    return baseline, spawn(2, _layouts, baseline, out)


def test_the_single_rank_mla_model_learns_and_its_mtp_layer_is_mla(runs):
    baseline, _ = runs
    lm = [log[0] for log in baseline["logs"]]
    assert all(math.isfinite(x) for x in lm) and lm[-1] < lm[0] - 0.05, lm
    assert all(math.isfinite(x) for log in baseline["logs"] for x in log[1])
    kinds = {n.split("self_attention.")[1].split(".")[0] for n in baseline["mtp_attention"]}
    assert kinds == {"linear_q_down_proj", "linear_q_up_proj", "q_layernorm",
                     "linear_kv_down_proj", "kv_layernorm", "linear_kv_up_proj",
                     "linear_proj"}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_losses_gradients_and_weights_match_single_rank(runs, name):
    baseline, per_rank = runs
    seen = [r[name] for r in per_rank]
    expected = baseline["logs"]
    lm_ranks = [s["logs"] for s in seen if s["logs"][0][0] is not None]
    mtp_ranks = [s["logs"] for s in seen if s["logs"][0][1] is not None]
    assert lm_ranks and mtp_ranks
    for log in lm_ranks:
        for step, (got, ref) in enumerate(zip(log, expected), 1):
            assert _close(got[0], ref[0], LOSS_TOL), f"{name} step {step} lm loss"
            assert _close(got[2], ref[2], LOSS_TOL * 10), f"{name} step {step} grad norm"
    for log in mtp_ranks:
        for step, (got, ref) in enumerate(zip(log, expected), 1):
            assert got[1] == pytest.approx(ref[1], abs=LOSS_TOL), f"{name} step {step} mtp"
    mla = [k for s in seen for k in s["weights"] if "linear_kv_down_proj" in k]
    assert mla, "no MLA weights compared"
    for key, tol in (("grads", GRAD_TOL), ("weights", WEIGHT_TOL)):
        worst = max(v for s in seen for v in s[key].values())
        assert worst <= tol, f"{name}: {key} differ by {worst:.2e}"


@pytest.mark.parametrize("name", [None, *LAYOUTS])
def test_the_plan_counts_each_ranks_mla_parameters(runs, name):
    from mtp_megatron.plan import build_plan

    baseline, per_rank = runs
    held = [baseline["held"]] if name is None else [r[name]["held"] for r in per_rank]
    plan = build_plan(_config(len(held), "unused", **LAYOUTS.get(name, {})))
    for rank, got in enumerate(held):
        assert got["params"] == plan.stages[got["pp"]].rank_params["total"], (rank, got)

"""MoE + MTP layouts train the same model the same way as one rank (CPU, gloo).

The sibling of test_layout_equivalence.py for Mixture of Experts: the single-rank
model's (perturbed) weights, expert bias included, are loaded into each layout through
megatron-core's sharded-tensor offsets (experts by their global index); all layouts read
the same global batch (4 micro-batches of 1 sequence, loss mask with holes). Over 4
optimizer steps of our Trainer:

* the logged lm loss, every ``mtp_k loss``, the grad norm and the MoE log (balancing
  loss, tokens per expert per layer, expert-bias range) equal the single-rank values,
* the step-1 gradients (``main_grad``) equal the single-rank ones,
* the weights and expert biases after 4 steps agree.

Two model cases: ``dsv3`` (DeepSeek-V3 shape: first layer dense, sigmoid router with
aux-loss-free expert bias, group-limited routing, a shared expert, sequence aux loss,
alltoall dispatcher, one MTP layer that is itself MoE) and ``softmax`` (softmax top-2 with
the micro-batch aux loss, allgather dispatcher, all layers MoE, two MTP layers). ``bf16``
is the dsv3 case in bf16, compared with the single-rank bf16 run within bf16 tolerances.
"""

from __future__ import annotations

import pytest

from tests.dist_utils import spawn

pytestmark = pytest.mark.multirank

LOSS_TOL = 1e-5
GRAD_TOL = 1e-6
WEIGHT_TOL = 1e-4
BF16_LOSS_TOL = 2e-2  # bf16 weights and activations; fp32 gradients and master weights
BF16_WEIGHT_TOL = 1e-2
STEPS = 4

MOE = dict(num_experts=4, moe_router_topk=2, moe_ffn_hidden_size=16)
CASES = {
    "dsv3": dict(MOE, moe_layer_freq="[0]*1+[1]*3", moe_shared_expert_intermediate_size=16,
                 moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
                 moe_router_bias_update_rate=1e-2, moe_router_num_groups=2,
                 moe_router_group_topk=1, moe_router_topk_scaling_factor=2.0,
                 moe_router_load_balancing_type="seq_aux_loss", moe_aux_loss_coeff=1e-2,
                 moe_token_dispatcher_type="alltoall", mtp_num_layers=1),
    "softmax": dict(MOE, moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=1e-2,
                    moe_token_dispatcher_type="allgather", mtp_num_layers=2),
}
CASES["bf16"] = dict(CASES["dsv3"], bf16=True, use_distributed_optimizer=True)
# name -> (parallel flags, world size), and the cases it runs
LAYOUTS = {
    "ep2": ((dict(expert_model_parallel_size=2), 2), ["dsv3", "softmax"]),
    "ep2_distopt": ((dict(expert_model_parallel_size=2, use_distributed_optimizer=True), 2),
                    ["dsv3"]),
    "ep2_bf16_distopt": ((dict(expert_model_parallel_size=2), 2), ["bf16"]),
    "tp2_ep2": ((dict(tensor_model_parallel_size=2, sequence_parallel=True,
                      expert_model_parallel_size=2, expert_tensor_parallel_size=1), 4),
                ["dsv3"]),
    "tp2_etp2_ep2": ((dict(tensor_model_parallel_size=2, sequence_parallel=True,
                           expert_model_parallel_size=2), 4), ["softmax"]),
    "pp2_ep2": ((dict(pipeline_model_parallel_size=2, expert_model_parallel_size=2), 4),
                ["dsv3", "softmax"]),
    "pp2_vpp2_ep2": ((dict(pipeline_model_parallel_size=2, expert_model_parallel_size=2,
                           num_layers_per_virtual_pipeline_stage=1), 4), ["dsv3"]),
}


def _config(world_size, output_dir, case, **parallel):
    from tests.reference.harness import tiny_config

    return tiny_config(world_size, output_dir, train_iters=STEPS, micro_batch_size=1,
                       global_batch_size=4, **dict(CASES[case], **parallel))


def _train(trainer, on_first_step):
    from tests.reference.harness import before_optimizer_step

    before_optimizer_step(trainer, lambda it: on_first_step() if it == 1 else None)
    for chunk in trainer.model:
        chunk.train()
    return [(s.lm_loss, s.mtp_losses, s.grad_norm, s.moe) for s in
            (trainer.train_step() for _ in range(STEPS))]


def _numpy(tensors):
    return {k: v.numpy() for k, v in tensors.items()}


def _single_rank(rank, world_size, output_dir):
    from mtp_megatron.model.weights import full_weights, load_full_weights
    from tests.reference.harness import finish, make_trainer, perturb

    out = {}
    for case in CASES:
        trainer = make_trainer(_config(1, output_dir, case))
        init = perturb(full_weights(trainer.model), seed=7)
        load_full_weights(trainer.model, init)
        trainer.optimizer.reload_model_params()  # bf16: the fp32 main weights too
        grads = {}
        logs = _train(trainer, lambda: grads.update(full_weights(trainer.model, "main_grad")))  # noqa: B023
        out[case] = dict(init=_numpy(init), grads=_numpy(grads), logs=logs,
                         final=_numpy(full_weights(trainer.model)))
        finish(trainer)
    return out


def _held(trainer):
    """What this rank holds and where megatron-core put it (for the planner's check)."""
    from megatron.core import parallel_state as ps

    return dict(params=sum(p.numel() for c in trainer.model for p in c.parameters()),
                pp=ps.get_pipeline_model_parallel_rank(),
                ep=ps.get_expert_model_parallel_rank(),
                etp=ps.get_expert_tensor_parallel_rank(),
                edp=ps.get_expert_data_parallel_rank())


def _layouts(rank, world_size, names, baseline, output_dir):
    import torch

    from mtp_megatron.model.weights import compare_to_full, load_full_weights
    from tests.reference.harness import finish, make_trainer

    def tensors(arrays):
        return {k: torch.from_numpy(v) for k, v in arrays.items()}

    out = {}
    for name in names:
        (parallel, _), cases = LAYOUTS[name]
        for case in cases:
            ref = baseline[case]
            trainer = make_trainer(_config(world_size, output_dir, case, **parallel))
            load_full_weights(trainer.model, tensors(ref["init"]))
            trainer.optimizer.reload_model_params()
            grads = {}
            logs = _train(trainer, lambda: grads.update(  # noqa: B023 (called in the loop)
                compare_to_full(trainer.model, tensors(ref["grads"]), "main_grad")))  # noqa: B023
            weights = compare_to_full(trainer.model, tensors(ref["final"]))
            out[(name, case)] = dict(logs=logs, grads=grads, weights=weights,
                                     held=_held(trainer))
            finish(trainer)
            torch.distributed.barrier()
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The single-rank baselines, then all 2-rank and all 4-rank layouts (3 spawns)."""
    out = str(tmp_path_factory.mktemp("moe_layouts"))
    baseline = spawn(1, _single_rank, out)[0]
    per_rank = {name: [] for name in LAYOUTS}
    for world in (2, 4):
        names = [n for n, ((_, size), _) in LAYOUTS.items() if size == world]
        for rank_result in spawn(world, _layouts, names, baseline, out):
            for (name, case), seen in rank_result.items():
                per_rank[name].append((case, seen))
    return baseline, per_rank


def _close(a, b, tol):
    return a == pytest.approx(b, abs=tol, rel=tol)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_logged_losses_and_moe_stats_match_single_rank(runs, name):
    baseline, per_rank = runs
    for case in LAYOUTS[name][1]:
        tol = BF16_LOSS_TOL if case == "bf16" else LOSS_TOL
        expected = baseline[case]["logs"]
        seen = [s["logs"] for c, s in per_rank[name] if c == case]
        lm_ranks = [log for log in seen if log[0][0] is not None]
        mtp_ranks = [log for log in seen if log[0][1] is not None]
        assert lm_ranks and mtp_ranks, f"{name} {case}: no rank logged the losses"
        for log in seen:  # every rank: the MoE summary is reduced over the world
            for step, (got, ref) in enumerate(zip(log, expected), 1):
                assert got[3].keys() == ref[3].keys()
                for key, value in ref[3].items():
                    if case == "bf16" and key != "load balancing loss":
                        continue  # bf16 scores tie and flip choices: routing is not exact
                    assert _close(got[3][key], value, tol), \
                        f"{name} {case} step {step} {key}: {got[3][key]} vs {value}"
        for log in lm_ranks:
            for step, (got, ref) in enumerate(zip(log, expected), 1):
                assert _close(got[0], ref[0], tol), f"{name} {case} step {step} lm loss"
                assert _close(got[2], ref[2], tol * 10), f"{name} {case} step {step} grad norm"
        for log in mtp_ranks:
            for step, (got, ref) in enumerate(zip(log, expected), 1):
                assert len(got[1]) == CASES[case]["mtp_num_layers"]
                assert got[1] == pytest.approx(ref[1], abs=tol), f"{name} {case} step {step}"


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_gradients_and_weights_match_single_rank(runs, name):
    """Step-1 gradients (not with the distributed optimizer, whose ``main_grad`` holds the
    reduced values of this rank's shard only) and the weights after the last step,
    expert biases included."""
    _, per_rank = runs
    (parallel, _), cases = LAYOUTS[name]
    for case in cases:
        seen = [s for c, s in per_rank[name] if c == case]
        experts = [k for s in seen for k in s["weights"] if ".mlp.experts.experts." in k]
        assert experts, f"{name} {case}: no expert weights compared"
        checks = {"weights": BF16_WEIGHT_TOL if case == "bf16" else WEIGHT_TOL}
        if not (parallel.get("use_distributed_optimizer") or CASES[case].get(
                "use_distributed_optimizer")):
            checks["grads"] = GRAD_TOL
        for key, tol in checks.items():
            worst = max(v for s in seen for k, v in s[key].items()
                        if case != "bf16" or not k.endswith("expert_bias"))
            assert worst <= tol, f"{name} {case}: {key} differ by {worst:.2e}"
        if case == "bf16":  # a flipped bf16 routing choice moves a bias by +-rate instead
            worst = max(v for s in seen for k, v in s["weights"].items()
                        if k.endswith("expert_bias"))
            assert worst <= 2 * CASES[case]["moe_router_bias_update_rate"] + 1e-6, worst
        assert any("expert_bias" in k for s in seen for k in s["weights"]) == (case != "softmax")


def test_the_baselines_route_and_balance(runs):
    """The comparisons are between runs that move: experts get different loads, the
    expert bias moves, the balancing loss is positive, weights change."""
    baseline, _ = runs
    for case in CASES:
        logs = baseline[case]["logs"]
        moe = logs[-1][3]
        assert moe["load balancing loss"] > 0.5
        assert moe["expert load max/mean"] > 1.0
        per_layer = {k: v for k, v in moe.items() if "tokens/expert" in k}
        layers = 3 if case != "softmax" else 4
        mtp = CASES[case]["mtp_num_layers"]
        assert len(per_layer) == 2 * (layers + mtp)  # min and max per MoE layer, MTP too
        assert any(k.startswith("moe mtp_1 ") for k in per_layer)
        init, final = baseline[case]["init"], baseline[case]["final"]
        moved = max(float(abs(final[k] - v).max()) for k, v in init.items())
        assert moved > 10 * WEIGHT_TOL
    dsv3 = baseline["dsv3"]
    bias = [k for k in dsv3["final"] if k.endswith("expert_bias")]
    assert len(bias) == 3 + 1  # three MoE decoder layers and the MTP layer
    # each step moves every bias by +-rate (1e-2) or 0; the log shows the last step's range
    ranges = [(log[3]["expert bias min"], log[3]["expert bias max"]) for log in dsv3["logs"]]
    assert len(set(ranges)) > 1, ranges
    final = [dsv3["final"][k] for k in bias]
    assert ranges[-1] == pytest.approx((min(b.min() for b in final), max(b.max() for b in final)))
    moved = max(abs(dsv3["final"][k] - dsv3["init"][k]).max() for k in bias)
    assert 0.005 < moved <= 0.01 * STEPS + 1e-6


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_the_plan_predicts_each_ranks_parameters_and_expert_place(runs, name):
    """--dry-run's per-rank parameters (routed experts split over ETP x EP) and its rank
    grid (etp-ep-edp inside each stage) against the built models."""
    from mtp_megatron.plan import build_plan
    from mtp_megatron.plan.layout import expert_coord_of

    _, per_rank = runs
    (parallel, world), cases = LAYOUTS[name]
    for case in cases:
        plan = build_plan(_config(world, "unused", case, **parallel))
        held = [s["held"] for c, s in per_rank[name] if c == case]
        assert len(held) == world
        for rank, got in enumerate(held):
            assert got["params"] == plan.stages[got["pp"]].rank_params["total"], (rank, got)
            assert (got["etp"], got["ep"], got["edp"]) == expert_coord_of(plan.cfg, rank)

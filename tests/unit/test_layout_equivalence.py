"""Every parallel layout trains the same model the same way as one rank (CPU, gloo).

The single-rank model's (perturbed) weights are loaded into each layout through
megatron-core's sharded-tensor offsets (``mtp_megatron.model.weights``); all layouts
read the same global batch, whose loss mask has holes. Over 5 optimizer steps of our
Trainer (4 microbatches per step with DP=1, 2 per rank with DP=2, Adam, clipping, weight decay):

* the logged lm loss and every ``mtp_k loss`` equal the single-rank values (1e-5),
* the step-1 gradients in ``main_grad`` equal the single-rank ones, in particular the
  word embedding shared by the input, the output head and the MTP stage (whose copy
  sits on the last pipeline stage when PP > 1),
* the weights after 5 steps agree within 1e-4.

The single-rank run itself is checked against the pure-PyTorch reference in
test_reference_mtp.py. TP2 x PP2 x DP2 needs 8 ranks and is left out (at most 4 here).
"""

from __future__ import annotations

import pytest

from tests.dist_utils import spawn

pytestmark = [pytest.mark.multirank, pytest.mark.compat]  # also on the 0.16.1 floor

LOSS_TOL = 1e-5
GRAD_TOL = 1e-6
WEIGHT_TOL = 1e-4
STEPS = 5
EMBEDDING = "embedding.word_embeddings.weight"

# (depth D, tied embeddings); every parallel dimension sees D=1 and D=2 somewhere.
D1, D2, D2_UNTIED = (1, True), (2, True), (2, False)
# name -> (TP, PP, layers per virtual stage, world size), and the cases it runs
LAYOUTS = {
    "tp2": ((2, 1, None, 2), [D1, D2]),
    "pp2": ((1, 2, None, 2), [D2, D2_UNTIED]),
    "dp2": ((1, 1, None, 2), [D1]),
    "pp2_vpp2": ((1, 2, 1, 2), [D2]),
    "tp2_pp2": ((2, 2, None, 4), [D2, D2_UNTIED]),
    "tp2_dp2": ((2, 1, None, 4), [D1]),
    "pp2_dp2": ((1, 2, None, 4), [D2]),
    "pp2_vpp2_dp2": ((1, 2, 1, 4), [D1]),
}
ALL_CASES = [D1, D2, D2_UNTIED]


def _config(world_size, output_dir, case, tp=1, pp=1, vstage=None):
    from tests.reference.harness import tiny_config

    depth, tied = case
    return tiny_config(
        world_size, output_dir, mtp_num_layers=depth,
        untie_embeddings_and_output_weights=not tied, train_iters=STEPS,
        micro_batch_size=1, global_batch_size=4,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        num_layers_per_virtual_pipeline_stage=vstage,
    )


def _train(trainer, on_first_step):
    """5 steps; ``on_first_step()`` runs with step 1's finalized gradients, before the
    optimizer uses them (it is called within the caller's loop iteration)."""
    from tests.reference.harness import before_optimizer_step

    before_optimizer_step(trainer, lambda it: on_first_step() if it == 1 else None)
    for chunk in trainer.model:
        chunk.train()
    return [(s.lm_loss, s.mtp_losses, s.grad_norm) for s in
            (trainer.train_step() for _ in range(STEPS))]


def _single_rank(rank, world_size, output_dir):
    """Initial weights, step-1 gradients, per-step logs and final weights of TP=PP=DP=1."""
    from mtp_megatron.model.weights import full_weights, load_full_weights
    from tests.reference.harness import finish, make_trainer, perturb

    out = {}
    for case in ALL_CASES:
        trainer = make_trainer(_config(1, output_dir, case))
        init = perturb(full_weights(trainer.model), seed=case[0])
        load_full_weights(trainer.model, init)
        grads = {}
        logs = _train(trainer, lambda: grads.update(full_weights(trainer.model, "main_grad")))  # noqa: B023
        final = full_weights(trainer.model)
        out[case] = dict(init=_numpy(init), grads=_numpy(grads), logs=logs, final=_numpy(final))
        finish(trainer)
    return out


def _numpy(tensors):
    """Plain arrays: tensors sent through a queue would be shared memory that dies with
    the rank that made them."""
    return {k: v.numpy() for k, v in tensors.items()}


def _tensors(arrays):
    import torch

    return {k: torch.from_numpy(v) for k, v in arrays.items()}


def _layouts(rank, world_size, names, baseline, output_dir):
    """Each named layout from the single-rank weights; returns what each rank saw."""
    import time

    import torch

    from mtp_megatron.model.weights import compare_to_full, load_full_weights
    from tests.reference.harness import finish, make_trainer

    out = {}
    for name in names:
        (tp, pp, vstage, _), cases = LAYOUTS[name]
        for case in cases:
            start = time.perf_counter()
            ref = {k: _tensors(v) if isinstance(v, dict) else v for k, v in baseline[case].items()}
            trainer = make_trainer(_config(world_size, output_dir, case, tp, pp, vstage))
            load_full_weights(trainer.model, ref["init"])
            grads = {}
            logs = _train(trainer, lambda: grads.update(  # noqa: B023 (called inside the loop)
                compare_to_full(trainer.model, ref["grads"], "main_grad")))  # noqa: B023
            weights = compare_to_full(trainer.model, ref["final"])
            out[(name, case)] = dict(logs=logs, grads=grads, weights=weights,
                                     seconds=time.perf_counter() - start)
            finish(trainer)
            torch.distributed.barrier()
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The single-rank baseline, then all 2-rank and all 4-rank layouts (3 spawns)."""
    out = str(tmp_path_factory.mktemp("layouts"))
    baseline = spawn(1, _single_rank, out)[0]
    per_rank = {}
    for world in (2, 4):
        names = [n for n, (layout, _) in LAYOUTS.items() if layout[3] == world]
        per_rank.update({n: [] for n in names})
        for rank_result in spawn(world, _layouts, names, baseline, out):
            for (name, case), seen in rank_result.items():
                per_rank[name].append((case, seen))
    return baseline, per_rank


def _largest(per_rank, key):
    return max((v for _, seen in per_rank for v in seen[key].values()), default=0.0)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_logged_losses_match_single_rank(runs, name):
    baseline, per_rank = runs
    for case in LAYOUTS[name][1]:
        expected = baseline[case]["logs"]
        seen = [s["logs"] for c, s in per_rank[name] if c == case]
        lm_ranks = [log for log in seen if log[0][0] is not None]
        mtp_ranks = [log for log in seen if log[0][1] is not None]
        assert lm_ranks and mtp_ranks, f"{name} {case}: no rank logged the losses"
        for log in lm_ranks:
            for step, ((lm, _, norm), (lm_ref, _, norm_ref)) in enumerate(zip(log, expected), 1):
                assert lm == pytest.approx(lm_ref, abs=LOSS_TOL), f"{name} {case} step {step} lm"
                assert norm == pytest.approx(norm_ref, rel=1e-5), f"{name} {case} grad norm"
        for log in mtp_ranks:
            for step, ((_, mtp, _), (_, mtp_ref, _)) in enumerate(zip(log, expected), 1):
                assert len(mtp) == case[0]
                assert mtp == pytest.approx(mtp_ref, abs=LOSS_TOL), f"{name} {case} step {step}"


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_gradients_match_single_rank(runs, name):
    _, per_rank = runs
    for case in LAYOUTS[name][1]:
        seen = [s for c, s in per_rank[name] if c == case]
        embedding = [s["grads"][EMBEDDING] for s in seen if EMBEDDING in s["grads"]]
        first_and_last = 2 if LAYOUTS[name][0][1] > 1 else 1  # PP>1: the MTP stage's copy
        assert len(embedding) >= first_and_last * LAYOUTS[name][0][0]
        assert max(embedding) <= GRAD_TOL, f"{name} {case}: shared embedding gradient"
        worst = _largest([(case, s) for s in seen], "grads")
        assert worst <= GRAD_TOL, f"{name} {case}: gradients differ by {worst:.2e}"


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_weights_after_five_steps_match_single_rank(runs, name):
    _, per_rank = runs
    for case in LAYOUTS[name][1]:
        seen = [(case, s) for c, s in per_rank[name] if c == case]
        worst = _largest(seen, "weights")
        assert worst <= WEIGHT_TOL, f"{name} {case}: weights differ by {worst:.2e}"


def test_the_baseline_trains(runs):
    """The comparisons above are between runs that move: the weights change by far more
    than the tolerance, and the gradients are not zero."""
    baseline, _ = runs
    for case in ALL_CASES:
        assert max(float(abs(g).max()) for g in baseline[case]["grads"].values()) > 1e-3
        moved = max(float(abs(baseline[case]["final"][k] - v).max())
                    for k, v in baseline[case]["init"].items())
        assert moved > 10 * WEIGHT_TOL  # Adam: about lr = 1e-3 per step


def test_builder_uses_separate_p2p_ops_with_virtual_pipeline(tmp_path):
    """With PP=2 and VPP, batched p2p swaps activations and gradients (see
    model/builder.py:_p2p_settings): the built config must not batch them."""
    from mtp_megatron.model.builder import transformer_config
    from tests.reference.harness import tiny_config

    cfg = tiny_config(2, str(tmp_path), mtp_num_layers=1, pipeline_model_parallel_size=2,
                      num_layers_per_virtual_pipeline_stage=1, micro_batch_size=1,
                      global_batch_size=4)
    tconfig = transformer_config(cfg, on_cpu=True)
    assert tconfig.overlap_p2p_comm and not tconfig.batch_p2p_comm

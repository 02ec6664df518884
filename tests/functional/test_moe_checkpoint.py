"""MoE checkpoints: save -> resume bit-exact with EP2 (bf16 + distributed optimizer, and
fp32), the aux-loss-free expert bias restored, and an EP2 checkpoint loaded into EP1.

One 2-rank spawn runs the resume cases with the real Trainer (``resume_matrix``: train 4
steps saving at 2, resume from 2, every logged value and the final weights equal) and the
expert-bias probe; one 1-rank spawn loads both EP2 checkpoints into EP1 and trains on.
"""

import os

import pytest

from tests.dist_utils import spawn
from tests.functional import resume_matrix as rm

pytestmark = pytest.mark.functional

DSV3 = dict(num_experts=4, moe_router_topk=2, moe_ffn_hidden_size=16,
            moe_layer_freq="[0]*1+[1]*1", moe_shared_expert_intermediate_size=16,
            moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
            moe_router_load_balancing_type="seq_aux_loss", moe_aux_loss_coeff=1e-2,
            moe_token_dispatcher_type="alltoall", mtp_num_layers=1)
SOFTMAX = dict(num_experts=4, moe_router_topk=2, moe_ffn_hidden_size=16,
               moe_aux_loss_coeff=1e-2, mtp_num_layers=1)
CASES = {
    "ep2_dsv3_bf16_distopt": dict(rm.TINY, **DSV3, bf16=True, use_distributed_optimizer=True),
    "ep2_softmax_fp32": dict(rm.TINY, **SOFTMAX),
}
EP2 = {"expert_model_parallel_size": 2}


def _expert_biases(trainer):
    return {f"{i}.{name}": buf.detach().clone() for i, chunk in enumerate(trainer.model)
            for name, buf in chunk.named_buffers() if name.endswith("expert_bias")}


def probe_expert_bias(session, root, results):
    """Expert biases after a save equal the ones a fresh Trainer loads back."""
    ck = os.path.join(root, "bias", "ck")
    cli = dict(CASES["ep2_dsv3_bf16_distopt"], **EP2, train_iters=2, save=ck,
               output_dir=os.path.join(root, "bias", "a"))
    saved, _ = session.run(None, cli)
    before = _expert_biases(saved)
    loaded = session.trainer(None, dict(cli, save=None, load=ck,
                                        output_dir=os.path.join(root, "bias", "b")))
    after = _expert_biases(loaded)
    return {"count": len(before), "moved": max(float(b.abs().max()) for b in before.values()),
            "equal": before.keys() == after.keys() and all(
                before[k].equal(after[k]) for k in before)}


def _load_into_ep1(rank, world_size, root, checkpoints):
    """Each EP2 checkpoint (iteration 2) into one rank (EP1): the expert biases it holds
    and the losses of the two steps it trains on."""
    session = rm.Session(world_size)
    out = {}
    for name, ck in checkpoints.items():
        cli = dict(CASES[name], train_iters=rm.ITERS, load=ck,
                   output_dir=os.path.join(root, "ep1", name))
        trainer = session.trainer(None, cli)
        biases = {k: v.numpy() for k, v in _expert_biases(trainer).items()}
        states = [s for sub in getattr(trainer.optimizer, "chained_optimizers",
                                       [trainer.optimizer]) for s in sub.optimizer.state.values()]
        moments = sum(float(s["exp_avg_sq"].abs().sum()) for s in states if "exp_avg_sq" in s)
        history = []
        trainer.train(on_step=history.append)
        trainer.metrics.close()
        out[name] = {"iteration_loaded": history[0].iteration - 1, "biases": biases,
                     "moments": moments, "losses": {s.iteration: s.lm_loss for s in history}}
    return out


@pytest.fixture(scope="module")
def ep2(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("moe_ep2"))
    cases = [(name, None, dict(cli, **EP2)) for name, cli in CASES.items()]
    return root, spawn(2, rm.run_cases, cases, root, [("bias", probe_expert_bias)])


@pytest.fixture(scope="module")
def ep1(ep2):
    root, per_rank = ep2
    checkpoints = {name: per_rank[0][name].checkpoint for name in CASES}
    return spawn(1, _load_into_ep1, root, checkpoints)[0]


@pytest.mark.parametrize("name", list(CASES))
def test_ep2_resume_is_bit_exact(ep2, name):
    _, per_rank = ep2
    for rank, results in enumerate(per_rank):
        r = results[name]
        assert r.resumed_iterations == list(range(rm.ITERS // 2 + 1, rm.ITERS + 1)), (rank, r)
        assert r.mismatches == [], (rank, name, r.mismatches)
        assert r.weights_equal and r.weights_compared >= 20, (rank, name, r)
    assert all(v is not None for v in per_rank[-1][name].losses.values())


def test_expert_bias_survives_the_checkpoint(ep2):
    _, per_rank = ep2
    for rank in per_rank:
        bias = rank["bias"]
        assert bias["count"] == 2, bias  # the MoE decoder layer and the MTP layer
        assert bias["moved"] > 0 and bias["equal"], bias


@pytest.mark.parametrize("name", list(CASES))
def test_an_ep2_checkpoint_loads_into_ep1_and_trains_on(ep2, ep1, name):
    _, per_rank = ep2
    got, expected = ep1[name], per_rank[-1][name].losses
    assert got["iteration_loaded"] == rm.ITERS // 2
    assert got["moments"] > 0  # Adam state came from the checkpoint (fresh: zeros)
    tol = 2e-2 if "bf16" in name else 1e-5
    for it, loss in got["losses"].items():
        assert abs(loss - expected[it]) < tol, (name, it, loss, expected[it])
    if "dsv3" in name:
        assert len(got["biases"]) == 2 and any(abs(b).max() > 0 for b in got["biases"].values())

"""The flags real jobs use, saved and resumed: precision x optimizer x layout, bit-exact.

Two spawned process groups (DP2, then TP2xPP2) run every case with the real Trainer:
``ITERS`` steps saving half way, then a fresh Trainer resumes from the half-way
checkpoint; every logged value of the resumed steps must equal the straight run's and
the final weights must be ``torch.equal``. The shipped examples/*.yaml run the same
way in a CPU-sized form (their flags, smaller shapes). Then, in the same process
groups: a bf16 distributed-optimizer checkpoint resharded DP2 -> TP2xPP2, and resumes
with changed settings (issue 11 items 1, 2 and 5).
"""

import os

import pytest

from tests.dist_utils import spawn
from tests.functional import resume_matrix as rm

pytestmark = [pytest.mark.functional, pytest.mark.compat]  # also on the 0.16.1 floor

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLES = os.path.join(ROOT, "examples")
PRECISIONS = {"fp32": {}, "bf16": {"bf16": True}, "fp16": {"fp16": True}}
OPTIMIZERS = {"plain": {}, "distopt": {"use_distributed_optimizer": True}}
TP2PP2 = {"tensor_model_parallel_size": 2, "pipeline_model_parallel_size": 2}
MATRIX = [f"{p}_{o}" for p in PRECISIONS for o in OPTIMIZERS]


def _matrix(extra):
    return [(f"{p}_{o}", None, dict(rm.TINY, mtp_num_layers=2, **PRECISIONS[p],
                                    **OPTIMIZERS[o], **extra))
            for p in PRECISIONS for o in OPTIMIZERS]


def _example(name):
    return (f"example_{name}", os.path.join(EXAMPLES, f"{name}.yaml"), dict(rm.CPU_SIZED))


# --- probes: run inside the spawned ranks after the cases -----------------------------

def _expect_error(session, cli):
    from mtp_megatron.checkpoint import CheckpointError

    try:
        session.trainer(None, cli)
    except CheckpointError as err:
        return str(err)
    return None


def _main_params_match_model(trainer) -> bool:
    """True if the optimizer's main weights are the model's (copying them back is a no-op)."""
    before = [p.detach().clone() for c in trainer.model for p in c.parameters()]
    for sub in trainer.optimizer.chained_optimizers:
        sub._copy_main_params_to_model_params()
    after = [p.detach() for c in trainer.model for p in c.parameters()]
    return len(before) > 10 and all(a.equal(b) for a, b in zip(before, after))


def probe_changed_settings(session, root, results):
    """Item 5: a resume that changes a shape or the optimizer's format."""
    # one step after the checkpoint: a shorter run than the one saved, whose LR schedule
    # (--lr-decay-iters = --train-iters) is kept
    base = dict(rm.TINY, mtp_num_layers=2, train_iters=rm.ITERS // 2 + 1,
                use_checkpoint_opt_param_scheduler=True,
                output_dir=os.path.join(root, "probe"))
    fp32_ck, bf16_ck = results["fp32_plain"].checkpoint, results["bf16_plain"].checkpoint
    out = {
        "vocab": _expect_error(session, dict(base, load=fp32_ck, vocab_size=256)),
        "to_bf16": _expect_error(session, dict(base, load=fp32_ck, bf16=True)),
        "to_distopt": _expect_error(session, dict(base, load=fp32_ck,
                                                  use_distributed_optimizer=True)),
    }
    # The conversions those errors name: weights only, into the new format.
    t = session.trainer(None, dict(base, load=bf16_ck, no_load_optim=True, bf16=True,
                                   use_distributed_optimizer=True))  # bf16 plain -> distopt
    out["bf16_distopt_main_params"] = _main_params_match_model(t)
    t = session.trainer(None, dict(base, load=fp32_ck, no_load_optim=True,
                                   use_distributed_optimizer=True))
    out["distopt_iteration"] = t.iteration
    out["distopt_loss"] = t.train().lm_loss
    t = session.trainer(None, dict(base, load=bf16_ck, no_load_optim=True))  # bf16 -> fp32
    out["fp32_loss"] = t.train().lm_loss
    t = session.trainer(None, dict(base, load=fp32_ck, finetune=True, bf16=True))
    out["finetune_iteration"] = t.iteration
    # --bf16 optimizer: its fp32 main weights must be the loaded weights, not the init.
    out["main_params_reloaded"] = _main_params_match_model(t)
    return out


def probe_reshard_bf16_distopt(session, root, results):
    """Item 2: the DP2 run's bf16 distributed-optimizer checkpoint into TP2xPP2."""
    ck = os.path.join(os.path.dirname(root), "dp2", "bf16_distopt", "ck",
                      f"iter_{rm.ITERS // 2:07d}")
    cli = dict(rm.TINY, mtp_num_layers=2, bf16=True, use_distributed_optimizer=True,
               train_iters=rm.ITERS, load=ck, output_dir=os.path.join(root, "reshard"), **TP2PP2)
    t = session.trainer(None, cli)
    states = [s for sub in t.optimizer.chained_optimizers for s in sub.optimizer.state.values()]
    loaded_moments = sum(float(s["exp_avg_sq"].abs().sum()) for s in states)
    history = []
    t.train(on_step=history.append)
    return {"iteration_loaded": history[0].iteration - 1, "moments": loaded_moments,
            "losses": {s.iteration: s.lm_loss for s in history}}


# --- the two process groups, shared by the tests below ---------------------------------

@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("matrix"))


@pytest.fixture(scope="module")
def dp2(root):
    cases = _matrix({}) + [_example("tiny_cpu_mtp2"), _example("gpt_350m_mtp1_gpu"),
                           _example("compare_gpu_model")]
    return spawn(2, rm.run_cases, cases, os.path.join(root, "dp2"),
                 [("changed", probe_changed_settings)])


@pytest.fixture(scope="module")
def tp2pp2(root, dp2):  # dp2 first: the resharding probe loads its checkpoint
    cases = _matrix(TP2PP2) + [_example("tp2_pp2_mtp2")]
    return spawn(4, rm.run_cases, cases, os.path.join(root, "tp2pp2"),
                 [("reshard", probe_reshard_bf16_distopt)])


def _assert_bit_exact(per_rank, name):
    for rank, results in enumerate(per_rank):
        r = results[name]
        assert r.iterations == list(range(1, rm.ITERS + 1)), (rank, r)
        assert r.resumed_iterations == list(range(rm.ITERS // 2 + 1, rm.ITERS + 1)), (rank, r)
        assert r.mismatches == [], (rank, name, r.mismatches)
        # (>= 6: a one-layer Llama-shaped stage has 6 weight tensors, plus embeddings)
        assert r.weights_equal and r.weights_compared >= 6, (rank, name, r)
    last = per_rank[-1][name]
    assert all(loss is not None for loss in last.losses.values()), last  # really logged


@pytest.mark.parametrize("name", MATRIX + ["example_tiny_cpu_mtp2", "example_gpt_350m_mtp1_gpu",
                                          "example_compare_gpu_model"])
def test_dp2_resume_is_bit_exact(name, dp2):
    _assert_bit_exact(dp2, name)


@pytest.mark.parametrize("name", MATRIX + ["example_tp2_pp2_mtp2"])
def test_tp2_pp2_resume_is_bit_exact(name, tp2pp2):
    _assert_bit_exact(tp2pp2, name)


def test_every_example_is_covered():
    names = sorted(f[:-5] for f in os.listdir(EXAMPLES) if f.endswith(".yaml"))
    # the MoE examples: trained in test_moe_examples.py, planned in unit/test_moe_plan.py
    assert names == ["compare_gpu_model", "dsv3_moe_gpu", "dsv3_moe_tiny_cpu",
                     "gpt_350m_mtp1_gpu", "tiny_cpu_mtp2", "tp2_pp2_mtp2"], names


def test_bf16_distributed_optimizer_checkpoint_reshards_dp2_to_tp2_pp2(dp2, tp2pp2):
    got = tp2pp2[-1]["reshard"]  # the last rank logs the loss
    expected = dp2[-1]["bf16_distopt"].losses
    assert got["iteration_loaded"] == rm.ITERS // 2
    for rank in tp2pp2:  # Adam moments came from the checkpoint (fresh ones are zeros)
        assert rank["reshard"]["moments"] > 0
    for it, loss in got["losses"].items():
        assert abs(loss - expected[it]) < 0.02, (it, loss, expected[it])


def test_resume_with_changed_settings_names_the_field(dp2):
    out = dp2[0]["changed"]
    assert "vocabulary of 512" in out["vocab"] and "256" in out["vocab"], out["vocab"]
    assert "fp32" in out["to_bf16"] and "bf16" in out["to_bf16"], out["to_bf16"]
    assert "--no-load-optim" in out["to_bf16"] and "--finetune" in out["to_bf16"]
    assert "--use-distributed-optimizer" in out["to_distopt"], out["to_distopt"]


def test_weights_only_conversions_load_the_weights(dp2):
    out, expected = dp2[-1]["changed"], dp2[-1]
    half = rm.ITERS // 2
    # fp32 plain -> distributed optimizer: same weights, same forward, bit for bit
    assert out["distopt_iteration"] == half
    assert out["distopt_loss"] == expected["fp32_plain"].losses[half + 1]
    # bf16 -> fp32: the bf16 weights, computed in fp32
    assert abs(out["fp32_loss"] - expected["bf16_plain"].losses[half + 1]) < 0.02
    assert out["finetune_iteration"] == 0
    for rank in dp2:
        assert rank["changed"]["main_params_reloaded"], rank["changed"]
        assert rank["changed"]["bf16_distopt_main_params"], rank["changed"]

"""The acceptance stage end to end on 2 CPU ranks, as a user runs it: pretrain, save;
continue from that checkpoint with ``--finetune --freeze-main-model --mtp-self-distill``,
saving halfway; resume the stage from the halfway checkpoint.

Per layout (DP2 + distributed optimizer + bf16, TP2, PP2; greedy and KL targets), over
the real Trainer with loss masks that have holes:

* the main model's weights (embedding, decoder, output head) after the stage are
  bit-identical to the pretrained checkpoint's, and the MTP weights moved;
* only MTP parameters require a gradient, get a gradient buffer and are in the
  optimizer (its fp32 parameters add up to the MTP parameters, PP stage 0 has none);
* resuming the stage gives the same logged values (``distill_k`` included) and
  bit-identical weights.
"""

import os

import pytest

from tests.dist_utils import spawn

pytestmark = pytest.mark.multirank

CASES = [  # name, layout flags, --mtp-self-distill
    ("dp2_distopt_bf16_greedy", {"use_distributed_optimizer": True, "bf16": True}, "greedy"),
    ("tp2_kl", {"tensor_model_parallel_size": 2}, "kl"),
    ("pp2_greedy", {"pipeline_model_parallel_size": 2}, "greedy"),
]


def _weights(model):
    return {f"{i}.{name}": p.detach().clone() for i, chunk in enumerate(model)
            for name, p in chunk.named_parameters()}


def _is_mtp(name):
    return ".mtp." in f".{name}"


def _optimizer_numel(optimizer):
    from mtp_megatron.runtime.optimizer_parts import sub_optimizers

    total = 0
    for sub in sub_optimizers(optimizer):
        inner = getattr(sub, "optimizer", None)
        for group in getattr(inner, "param_groups", []):
            total += sum(p.numel() for p in group["params"])
    return total


def _history(trainer_history):
    from tests.functional.resume_matrix import _values

    return {s.iteration: _values(s) for s in trainer_history}


def _case(root, name, layout, mode, world_size):
    from mtp_megatron.training.writers import read_run
    from tests.reference.harness import finish, make_trainer, tiny_config

    out = os.path.join(root, name)
    common = dict(layout, mtp_num_layers=2, log_interval=1, eval_iters=0)
    base = make_trainer(tiny_config(world_size, f"{out}/base", train_iters=3,
                                    save=f"{out}/base_ck", **common))
    base.train()
    pretrained = _weights(base.model)
    finish(base)
    stage_flags = dict(common, freeze_main_model=True, mtp_self_distill=mode, train_iters=4,
                       lr=3e-3, min_lr=3e-3)
    stage = make_trainer(tiny_config(world_size, f"{out}/stage", load=f"{out}/base_ck",
                                     finetune=True, save=f"{out}/stage_ck", save_interval=2,
                                     **stage_flags))
    trainable = sorted(n for i, c in enumerate(stage.model)
                       for n, p in c.named_parameters() if p.requires_grad)
    with_buffers = sorted(n for i, c in enumerate(stage.model)
                          for n, p in c.named_parameters() if hasattr(p, "main_grad"))
    mtp_numel = sum(p.numel() for c in stage.model for n, p in c.named_parameters()
                    if _is_mtp(n))
    optimizer_numel = _optimizer_numel(stage.optimizer)
    steps = []
    stage.train(on_step=steps.append)
    straight = _history(steps)
    after = _weights(stage.model)
    finish(stage)
    resumed_trainer = make_trainer(tiny_config(world_size, f"{out}/resumed",
                                               load=f"{out}/stage_ck/iter_0000002", **stage_flags))
    steps = []
    resumed_trainer.train(on_step=steps.append)
    resumed = _history(steps)
    after_resume = _weights(resumed_trainer.model)
    finish(resumed_trainer)
    rows = {}
    if os.path.exists(f"{out}/stage/metrics.jsonl"):  # the logging rank's
        rows = {run: {r["iteration"]: {k: v for k, v in r.items() if k.startswith("distill")}
                      for r in read_run(f"{out}/{run}/metrics.jsonl")[0]}
                for run in ("stage", "resumed")}
    main = [n for n in pretrained if not _is_mtp(n)]
    return {
        "main_identical": all(pretrained[n].equal(after[n]) for n in main) and bool(main),
        "mtp_moved": any(not pretrained[n].equal(after[n]) for n in pretrained if _is_mtp(n)),
        "trainable": trainable, "with_buffers": with_buffers,
        "mtp_numel": mtp_numel, "optimizer_numel": optimizer_numel,
        "straight": straight, "resumed": resumed,
        "resume_weights_identical": after.keys() == after_resume.keys()
        and all(after[n].equal(after_resume[n]) for n in after),
        "rows": rows,
    }


def _body(rank, world_size, root, names=None):
    return {name: _case(root, name, layout, mode, world_size) for name, layout, mode in CASES
            if names is None or name in names}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return spawn(2, _body, str(tmp_path_factory.mktemp("self_distill")), timeout=1500)


@pytest.mark.parametrize("name", [c[0] for c in CASES])
def test_main_model_bit_identical_and_heads_trained(results, name):
    for rank in results:
        r = rank[name]
        assert r["main_identical"]
        assert r["trainable"] == r["with_buffers"]
        assert all(_is_mtp(n) for n in r["trainable"])
    assert any(rank[name]["mtp_moved"] for rank in results)


@pytest.mark.parametrize("name", [c[0] for c in CASES])
def test_optimizer_holds_the_mtp_parameters_only(results, name):
    ranks = [rank[name] for rank in results]
    if name.startswith("dp2_distopt"):  # each DP rank holds a shard of the same parameters
        assert ranks[0]["mtp_numel"] == ranks[1]["mtp_numel"] > 0
        assert sum(r["optimizer_numel"] for r in ranks) == ranks[0]["mtp_numel"]
    else:
        assert [r["optimizer_numel"] for r in ranks] == [r["mtp_numel"] for r in ranks]
    if name.startswith("pp2"):
        assert ranks[0]["optimizer_numel"] == 0 and ranks[1]["optimizer_numel"] > 0


@pytest.mark.parametrize("name", [c[0] for c in CASES])
def test_stage_resumes_exactly(results, name):
    last = results[-1][name]
    assert sorted(last["resumed"]) == [3, 4]
    for it in (3, 4):
        assert last["resumed"][it] == last["straight"][it]
        assert last["resumed"][it]["lm loss"] is not None
    rows = last["rows"]
    assert set(rows["stage"][4]) == {"distill_1 loss", "distill_1 agreement",
                                     "distill_2 loss", "distill_2 agreement"}
    assert 0.0 <= rows["stage"][4]["distill_1 agreement"] <= 1.0
    assert {it: rows["stage"][it] for it in (3, 4)} == rows["resumed"]
    assert all(rank[name]["resume_weights_identical"] for rank in results)

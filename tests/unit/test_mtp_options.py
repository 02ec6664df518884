"""megatron-core 0.19's MTP options and training acceptance, through our Trainer (1 rank).

* ``--mtp-use-repeated-layer``: one MTP layer's weights serve every depth; the planner
  counts them so; save -> resume is bit-exact; the HF export writes one module per depth.
* ``--mtp-detach-heads``: the MTP losses train the MTP layers only: every other
  parameter's gradient is the lm loss's alone (equal to a run whose MTP factor is 0).
* Training acceptance (``mtp_k acceptance`` on the log line) is validation's definition:
  on the same forward, megatron-core's tracker counts exactly the top-1 hits and positions
  that ``training/evaluate.py``'s statistics count.

The options are TransformerConfig fields since megatron-core 0.19: on the 0.16 floor
they are refused at config time (tests/unit/test_mcore_compat.py) and these tests skip.
"""

from __future__ import annotations

import os

import pytest

from mtp_megatron.runtime import mcore_compat
from tests.dist_utils import spawn

pytestmark = [
    pytest.mark.multirank,
    pytest.mark.skipif(not mcore_compat.supports_mtp_layer_options(),
                       reason="version-gated: megatron-core >= 0.19 options "
                              "(refused on 0.16, see test_mcore_compat.py)"),
]

TINY = dict(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=32,
            micro_batch_size=2, global_batch_size=4, lr=3e-3, lr_warmup_iters=1,
            mock_data=True, eval_iters=0, log_interval=1, train_iters=4)


def _grads(trainer):
    from tests.reference.harness import before_optimizer_step

    seen = {}

    def snapshot(iteration):
        if iteration == 1:
            seen.update({n: p.main_grad.detach().clone()
                         for chunk in trainer.model for n, p in chunk.named_parameters()})

    before_optimizer_step(trainer, snapshot)
    trainer.train_step()
    return seen


def _body(rank, world_size, root):
    import torch

    from mtp_megatron.config import build_config
    from mtp_megatron.plan import build_plan
    from tests.functional import resume_matrix as rm
    from tests.reference.harness import finish, make_trainer

    out = {}
    # --- repeated layer: one set of MTP weights, planned as such, resumed bit-exactly
    cli = dict(TINY, mtp_num_layers=3, mtp_use_repeated_layer=True)
    cfg = build_config({}, dict(cli, output_dir=os.path.join(root, "rep")), world_size)
    trainer = make_trainer(cfg)
    gpt = trainer.model[0].module
    out["repeated_layers"] = len(gpt.mtp.layers)
    out["repeated_params"] = sum(p.numel() for p in trainer.model[0].parameters())
    out["planned_params"] = build_plan(cfg).stages[0].rank_params["total"]
    out["repeated_losses"] = trainer.train_step().mtp_losses
    finish(trainer)
    session = rm.Session(world_size)
    out["repeated_resume"] = rm.run_case(session, root, "rep_resume", None, cli)

    # --- detached heads: every non-MTP gradient is the lm loss's alone
    detached = make_trainer(build_config({}, dict(
        TINY, mtp_num_layers=2, mtp_detach_heads=True, mtp_loss_scaling_factor=0.5,
        output_dir=os.path.join(root, "det")), world_size))
    with_detach = _grads(detached)
    finish(detached)
    lm_only = make_trainer(build_config({}, dict(
        TINY, mtp_num_layers=2, mtp_loss_scaling_factor=0.0,
        output_dir=os.path.join(root, "lm")), world_size))
    without = _grads(lm_only)
    finish(lm_only)
    attached = make_trainer(build_config({}, dict(
        TINY, mtp_num_layers=2, mtp_loss_scaling_factor=0.5,
        output_dir=os.path.join(root, "att")), world_size))
    with_mtp = _grads(attached)
    finish(attached)
    main = [n for n in with_detach if ".mtp." not in n]
    out["detached_main_gap"] = max((with_detach[n] - without[n]).abs().max().item()
                                   for n in main)
    out["attached_main_gap"] = max((with_mtp[n] - without[n]).abs().max().item() for n in main)
    out["detached_mtp_grad"] = max(with_detach[n].abs().max().item()
                                   for n in with_detach if ".mtp." in n)
    out["main_names"] = len(main)

    # --- training acceptance: the tracker's hits and positions vs evaluate.py's
    from megatron.core.transformer.multi_token_prediction import MTPLossAutoScaler

    from mtp_megatron.training.evaluate import CORRECT, TOKENS, _HeadCapture

    trainer = make_trainer(build_config({}, dict(
        TINY, mtp_num_layers=2, lr=1e-2, train_iters=60,
        output_dir=os.path.join(root, "acc")), world_size))
    gpt = trainer.model[0].module
    for chunk in trainer.model:
        chunk.train()
    for _ in range(60):  # until the heads get some tokens right
        trainer.run_step()
    batch = trainer.sampler.next_step()[0]
    capture = _HeadCapture(gpt, 2, None)
    capture.begin(batch["labels"], batch["loss_mask"])
    mcore_compat.reset_mtp_tracker()
    MTPLossAutoScaler.set_loss_scale(torch.tensor(1.0))
    trainer.model[0](batch["tokens"], batch["position_ids"], None, labels=batch["labels"],
                     loss_mask=batch["loss_mask"])
    stats = capture.finish()
    capture.remove()
    sums = mcore_compat.take_mtp_sums()
    out["tracker"] = (sums.correct.tolist(), sums.total.tolist())
    out["evaluate"] = ([stats[k, CORRECT].item() for k in (1, 2)],
                       [stats[k, TOKENS].item() for k in (1, 2)])
    finish(trainer)
    return out


@pytest.fixture(scope="module")
def seen(tmp_path_factory):
    return spawn(1, _body, str(tmp_path_factory.mktemp("mtp_options")))[0]


def test_repeated_layer_is_one_layer_at_every_depth_as_planned(seen):
    assert seen["repeated_layers"] == 1
    assert seen["repeated_params"] == seen["planned_params"]
    assert len(seen["repeated_losses"]) == 3 and all(v > 0 for v in seen["repeated_losses"])


def test_repeated_layer_resumes_bit_exactly(seen):
    result = seen["repeated_resume"]
    assert result.resumed_iterations == [3, 4]
    assert result.mismatches == [] and result.weights_equal


def test_detached_heads_leave_the_main_model_to_the_lm_loss(seen):
    assert seen["main_names"] > 10
    assert seen["detached_main_gap"] <= 1e-7, seen["detached_main_gap"]
    assert seen["attached_main_gap"] > 1e-4  # without detaching, MTP reaches the main model
    assert seen["detached_mtp_grad"] > 1e-4  # and the MTP layers still learn


def test_training_acceptance_is_validations_definition(seen):
    (correct, total), (ev_correct, ev_total) = seen["tracker"], seen["evaluate"]
    assert total == ev_total and total[0] > total[1] > 0  # depth k drops k positions
    assert correct == ev_correct and correct[0] > 0  # trained: some hits to compare

"""Depth weights and a factor schedule, saved and resumed mid-ramp and mid-decay: bit-exact.

One spawned DP2 process group (``resume_matrix``): each case trains ``rm.ITERS`` = 4
steps saving at 2, then a fresh Trainer resumes from that checkpoint; every logged value
of steps 3-4 (lm loss, each ``mtp_k loss``, ``mtp_factor``, lr, grad norm) must equal the
straight run's and the final weights must be ``torch.equal``. The first case is what
users run (bf16, the distributed optimizer, D=3, exponential weights) with the factor
still ramping up at the save; the second saves in the middle of a linear decay. A probe
then resumes the second case with another final factor: allowed, announced by a warning
naming the flag and both values, and the new schedule applies from the next iteration.
"""

from __future__ import annotations

import os

import pytest

from mtp_megatron.training.writers import read_run
from tests.dist_utils import spawn
from tests.functional import resume_matrix as rm

pytestmark = [pytest.mark.functional, pytest.mark.compat]  # dist ckpt + hook per release

RAMP = ("dp2_bf16_distopt_mtp3_exponential_warmup3", None, dict(
    rm.TINY, mtp_num_layers=3, bf16=True, use_distributed_optimizer=True,
    mtp_depth_weights="exponential", mtp_loss_scaling_factor=0.3,
    mtp_loss_scaling_factor_warmup_iters=3))
DECAY = ("dp2_mtp2_list_linear_decay", None, dict(
    rm.TINY, mtp_num_layers=2, mtp_depth_weights="3,1", mtp_loss_scaling_factor=0.3,
    mtp_loss_scaling_factor_warmup_iters=1, mtp_loss_scaling_factor_final=0.06,
    mtp_loss_scaling_factor_decay_style="linear", mtp_loss_scaling_factor_decay_iters=4))
# the factor of iterations 1..4 (completed iterations n = i - 1; training/mtp_weighting.py)
FACTORS = {RAMP[0]: [0.0, 0.1, 0.2, 0.3], DECAY[0]: [0.0, 0.3, 0.22, 0.14]}


def _changed_final(session, root, results):
    """Resume DECAY's half-way checkpoint with --mtp-loss-scaling-factor-final 0.18."""
    import logging

    messages = []
    handler = logging.Handler(level=logging.WARNING)
    handler.emit = lambda record: messages.append(record.getMessage())
    log = logging.getLogger("mtp_megatron")
    log.addHandler(handler)
    try:
        cli = dict(DECAY[2], train_iters=rm.ITERS, load=results[DECAY[0]].checkpoint,
                   output_dir=os.path.join(root, "changed"), mtp_loss_scaling_factor_final=0.18)
        _, history = session.run(None, cli)
    finally:
        log.removeHandler(handler)
    return {"warnings": messages, "factors": {s.iteration: s.mtp_factor for s in history}}


@pytest.fixture(scope="module")
def dp2(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("weighting_resume"))
    results = spawn(2, rm.run_cases, [RAMP, DECAY], root, [("changed_final", _changed_final)])
    return root, results


@pytest.mark.parametrize("name", [RAMP[0], DECAY[0]])
def test_resume_mid_schedule_is_bit_exact(dp2, name):
    _, results = dp2
    for rank in results:
        r = rank[name]
        assert r.resumed_iterations == [3, 4]
        assert not r.mismatches, r.mismatches
        assert r.weights_equal and r.weights_compared > 0


@pytest.mark.parametrize("name", [RAMP[0], DECAY[0]])
def test_metrics_jsonl_logs_the_factor_of_every_iteration(dp2, name):
    root, _ = dp2
    for run in ("a", "b"):
        rows, _ = read_run(os.path.join(root, name, run))
        first = 1 if run == "a" else 3
        expected = FACTORS[name][first - 1:]
        assert [r["iteration"] for r in rows] == list(range(first, 5))
        assert [r["mtp_factor"] for r in rows] == pytest.approx(expected, abs=1e-12)


def test_a_changed_schedule_is_announced_and_applies_from_the_next_iteration(dp2):
    _, results = dp2
    for rank in results:
        changed = rank["changed_final"]
        assert any("--mtp-loss-scaling-factor-final: 0.06 -> 0.18" in m
                   for m in changed["warnings"]), changed["warnings"]
        # linear from 0.3 at n = 1 to 0.18 at n = 4: n = 2, 3 -> 0.26, 0.22
        assert changed["factors"] == pytest.approx({3: 0.26, 4: 0.22}, abs=1e-12)

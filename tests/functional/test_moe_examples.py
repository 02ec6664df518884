"""The tiny DeepSeek-V3-shaped example trains with the real launcher, as its header shows
(2 ranks, EP2), and logs what docs/moe.md promises. (The GPU example is planned in
tests/unit/test_moe_plan.py.)"""

import math
import os

import pytest

from tests.functional.launcher import ROOT, launch

pytestmark = pytest.mark.functional

EXAMPLE = os.path.join(ROOT, "examples", "dsv3_moe_tiny_cpu.yaml")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("dsv3_moe_tiny_cpu"))
    return launch(["--config", EXAMPLE, "--expert-model-parallel-size", "2",
                   "--train-iters", "15", "--eval-iters", "0"], output_dir=out, nproc=2)


def test_the_example_trains_with_ep2(run):
    assert run.returncode == 0, run
    rows = run.metrics()
    assert [r["iteration"] for r in rows] == [5, 10, 15]
    losses = [r["lm loss"] for r in rows]
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0] - 0.2, losses
    assert all(math.isfinite(r["mtp_1 loss"]) for r in rows)


def test_the_moe_log_is_written(run):
    last = run.metrics()[-1]
    assert 0.5 < last["load balancing loss"] < 4.0  # 1.0 is balanced
    assert last["expert load max/mean"] >= 1.0
    assert last["expert bias min"] < 0 < last["expert bias max"]
    layers = [k for k in last if k.endswith("tokens/expert max")]
    assert sorted(layers) == ["moe layer 1 tokens/expert max", "moe layer 2 tokens/expert max",
                              "moe layer 3 tokens/expert max", "moe mtp_1 tokens/expert max"]
    # 8 sequences of 64 tokens, top-2 over 8 experts: 128 per expert on average
    mean = 8 * 64 * 2 / 8
    assert all(last[k.replace("max", "min")] <= mean <= last[k] for k in layers)
    assert "load balancing loss" in run.stdout + run.stderr

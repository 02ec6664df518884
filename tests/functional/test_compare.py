"""End to end: ``python -m mtp_megatron.experiments.compare`` on a tiny config, twice.

Two real runs (baseline and D=1, one CPU rank, a few iterations on the embedded corpus),
speculative decoding of the MTP checkpoint, then a second invocation that must not
train again. The comparison logic itself is in tests/unit/test_compare.py.
"""

import json
import os
import subprocess
import sys

import pytest

from mtp_megatron.training.writers import read_rows
from tests.functional.launcher import ROOT

pytestmark = pytest.mark.functional

ARGS = ["--mtp-num-layers", "1", "--mtp-loss-scaling-factor", "0.3", "--seeds", "1",
        "--train-iters", "4", "--eval-interval", "2", "--eval-iters", "1", "--log-interval", "2",
        "--no-equal-flops", "--prompts", "2", "--max-new-tokens", "8", "--nproc-per-node", "1",
        "--", "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
        "--seq-length", "32", "--micro-batch-size", "2", "--global-batch-size", "4"]


def compare(out_dir):
    cmd = [sys.executable, "-m", "mtp_megatron.experiments.compare", "--out-dir", out_dir, *ARGS]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)


def test_baseline_vs_mtp1_runs_reports_and_resumes(tmp_path):
    out = str(tmp_path / "cmp")
    first = compare(out)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    with open(os.path.join(out, "results.json")) as fh:
        doc = json.load(fh)
    assert set(doc["variants"]) == {"baseline", "mtp_d1_f0.3"}
    mtp = doc["variants"]["mtp_d1_f0.3"]
    run = next(r for r in doc["runs"] if r["variant"] == "mtp_d1_f0.3")
    # the main head's validation loss, read from the run's own final validation row
    rows = read_rows(os.path.join(out, "runs", "seed1234", "mtp_d1_f0.3"))
    final = [r for r in rows if r.get("split") == "valid" and r["iteration"] == 4][-1]
    assert run["valid_lm_loss"] == final["lm loss"] != run["train_objective"]
    assert 0.0 <= run["acceptance"][0] <= 1.0 and run["peak_rss_mib"] > 100
    assert mtp["flop_ratio"] > 1.0 and mtp["step_time_ratio"]["mean"] > 0
    spec = mtp["speculative"]["k1"]
    assert spec["matches_greedy"] and spec["tokens_per_main_forward"]["mean"] >= 1.0
    for name in ("results.md", "valid_loss.png", "acceptance.png"):
        assert os.path.getsize(os.path.join(out, name)) > 0
    done = os.path.join(out, "runs", "seed1234", "baseline", "DONE.json")
    stamp = os.path.getmtime(done)

    second = compare(out)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert second.stdout.count("finished earlier, not retrained") == 2
    assert "training 4 iterations" not in second.stdout
    assert os.path.getmtime(done) == stamp

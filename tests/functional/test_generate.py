"""End to end: train and save with TP=2 x PP=2 on 4 CPU ranks, generate on one rank.

The run trains on --mock-data (counting sequences) long enough to learn to count, so
a correct continuation shows the resharded weights (main model and both MTP depths)
arrived intact; speculative output must equal greedy output.
"""

import json
import os
import subprocess
import sys

import pytest

from tests.functional.launcher import ROOT, launch

pytestmark = pytest.mark.functional

TRAIN = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
         "--seq-length", "32", "--micro-batch-size", "4", "--global-batch-size", "16",
         "--lr", "1e-2", "--train-iters", "40", "--eval-iters", "0", "--log-interval", "10",
         "--mock-data", "--mtp-num-layers", "2"]


def generate(*args):
    cmd = [sys.executable, "-m", "mtp_megatron.generate", *map(str, args)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)


@pytest.fixture(scope="module")
def tp2_pp2_checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp2_pp2_mtp2")
    save = root / "checkpoints"
    run = launch(TRAIN + ["--tensor-model-parallel-size", "2",
                          "--pipeline-model-parallel-size", "2", "--save", str(save)],
                 output_dir=str(root / "run"), nproc=4)
    assert run.returncode == 0, run
    return save


def test_tp2_pp2_mtp2_checkpoint_generates_on_one_rank(tp2_pp2_checkpoint):
    proc = generate("--load", tp2_pp2_checkpoint, "--prompt", "100 101 102 103",
                    "--prompt", "7", "--prompt", "300 301 302 303 304 305 306",
                    "--max-new-tokens", 16, "--mode", "mtp-speculative", "--draft-depth", 2,
                    "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert report["matches_greedy"] is True
    outputs = [o["tokens"] for o in report["outputs"]]
    assert outputs[0][:8] == list(range(104, 112))
    assert outputs[2][:8] == list(range(307, 315))
    spec = report["speculative_k2"]
    assert min(spec["acceptance_per_position"]) > 0.8
    assert spec["main_forwards_per_token"] < 0.5
    assert report["greedy"]["main_forwards_per_token"] == 1.0


def test_cli_errors_name_the_flag(tp2_pp2_checkpoint, tmp_path):
    proc = generate("--load", tp2_pp2_checkpoint, "--prompt", "1 2", "--draft-depth", 3)
    assert proc.returncode == 2
    assert "--draft-depth 3" in proc.stderr and "--mtp-num-layers=2" in proc.stderr
    proc = generate("--load", tmp_path / "missing", "--prompt", "1 2")
    assert proc.returncode == 2 and "--load" in proc.stderr
    proc = generate("--load", tp2_pp2_checkpoint)
    assert proc.returncode == 2 and "--prompt" in proc.stderr

"""The GPU path end to end: the real launcher under torchrun with NCCL (skipped without CUDA).

    pytest -m gpu tests/functional/test_gpu_paths.py -v -rs     # or: make gpu-check

One GPU: train + evaluate + save, resume, --exit-interval, SIGTERM (save, exit 0, resume),
NaN stop/skip, fp16 with loss scaling, generation from the checkpoint. Two or more GPUs
(skipped with fewer): TP2 + sequence parallel + distributed optimizer, DP2 + distributed
optimizer, PP2; four:
TP2 x PP2 with the interleaved (virtual pipeline) schedule. Every case asserts its
outcome; none of them can run on the CPU-only machines these tests were written on.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from tests.dist_utils import child_env
from tests.functional.launcher import LAUNCHER, ROOT, TINY, launch

pytestmark = [pytest.mark.gpu, pytest.mark.functional]

GPU = TINY + ["--mock-data", "--bf16", "--mtp-num-layers", "2", "--lr-warmup-iters", "2",
              "--transformer-impl", "local"]


def _tracker(ck) -> int:
    return int(open(os.path.join(ck, "latest_checkpointed_iteration.txt")).read())


def _iterations(run):
    return [r["iteration"] for r in run.metrics()]


def _need(gpus: int) -> None:
    if torch.cuda.device_count() < gpus:
        pytest.skip(f"needs {gpus} GPUs")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """4 iterations on one GPU: evaluation every 2, checkpoints at 2 and 4."""
    root = tmp_path_factory.mktemp("gpu_smoke")
    run = launch(GPU + ["--train-iters", "4", "--save", str(root / "ck"), "--save-interval", "2",
                        "--eval-interval", "2", "--eval-iters", "1"],
                 output_dir=str(root / "run"), nproc=1, gpu=True)
    return root, run


def test_one_gpu_trains_evaluates_and_saves(smoke):
    root, run = smoke
    assert run.returncode == 0, run
    assert _iterations(run) == [1, 2, 3, 4]
    valid = run.metrics("valid")
    assert [r["iteration"] for r in valid] == [2, 4]
    assert all(k in valid[-1] for k in ("lm loss", "mtp_1 loss", "mtp_2 loss"))
    assert _tracker(root / "ck") == 4 and (root / "ck" / "iter_0000002").is_dir()


def test_one_gpu_resumes_from_its_checkpoint(smoke, tmp_path):
    root, _ = smoke
    run = launch(GPU + ["--train-iters", "6", "--load", str(root / "ck" / "iter_0000002"),
                        "--save", str(tmp_path / "ck"), "--override-opt-param-scheduler"],
                 output_dir=str(tmp_path / "run"), nproc=1, gpu=True)
    assert run.returncode == 0, run
    assert _iterations(run) == [3, 4, 5, 6]
    assert "loaded checkpoint" in run.stdout and "RNG states not loaded" not in run.stdout
    assert _tracker(tmp_path / "ck") == 6


def test_exit_interval_saves_and_stops(tmp_path):
    run = launch(GPU + ["--train-iters", "50", "--exit-interval", "3",
                        "--save", str(tmp_path / "ck")],
                 output_dir=str(tmp_path / "run"), nproc=1, gpu=True)
    assert run.returncode == 0, run
    assert _iterations(run) == [1, 2, 3]
    assert "stopping after iteration 3: --exit-interval 3 reached" in run.stdout
    assert _tracker(tmp_path / "ck") == 3


def test_sigterm_saves_exits_zero_and_resumes(tmp_path):
    ck = str(tmp_path / "ck")
    cmd = [sys.executable, LAUNCHER] + GPU + ["--train-iters", "100000", "--save", ck,
                                              "--exit-signal-handler",
                                              "--output-dir", str(tmp_path / "a")]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=child_env(dict(os.environ, PYTHONUNBUFFERED="1"),
                                                     gpu=True))
    for line in proc.stdout:
        if "iteration 3/" in line:
            proc.send_signal(signal.SIGTERM)
            break
    rest = proc.stdout.read()
    assert proc.wait(timeout=300) == 0, rest
    stopped = _tracker(ck)
    assert stopped >= 3 and f"stopping after iteration {stopped}: received SIGTERM" in rest
    resumed = launch(GPU + ["--train-iters", str(stopped + 2), "--save", ck,
                            "--use-checkpoint-opt-param-scheduler"],
                     output_dir=str(tmp_path / "b"), torchrun=False, gpu=True)
    assert resumed.returncode == 0, resumed
    assert _iterations(resumed) == [stopped + 1, stopped + 2]


def test_nan_stops_or_is_skipped(tmp_path):
    env = {"MTP_MEGATRON_INJECT_NAN_AT": "3"}
    stop = launch(GPU + ["--train-iters", "5"], output_dir=str(tmp_path / "a"), torchrun=False,
                  env=env, gpu=True)  # torchrun would turn exit code 3 into 1
    assert stop.returncode == 3 and "iteration 3: NaN/Inf" in stop.stderr, stop
    skip = launch(GPU + ["--train-iters", "5", "--skip-nan-steps"],
                  output_dir=str(tmp_path / "b"), torchrun=False, env=env, gpu=True)
    assert skip.returncode == 0, skip
    rows = {r["iteration"]: r for r in skip.metrics()}
    assert rows[3]["skipped"] == 1 and rows[4]["skipped"] == 0


def test_fp16_with_loss_scaling_trains(tmp_path):
    args = [a for a in GPU if a != "--bf16"] + ["--fp16", "--train-iters", "30"]
    run = launch(args, output_dir=str(tmp_path), nproc=1, gpu=True)
    assert run.returncode == 0, run
    rows = run.metrics()
    assert len(rows) == 30 and rows[-1]["lm loss"] < rows[0]["lm loss"] - 0.5


def test_generation_from_a_gpu_checkpoint(smoke):
    root, run = smoke
    assert run.returncode == 0, run
    proc = subprocess.run(
        [sys.executable, "-m", "mtp_megatron.generate", "--load", str(root / "ck"),
         "--prompt", "1 2 3 4", "--max-new-tokens", "8", "--mode", "mtp-speculative",
         "--draft-depth", "2", "--json"],
        capture_output=True, text=True, cwd=ROOT, env=child_env(gpu=True), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert report["matches_greedy"] is True
    assert len(report["outputs"][0]["tokens"]) >= 8


MULTI_GPU = {  # name: (GPUs, extra flags)
    "tp2_sp_distopt_mtp2": (2, ["--tensor-model-parallel-size", "2", "--sequence-parallel",
                                "--use-distributed-optimizer"]),
    "dp2_distopt_mtp2": (2, ["--use-distributed-optimizer"]),
    "pp2_mtp2": (2, ["--pipeline-model-parallel-size", "2"]),
    "tp2_dp2_sp_distopt_mtp2": (4, ["--tensor-model-parallel-size", "2", "--sequence-parallel",
                                    "--use-distributed-optimizer"]),
    "tp2_pp2_vpp2_mtp2": (4, ["--tensor-model-parallel-size", "2",
                              "--pipeline-model-parallel-size", "2", "--num-layers", "4",
                              "--num-layers-per-virtual-pipeline-stage", "1"]),
}


@pytest.mark.parametrize("name", list(MULTI_GPU))
def test_multi_gpu_layout_trains_saves_and_resumes(name, tmp_path):
    gpus, extra = MULTI_GPU[name]
    _need(gpus)
    ck = str(tmp_path / "ck")
    run = launch(GPU + extra + ["--train-iters", "12", "--save", ck, "--save-interval", "6",
                                "--eval-iters", "1"],
                 output_dir=str(tmp_path / "a"), nproc=gpus, gpu=True)
    assert run.returncode == 0, run
    rows = run.metrics()
    assert _iterations(run) == list(range(1, 13))
    assert rows[-1]["lm loss"] < rows[0]["lm loss"] and "mtp_2 loss" in rows[-1]
    assert run.metrics("valid"), "no evaluation logged"
    resumed = launch(GPU + extra + ["--train-iters", "14", "--load", ck + "/iter_0000006",
                                    "--override-opt-param-scheduler"],
                     output_dir=str(tmp_path / "b"), nproc=gpus, gpu=True)
    assert resumed.returncode == 0, resumed
    assert _iterations(resumed) == list(range(7, 15))

"""Checkpoints end to end on CPU: bit-exact resume, resharding, signals, corruption, NaN.

Topology names follow the functional-test convention (tp2_pp2_mtp2 ...). Each straight
run saves at iteration 10 and 20; the resumed run starts from iteration 10 in a fresh
process. Logged values must match to every digit and the final weights bit for bit.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from tests.dist_utils import spawn
from tests.functional.launcher import (
    LAUNCHER,
    ROOT,
    SAVED_ARGS,
    SAVED_LAYOUTS,
    TINY,
    launch,
)

pytestmark = pytest.mark.functional

MTP2 = ["--mtp-num-layers", "2", "--mock-data", "--lr-warmup-iters", "2"]
# resumes that stop before the saved run's --train-iters keep its LR schedule
KEEP_SCHEDULE = "--use-checkpoint-opt-param-scheduler"
KEYS = ("lm loss", "mtp_1 loss", "mtp_2 loss", "grad norm", "lr")


@pytest.fixture(scope="module")
def straight_runs(saved_run):
    """20 iterations per layout, saving at 10 and 20 (tests/functional/conftest.py:
    trained once per session, shared with test_train_layouts)."""
    return {name: saved_run(name) for name in SAVED_LAYOUTS}


def _weights(rank, world_size, checkpoints):
    """Load each checkpoint into a single-rank model; return its tensors."""
    import torch

    from mtp_megatron.checkpoint import load_model_weights
    from mtp_megatron.config import build_config
    from mtp_megatron.model.builder import build_gpt_chunk, transformer_config, vocab_size_for
    from tests.dist_utils import init_ranks

    cli = {"num_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "seq_length": 32,
           "mtp_num_layers": 2, "micro_batch_size": 2, "global_batch_size": 8}
    cfg = build_config(None, cli, 1)
    init_ranks(cfg)
    out = []
    for path in checkpoints:
        chunk = build_gpt_chunk(cfg, transformer_config(cfg, on_cpu=True), "local",
                                vocab_size_for(cfg, 512))
        load_model_weights(path, [chunk])
        out.append({k: v.clone() for k, v in chunk.state_dict().items()
                    if isinstance(v, torch.Tensor)})
    return out


@pytest.mark.parametrize("name", list(SAVED_LAYOUTS))
def test_resume_is_bit_exact(name, straight_runs):
    out, straight = straight_runs[name]
    nproc, extra = SAVED_LAYOUTS[name]
    resumed = launch(SAVED_ARGS + extra + ["--load", str(out / "ck" / "iter_0000010"),
                                            "--save", str(out / "ck_resumed")],
                     output_dir=str(out / "resumed"), nproc=nproc)
    assert resumed.returncode == 0, resumed
    a = {r["iteration"]: r for r in straight.metrics()}
    b = {r["iteration"]: r for r in resumed.metrics()}
    assert sorted(b) == list(range(11, 21))
    for it in range(11, 21):
        for key in KEYS:
            assert a[it][key] == b[it][key], (it, key, a[it][key], b[it][key])
    wa, wb = spawn(1, _weights, [str(out / "ck"), str(out / "ck_resumed")])[0]
    assert wa.keys() == wb.keys() and len(wa) > 10
    for key in wa:
        assert wa[key].equal(wb[key]), key


@pytest.mark.parametrize("source,target", [
    ("tp2_pp2_mtp2", ["--tensor-model-parallel-size", "1"]),
    ("tp1_mtp2", ["--tensor-model-parallel-size", "2"]),
], ids=["tp2_pp2_to_tp1", "tp1_to_tp2"])
def test_resharded_checkpoint_gives_the_same_loss(source, target, straight_runs, tmp_path):
    out, straight = straight_runs[source]
    nproc = 2 if "2" in target[1] else 1
    run = launch(TINY + MTP2 + target + ["--train-iters", "11", KEEP_SCHEDULE,
                                         "--load", str(out / "ck" / "iter_0000010")],
                 output_dir=str(tmp_path), nproc=nproc)
    assert run.returncode == 0, run
    assert "RNG states not loaded" in run.stdout  # another layout: RNG is per rank
    expected = {r["iteration"]: r for r in straight.metrics()}[11]
    got = run.metrics()[0]
    assert got["iteration"] == 11
    for key in ("lm loss", "mtp_1 loss", "mtp_2 loss"):
        assert abs(got[key] - expected[key]) < 1e-6, (key, got[key], expected[key])


def _popen(args, output_dir):
    cmd = [sys.executable, LAUNCHER] + TINY + MTP2 + args + ["--output-dir", output_dir]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))


def _tracker(ck):
    return int(open(os.path.join(ck, "latest_checkpointed_iteration.txt")).read())


def test_sigterm_saves_exits_zero_and_resume_continues(tmp_path):
    ck = str(tmp_path / "ck")
    proc = _popen(["--train-iters", "500", "--save", ck, "--exit-signal-handler"],
                  str(tmp_path / "a"))
    for line in proc.stdout:
        if "iteration 3/500" in line:
            proc.send_signal(signal.SIGTERM)
            break
    rest = proc.stdout.read()
    assert proc.wait(timeout=120) == 0, rest
    stopped = _tracker(ck)
    assert stopped >= 3
    assert f"stopping after iteration {stopped}: received SIGTERM" in rest
    # what a batch script reads to requeue (torchrun itself exits 1 when signalled)
    with open(tmp_path / "a" / "stopped.json") as fh:
        record = json.load(fh)
    assert record == {"iteration": stopped, "reason": "received SIGTERM", "saved": True,
                      "checkpoint": os.path.join(ck, f"iter_{stopped:07d}")}
    # the resumed run finishes in the same output directory: no stale stop record
    resumed = launch(TINY + MTP2 + ["--train-iters", str(stopped + 2), "--save", ck,
                                    KEEP_SCHEDULE],
                     output_dir=str(tmp_path / "a"), torchrun=False)
    assert resumed.returncode == 0, resumed
    assert [r["iteration"] for r in resumed.metrics()][-2:] == [stopped + 1, stopped + 2]
    assert not (tmp_path / "a" / "stopped.json").exists()


def test_sigkill_during_save_resumes_from_previous_complete_checkpoint(tmp_path):
    ck = tmp_path / "ck"
    proc = _popen(["--train-iters", "500", "--save", str(ck), "--save-interval", "2"],
                  str(tmp_path / "a"))
    deadline = time.time() + 300
    killed_partial = None
    while time.time() < deadline and killed_partial is None:
        partials = [d for d in (os.listdir(ck) if ck.exists() else [])
                    if d.endswith(".partial") and d != "iter_0000002.partial"]
        if partials:
            proc.send_signal(signal.SIGKILL)
            killed_partial = partials[0]
        time.sleep(0.005)
    proc.wait(timeout=60)
    assert killed_partial, "never saw a save in progress"
    latest = _tracker(ck)
    assert (ck / killed_partial).exists()  # killed mid-save: the partial dir is left over
    assert f"iter_{latest:07d}" != killed_partial.removesuffix(".partial")
    resumed = launch(TINY + MTP2 + ["--train-iters", str(latest + 1), "--save", str(ck),
                                    KEEP_SCHEDULE],
                     output_dir=str(tmp_path / "b"), torchrun=False)
    assert resumed.returncode == 0, resumed
    assert "ignoring interrupted save" in resumed.stdout and killed_partial in resumed.stdout
    assert f"(iteration {latest})" in resumed.stdout
    assert [r["iteration"] for r in resumed.metrics()] == [latest + 1]


@pytest.mark.parametrize("damage", ["delete_shard", "truncate_shard", "other_shape", "missing"])
def test_bad_checkpoint_is_a_clear_error(damage, straight_runs, tmp_path):
    src = straight_runs["tp1_mtp2"][0] / "ck" / "iter_0000010"
    ck = tmp_path / "iter_0000010"
    shutil.copytree(src, ck)
    shard = next(p for p in sorted(ck.iterdir()) if p.suffix == ".distcp")
    args = TINY + MTP2 + ["--train-iters", "12", KEEP_SCHEDULE, "--load", str(ck)]
    if damage == "delete_shard":
        shard.unlink()
    elif damage == "truncate_shard":
        data = shard.read_bytes()
        shard.write_bytes(data[: len(data) // 3])
    elif damage == "other_shape":
        args = args[:] + ["--num-layers", "4"]
    else:
        args = TINY + MTP2 + ["--load", str(tmp_path / "nowhere")]
    before = sorted(os.listdir(ck))
    run = launch(args, output_dir=str(tmp_path / "run"), torchrun=False)
    assert run.returncode != 0
    assert "Traceback" not in run.stderr, run
    if damage == "other_shape":
        assert "num_layers" in run.stderr and "--num-layers=4" in run.stderr
    elif damage == "missing":
        assert "--load" in run.stderr and "nowhere" in run.stderr
    else:
        assert str(ck) in run.stderr and "corrupt" in run.stderr
    assert sorted(os.listdir(ck)) == before  # nothing overwritten


def test_unwritable_save_dir_fails_before_training(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    run = launch(TINY + MTP2 + ["--save", str(blocker / "ck")], output_dir=str(tmp_path / "r"),
                 torchrun=False)
    assert run.returncode == 2 and "--save" in run.stderr
    assert run.metrics() == []


def test_nan_stops_without_saving_or_is_skipped(tmp_path):
    env = {"MTP_MEGATRON_INJECT_NAN_AT": "3"}
    ck = tmp_path / "ck"
    run = launch(TINY + MTP2 + ["--train-iters", "6", "--save", str(ck), "--save-interval", "2"],
                 output_dir=str(tmp_path / "a"), torchrun=False, env=env)
    assert run.returncode == 4, run  # ExitCode.NON_FINITE
    assert "iteration 3: NaN/Inf" in run.stderr
    assert _tracker(ck) == 2 and sorted(os.listdir(ck)) == [
        "iter_0000002", "latest_checkpointed_iteration.txt"]
    skip = launch(TINY + MTP2 + ["--train-iters", "6", "--skip-nan-steps"],
                  output_dir=str(tmp_path / "b"), torchrun=False, env=env)
    assert skip.returncode == 0, skip
    rows = {r["iteration"]: r for r in skip.metrics()}
    assert rows[3]["skipped"] == 1 and rows[4]["skipped"] == 0
    assert "iteration 3: NaN/Inf in the loss or gradients, update skipped" in skip.stdout
    json.dumps(rows)  # the log stays valid JSON

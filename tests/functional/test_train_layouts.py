"""Tier 4: end-to-end ``torchrun launch/pretrain_gpt_mtp.py`` on CPU, named by topology.

Every layout trains the tiny model on learnable mock data: the lm loss falls and every
``mtp_k loss`` is logged. The layouts in ``launcher.SAVED_LAYOUTS`` (TP1, TP2xPP2 and
DP2 with the distributed optimizer, D=2) are the session's saved runs, which
test_checkpoint_resume also resumes: trained once, checked here. DP2 with D=1 runs in
test_slurm_launch (SLURM variables, no torchrun); TP2 and PP2 with D=1 inside TP2xPP2.
Rejected configs exit quickly with the message, no traceback.
"""

import time

import pytest

from tests.functional.launcher import SAVED_LAYOUTS, TINY, launch

pytestmark = pytest.mark.functional

LAYOUTS = {
    "tp1_mtp1": (1, ["--mtp-num-layers", "1"]),
    "tp2_mtp2": (2, ["--tensor-model-parallel-size", "2", "--mtp-num-layers", "2"]),
    "pp2_mtp2": (2, ["--pipeline-model-parallel-size", "2", "--mtp-num-layers", "2"]),
    "tp2_pp2_mtp1": (4, ["--tensor-model-parallel-size", "2",
                         "--pipeline-model-parallel-size", "2", "--mtp-num-layers", "1"]),
}


@pytest.mark.parametrize("name", list(LAYOUTS) + list(SAVED_LAYOUTS))
def test_layout_trains_and_logs_every_mtp_depth(name, tmp_path, saved_run):
    if name in SAVED_LAYOUTS:
        depth, run = 2, saved_run(name)[1]
    else:
        nproc, extra = LAYOUTS[name]
        depth = int(extra[extra.index("--mtp-num-layers") + 1])
        run = launch(TINY + ["--mock-data", "--train-iters", "20", "--eval-iters", "1"] + extra,
                     output_dir=str(tmp_path), nproc=nproc)
        assert run.returncode == 0, run
    rows = run.metrics()
    assert [r["iteration"] for r in rows] == list(range(1, 21))
    first, last = rows[0], rows[-1]
    assert last["lm loss"] < first["lm loss"] - 0.3, (first["lm loss"], last["lm loss"])
    for k in range(1, depth + 1):
        key = f"mtp_{k} loss"
        assert key in last and f"{key} " in run.stdout
        assert last[key] < first[key], (key, first[key], last[key])
    assert f"mtp_{depth + 1} loss" not in last
    for key in ("lr", "grad norm", "tokens/s", "ms/iter", "TFLOP/s/GPU"):
        assert f"| {key} " in run.stdout


@pytest.mark.parametrize("args,flag", [
    (["--mtp-num-layers", "1", "--context-parallel-size", "2"], "--context-parallel-size"),
    (["--mtp-num-layers", "1", "--position-embedding-type", "learned_absolute"],
     "--position-embedding-type"),
    (["--mtp-num-layers", "0"], "--mtp-num-layers"),
    (["--mtp-num-layer", "1"], "--mtp-num-layers"),
], ids=["cp2", "learned_absolute", "mtp0", "typo"])
def test_rejected_config_exits_quickly_with_the_message(args, flag, tmp_path):
    start = time.time()
    run = launch(args, output_dir=str(tmp_path), nproc=2)
    assert run.returncode != 0
    assert flag in run.stderr
    # torchrun reports a failed worker with its own ChildFailedError traceback; ours
    # must not appear: no frame from our package or megatron-core, no rank traceback.
    output = run.stderr + run.stdout
    assert "[rank0]: Traceback" not in output
    assert "mtp_megatron/" not in output and "megatron/core" not in output
    assert time.time() - start < 60

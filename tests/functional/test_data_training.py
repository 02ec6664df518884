"""End to end on real text: preprocess, train with D=2, validate with MTP acceptance.

Also: the default run (no --data-path, no --mock-data) trains on the embedded
standard-library corpus, and data mistakes end before training with the flag to fix.
"""

import glob
import importlib.util
import json
import math
import os
import subprocess
import sys
import sysconfig

import pytest

from tests.functional.launcher import ROOT, TINY, launch

pytestmark = pytest.mark.functional

STDLIB = sysconfig.get_paths()["stdlib"]
ACCEPTANCE = ("mtp_1 acceptance", "mtp_2 acceptance", "chained_2 acceptance")


@pytest.fixture(scope="module")
def text_set(tmp_path_factory):
    """The json and email packages of the standard library, as a preprocessed dataset."""
    out = tmp_path_factory.mktemp("text")
    prefix = str(out / "code")
    proc = subprocess.run(
        [sys.executable, "-m", "mtp_megatron.data.preprocess", "--input",
         os.path.join(STDLIB, "json"), os.path.join(STDLIB, "email"), "--pattern", "*.py",
         "--output-prefix", prefix, "--workers", "2", "--no-progress"],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "documents" in proc.stdout and os.path.exists(prefix + ".idx")
    return prefix


def test_tp1_mtp2_validation_loss_drops_on_text(text_set, tmp_path):
    # validation goes through the training run's writers: wandb too, offline (no network)
    wandb = importlib.util.find_spec("wandb") is not None
    extra = ["--wandb-project", "mtp-test"] if wandb else []
    run = launch(TINY + ["--mtp-num-layers", "2", "--train-iters", "50", "--log-interval", "10",
                         "--data-path", text_set, "--split", "90,10,0",
                         "--data-cache-path", str(tmp_path / "cache"),
                         "--eval-interval", "10", "--eval-iters", "2"] + extra,
                 output_dir=str(tmp_path / "run"), env={"WANDB_MODE": "offline",
                                                        "WANDB_SILENT": "true"})
    assert run.returncode == 0, run
    if wandb:
        (history,) = glob.glob(str(tmp_path / "run" / "wandb" / "wandb" / "offline-run-*"
                                   / "run-*.wandb"))
        records = open(history, "rb").read()
        for tag in (b"mtp_2 loss", b"lm loss validation", b"chained_2 acceptance validation"):
            assert tag in records, tag
    valid = run.metrics("valid")
    assert [r["iteration"] for r in valid] == [10, 20, 30, 40, 50]  # the end is not repeated
    first, last = valid[0], valid[-1]
    assert last["lm loss"] < first["lm loss"] - 0.3, valid
    assert last["lm loss"] < math.log(258)  # better than uniform over bytes
    assert last["lm PPL"] == pytest.approx(math.exp(last["lm loss"]), rel=1e-6)
    assert last["mtp_1 loss"] < first["mtp_1 loss"]
    for row in valid:
        for key in ACCEPTANCE:
            assert 0.0 <= row[key] <= 1.0
        assert row["chained_2 acceptance"] <= min(row["mtp_1 acceptance"],
                                                  row["mtp_2 acceptance"]) + 1e-9
    assert last["mtp_1 acceptance"] > 0.1  # spaces, indentation, keywords
    assert "validation at iteration 50 | lm loss" in run.stdout
    assert "chained_2 acceptance" in run.stdout


def test_default_run_uses_the_embedded_corpus(tmp_path):
    cache = tmp_path / "cache"
    run = launch(TINY + ["--mtp-num-layers", "1", "--train-iters", "10", "--eval-iters", "1",
                         "--data-cache-path", str(cache)],
                 output_dir=str(tmp_path / "run"))
    assert run.returncode == 0, run
    assert "data: embedded corpus: Python standard library" in run.stdout
    assert glob.glob(str(cache / "corpus" / "stdlib-py*" / "stdlib.bin"))
    (row,) = run.metrics("valid")
    assert row["iteration"] == 10 and 0.0 <= row["mtp_1 acceptance"] <= 1.0
    assert row["lm loss"] < math.log(384)  # learned something in 10 steps


def test_missing_dataset_fails_before_training(tmp_path):
    run = launch(TINY + ["--data-path", str(tmp_path / "nothing"), "--train-iters", "5"],
                 output_dir=str(tmp_path / "run"))
    assert run.returncode != 0, run  # the rank exits 2; torchrun reports 1
    assert "--data-path" in run.stderr and "nothing.bin is missing" in run.stderr
    assert "iteration 1/" not in run.stdout


@pytest.fixture(scope="module")
def three_sets(tmp_path_factory):
    """Three small byte-level datasets (different text, different sizes)."""
    from mtp_megatron.data.preprocess import preprocess

    out = tmp_path_factory.mktemp("blend")
    prefixes = []
    for name, docs in (("a", 80), ("b", 50), ("c", 30)):
        src = out / f"{name}.jsonl"
        with open(src, "w") as fh:
            for i in range(docs):
                fh.write(json.dumps({"text": f"{name} = {i} * {name}{i % 5}\n" * 3}) + "\n")
        preprocess([str(src)], str(out / name), progress=False)
        prefixes.append(str(out / name))
    return prefixes


@pytest.mark.parametrize("form", ["weights_3", "sizes_2"])
def test_blends_train_and_validate(three_sets, tmp_path, form):
    """Regression: any blend of >= 2 datasets crashed at step 1 (numpy dataset_id)."""
    a, b, c = three_sets
    blend = ["0.5", a, "0.3", b, "0.2", c] if form == "weights_3" else [a, b]
    run = launch(TINY + ["--mtp-num-layers", "1", "--train-iters", "3", "--data-path", *blend,
                         "--split", "80,20,0", "--data-cache-path", str(tmp_path / "cache"),
                         "--eval-interval", "3", "--eval-iters", "1"],
                 output_dir=str(tmp_path / "run"), torchrun=False)
    assert run.returncode == 0, run
    assert [r["iteration"] for r in run.metrics()] == [1, 2, 3]
    (valid,) = run.metrics("valid")
    assert math.isfinite(valid["lm loss"]) and valid["lm loss"] < math.log(258)

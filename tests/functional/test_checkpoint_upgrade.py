"""Checkpoints cross the megatron-core upgrade: what 0.16.1 saved loads and resumes on the
installed release (0.19.2 in ``make test``; 0.16.1 itself in ``make test-compat``).

The fixtures (tests/upgrade_fixture.py: MTP D=2 with TP2, fp32 and bf16 + distributed
optimizer, saved at iteration 4 of 6 by megatron-core 0.16.1) carry a digest of every
weight as 0.16.1 loaded it back, of the files its ``hf export`` wrote, and of the weights
its ``hf import`` gave back. Here: the same digests, and a resume that repeats the saved
run's iterations 5 and 6.
"""

import json
import os
import shutil

import pytest

from mtp_megatron.training.writers import read_run
from tests.dist_utils import spawn
from tests.functional.launcher import launch
from tests.upgrade_fixture import CASES, FIXTURES, MODEL, SAVED_AT, TRAIN_ITERS

pytestmark = [pytest.mark.functional, pytest.mark.compat]

# The resumed run's losses against 0.16.1's straight run. On 0.16.1 the resume is
# bit-exact (tests/functional/test_precision_resume.py); across releases the maths is the
# same but megatron-core may order a reduction differently.
RESUME_TOL = {"fp32_tp2": 1e-5, "bf16_distopt_tp2": 1e-3}


def _digest(case):
    with open(os.path.join(FIXTURES, case, "digest.json")) as fh:
        return json.load(fh)


def _weights(rank, world_size, path):
    from tests.upgrade_fixture import weights_digest

    return weights_digest(path)


def _hf(rank, world_size, path, work):
    from tests.upgrade_fixture import hf_digests

    return hf_digests(path, work)


def test_the_fixtures_were_saved_by_megatron_core_0_16():
    for case in CASES:
        digest = _digest(case)
        assert digest["megatron_core"].startswith("0.16.")
        assert any(k.startswith("mtp.layers.1.") for k in digest["weights"])  # D=2


@pytest.mark.parametrize("case", sorted(CASES))
def test_weights_load_exactly_as_saved_mtp_layers_included(case):
    seen = spawn(1, _weights, os.path.join(FIXTURES, case, "ck"))[0]
    expected = _digest(case)["weights"]
    assert sorted(seen) == sorted(expected)
    differ = [k for k in expected if seen[k] != expected[k]]
    assert not differ, f"weights that differ from what megatron-core 0.16.1 loaded: {differ}"


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_resume_continues_the_saved_run(case, tmp_path):
    """Iterations 5 and 6 after loading the optimizer, scheduler and RNG saved at 4."""
    ck = tmp_path / "ck"
    shutil.copytree(os.path.join(FIXTURES, case, "ck"), ck)
    run = launch(MODEL + CASES[case] + ["--save", str(ck), "--save-interval", "100"],
                 output_dir=str(tmp_path / "run"), nproc=2)
    assert run.returncode == 0, run
    assert f"loaded checkpoint {ck}/iter_{SAVED_AT:07d}" in run.stdout
    train, _ = read_run(os.path.join(FIXTURES, case))
    straight = {r["iteration"]: r for r in train}
    resumed = {r["iteration"]: r for r in run.metrics()}
    assert sorted(resumed) == list(range(SAVED_AT + 1, TRAIN_ITERS + 1))
    for it, row in resumed.items():
        for key in ("lm loss", "mtp_1 loss", "mtp_2 loss"):
            assert row[key] == pytest.approx(straight[it][key], abs=RESUME_TOL[case]), (it, key)
        assert row["lr"] == straight[it]["lr"]  # the scheduler's state came along


def test_hf_export_and_import_give_the_same_files(tmp_path):
    seen = spawn(1, _hf, os.path.join(FIXTURES, "fp32_tp2", "ck"), str(tmp_path))[0]
    expected = _digest("fp32_tp2")
    assert seen["export"] == expected["export"]
    assert seen["import"] == expected["import"]

"""The mission command, exactly as a user types it, with the defaults."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.functional.launcher import ROOT

pytestmark = pytest.mark.functional


def test_torchrun_pretrain_gpt_mtp_with_one_mtp_layer():
    out = os.path.join(ROOT, "runs", "default")
    shutil.rmtree(out, ignore_errors=True)
    cmd = [os.path.join(os.path.dirname(sys.executable), "torchrun"),
           "launch/pretrain_gpt_mtp.py", "--mtp-num-layers", "1"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    train = [r for r in rows if r.get("split") is None]
    valid = [r for r in rows if r.get("split") == "valid"]
    assert train[-1]["iteration"] == 200
    assert train[-1]["lm loss"] < train[0]["lm loss"] - 1.0
    assert "mtp_1 loss" in train[-1] and "mtp_2 loss" not in train[-1]
    assert valid and valid[-1]["iteration"] == 200
    assert os.path.isfile(os.path.join(out, "config.yaml"))

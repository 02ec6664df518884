"""The mission command, exactly as a user types it, with the defaults.

It runs in a temporary directory (the default --output-dir, runs/default, is relative
to it), so the tests never touch a user's runs/.
"""

import os
import re
import subprocess
import sys

import pytest

from mtp_megatron.runtime.strict_device import STRICT_ENV
from mtp_megatron.training.writers import read_run
from tests.functional.launcher import ROOT

pytestmark = [pytest.mark.functional, pytest.mark.compat]  # also on the 0.16.1 floor


def test_torchrun_pretrain_gpt_mtp_with_one_mtp_layer(tmp_path):
    out = os.path.join(tmp_path, "runs", "default")
    cmd = [os.path.join(os.path.dirname(sys.executable), "torchrun"),
           os.path.join(ROOT, "launch", "pretrain_gpt_mtp.py"), "--mtp-num-layers", "1"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    env.pop(STRICT_ENV, None)  # exactly as a user runs it: no strict device mode
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=900,
                          env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # progress before the first log line, then elapsed time and an ETA on every line
    for message in ("building datasets ...", "first iteration (1) ...",
                    "first iteration (1): done in"):
        assert message in proc.stdout, proc.stdout[:3000]
    assert re.search(r"iteration 200/200 \| elapsed \d+:\d\d:\d\d \| ETA 0:00:00 \| lm loss",
                     proc.stdout), proc.stdout[-3000:]
    train, valid = read_run(out)
    assert train[-1]["iteration"] == 200 and train[-1]["tokens"] == 200 * 16 * 128
    assert train[-1]["lm loss"] < train[0]["lm loss"] - 1.0
    assert "mtp_1 loss" in train[-1] and "mtp_2 loss" not in train[-1]
    # training acceptance on the log line where megatron-core's tracker counts hits (0.19)
    from mtp_megatron.runtime import mcore_compat

    if mcore_compat.line() == "0.19":
        assert 0.0 < train[-1]["mtp_1 acceptance"] < 1.0
        assert "| mtp_1 acceptance 0." in proc.stdout
    else:
        assert "mtp_1 acceptance" not in train[-1]
    # megatron-core's start-up notices that say nothing actionable here are not printed
    for notice in ("GPTModel IS DEPRECATED", "No CUDA runtime is found", "absl.logging",
                   "MimoModelConfig", "async save is deprecated"):
        assert notice not in proc.stdout + proc.stderr, notice
    assert valid and valid[-1]["iteration"] == 200
    assert os.path.isfile(os.path.join(out, "config.yaml"))

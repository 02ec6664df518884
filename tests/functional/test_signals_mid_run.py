"""Signals under torchrun at the awkward moments (issue 19 items 3 and 7).

* SIGTERM to torchrun during a long evaluation (``--eval-iters`` far beyond the 30 s
  torchrun waits before killing its workers): the workers abandon the evaluation, save
  and record ``stopped.json`` (it used to run on, be killed, and save nothing);
* Ctrl-C (SIGINT to the whole process group) with ``--exit-signal-handler``: saved like
  SIGTERM (it was a KeyboardInterrupt traceback from inside megatron-core, nothing saved);
* Ctrl-C without it: one ``error: interrupted`` line per worker, exit 130, no traceback,
  and the workers gone at once (not killed by torchrun 30 s later).

Each test is one 2-rank torchrun of the tiny model on mock data (~15 s here).
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from mtp_megatron.training.writers import read_rows
from tests.functional.launcher import LAUNCHER, ROOT, TINY, launch_env

pytestmark = pytest.mark.functional

ARGS = TINY + ["--mtp-num-layers", "1", "--mock-data", "--train-iters", "100000"]
GRACE_S = 30  # torchrun kills workers this long after forwarding a signal
# The first agreement after the signal may come before a rank's own handler has run.
OTHER = "another rank asked to stop"


def _signalled(tmp_path, extra, send, marker="iteration 3/", timeout=240):
    """Start torchrun (2 ranks) in its own process group, call ``send(proc)`` once
    ``marker`` is logged; returns (output after the signal, seconds to exit, rc)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           "2", LAUNCHER, *ARGS, *extra, "--save", str(tmp_path / "ck"),
           "--output-dir", str(tmp_path / "out")]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=launch_env(), start_new_session=True)
    try:
        seen = []
        for line in proc.stdout:
            seen.append(line)
            if marker in line:
                break
        assert marker in "".join(seen[-1:]), "".join(seen[-40:])
        time.sleep(0.5)  # into the evaluation (or the next step)
        start = time.monotonic()
        send(proc)
        rest = proc.stdout.read()
        rc = proc.wait(timeout=timeout)
        return rest, time.monotonic() - start, rc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _stop_record(tmp_path):
    path = tmp_path / "out" / "stopped.json"
    return json.loads(path.read_text()) if path.exists() else None


def _tracker(tmp_path):
    path = tmp_path / "ck" / "latest_checkpointed_iteration.txt"
    return int(path.read_text()) if path.exists() else None


def test_sigterm_to_torchrun_during_a_long_evaluation_saves(tmp_path):
    rest, seconds, _ = _signalled(
        tmp_path, ["--eval-interval", "3", "--eval-iters", "100000", "--exit-signal-handler"],
        lambda proc: proc.send_signal(signal.SIGTERM))
    assert seconds < GRACE_S, (seconds, rest[-3000:])
    assert "validation at iteration 3 stopped after" in rest, rest[-3000:]
    assert "nothing reported" in rest
    assert _tracker(tmp_path) == 3, rest[-3000:]
    record = _stop_record(tmp_path)
    reason = record.pop("reason")
    assert reason in ("received SIGTERM", OTHER) and "received SIGTERM" in rest + reason
    assert record == {"iteration": 3, "saved": True,
                      "checkpoint": str(tmp_path / "ck" / "iter_0000003")}
    rows = read_rows(str(tmp_path / "out"))
    assert not [r for r in rows if r.get("split") == "valid"]  # nothing half-evaluated


def test_ctrl_c_with_the_exit_signal_handler_saves(tmp_path):
    rest, seconds, _ = _signalled(tmp_path, ["--exit-signal-handler"],
                                  lambda proc: os.killpg(proc.pid, signal.SIGINT))
    stopped = _tracker(tmp_path)
    assert stopped is not None and stopped >= 3, rest[-3000:]
    assert f"stopping after iteration {stopped}: " in rest, rest[-3000:]
    record = _stop_record(tmp_path)
    assert record["saved"] is True and record["iteration"] == stopped
    assert "received SIGINT" in (rest + record["reason"])  # some rank names Ctrl-C
    assert "KeyboardInterrupt" not in rest and "megatron/core" not in rest, rest[-3000:]
    assert seconds < GRACE_S


def test_ctrl_c_without_it_is_one_line_and_a_quick_exit(tmp_path):
    rest, seconds, _ = _signalled(tmp_path, [],
                                  lambda proc: os.killpg(proc.pid, signal.SIGINT))
    lines = [line for line in rest.splitlines() if line.startswith("error: interrupted")]
    assert 1 <= len(lines) <= 2, rest[-3000:]  # one per worker (torchrun may be faster)
    assert "nothing saved since the last checkpoint" in lines[0]
    assert "--exit-signal-handler" in lines[0]
    assert "KeyboardInterrupt" not in rest and "megatron/core" not in rest, rest[-3000:]
    assert seconds < GRACE_S, (seconds, rest[-3000:])  # not killed by torchrun at 30 s
    assert _tracker(tmp_path) is None and _stop_record(tmp_path) is None
    assert not os.path.exists(tmp_path / "ck" / ".save.lock")  # released for the next run

"""The launcher under srun-style variables only (no torchrun): 2 CPU ranks train.

Each rank is a plain ``python launch/pretrain_gpt_mtp.py`` with SLURM_PROCID,
SLURM_LOCALID, SLURM_NTASKS, SLURM_JOB_NODELIST and SLURM_JOB_ID set, as ``srun
--ntasks-per-node=2`` would; the rendezvous port comes from the job id. The SLURM
scripts' exit signal (SIGUSR1) arriving during start-up stops the run before its first
step. tests/slurm runs the same launcher under a real Slurm.
"""

import json
import os
import signal
import socket
import subprocess
import sys

import pytest

from tests.functional.launcher import LAUNCHER, ROOT, TINY, Run

pytestmark = pytest.mark.functional

TORCHRUN_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                 "LOCAL_WORLD_SIZE", "GROUP_RANK", "TORCHELASTIC_RUN_ID")


def _job_id_with_free_port() -> int:
    """A job id whose derived port (20000 + id mod 20000) is free right now."""
    for port in range(20000 + os.getpid() % 15000, 40000):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        return 1_000_000 + port - 20000
    raise RuntimeError("no free port in 20000..39999")


def _slurm_env(**slurm):
    env = {k: v for k, v in os.environ.items()
           if k not in TORCHRUN_VARS and not k.startswith("SLURM_")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.update({k: str(v) for k, v in slurm.items()})
    return env


def _srun(args, ntasks, output_dir, **slurm):
    """Start ``ntasks`` launcher processes the way srun would; wait for all."""
    procs = []
    for rank in range(ntasks):
        env = _slurm_env(SLURM_PROCID=rank, SLURM_LOCALID=rank, SLURM_NTASKS=ntasks,
                         **slurm)
        procs.append(subprocess.Popen(
            [sys.executable, LAUNCHER, *args, "--output-dir", output_dir], cwd=ROOT, env=env,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    runs = []
    for proc in procs:
        try:
            out, err = proc.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
        runs.append(Run(proc.returncode, out, err, output_dir))
    return runs


def test_slurm_dp2_mtp1_trains_without_torchrun(tmp_path):
    job = _job_id_with_free_port()
    args = TINY + ["--mtp-num-layers", "1", "--mock-data", "--train-iters", "3"]
    runs = _srun(args, 2, str(tmp_path), SLURM_JOB_ID=job, SLURM_JOB_NODELIST="localhost")
    for run in runs:
        assert run.returncode == 0, run
    rows = runs[-1].metrics()
    assert [r["iteration"] for r in rows] == [1, 2, 3], runs[-1]
    assert all(0 < r["lm loss"] < 20 and 0 < r["mtp_1 loss"] < 20 for r in rows)
    assert os.path.exists(tmp_path / "config.yaml")  # written by rank 0 only


@pytest.mark.parametrize("drop,bad,message", [
    ("SLURM_LOCALID", {}, "SLURM_LOCALID=None is not allowed (missing; set by srun"),
    (None, {"SLURM_PROCID": "one"}, "SLURM_PROCID='one' is not allowed"),
    (None, {"SLURM_NTASKS": "2x"}, "SLURM_NTASKS='2x' is not allowed"),
    (None, {"SLURM_PROCID": "2"}, "SLURM_PROCID=2 is not allowed. Allowed: less than"),
    ("SLURM_JOB_ID", {}, "SLURM_JOB_ID=None is not allowed"),
])
def test_bad_slurm_variables_fail_fast_and_name_the_variable(tmp_path, drop, bad, message):
    slurm = {"SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NTASKS": "2",
             "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "localhost"}
    slurm.update(bad)
    slurm.pop(drop, None)
    done = subprocess.run(
        [sys.executable, LAUNCHER, *TINY, "--output-dir", str(tmp_path)], cwd=ROOT,
        env=_slurm_env(**slurm), capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    assert message in done.stderr
    assert "Traceback" not in done.stderr


def _train_until_signalled(args, output_dir, *, on_line="preparing data ..."):
    """Run the launcher as one srun task would; send SIGUSR1 (the SLURM scripts' exit
    signal) as soon as it prints ``on_line``: during start-up, after its handler is set."""
    env = _slurm_env(SLURM_PROCID=0, SLURM_LOCALID=0, SLURM_NTASKS=1,
                     SLURM_JOB_ID=_job_id_with_free_port(), SLURM_JOB_NODELIST="localhost")
    proc = subprocess.Popen(
        [sys.executable, LAUNCHER, *args, "--exit-signal-handler", "--exit-signal", "SIGUSR1",
         "--output-dir", output_dir], cwd=ROOT, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if on_line in line:
                proc.send_signal(signal.SIGUSR1)
        proc.wait(timeout=120)
    finally:
        proc.kill()
    return proc.returncode, "".join(lines)


@pytest.mark.parametrize("resumed", [False, True], ids=["fresh", "resumed"])
def test_exit_signal_during_startup_stops_before_the_first_iteration(tmp_path, resumed):
    """A time-limit signal can come before training starts (Slurm checks limits every
    30 s, and sends it early): the run stops cleanly before its first step, saves nothing
    new, and stopped.json says whether the checkpoint on disk is this iteration's."""
    ck = str(tmp_path / "ck")
    args = TINY + ["--mtp-num-layers", "1", "--mock-data", "--save", ck]
    start = 0
    if resumed:
        first = _srun(args + ["--train-iters", "3"], 1, str(tmp_path / "first"),
                      SLURM_JOB_ID=_job_id_with_free_port(), SLURM_JOB_NODELIST="localhost")
        assert first[0].returncode == 0, first[0]
        start = 3
    longer = ["--train-iters", "50"] + (["--override-opt-param-scheduler"] if resumed else [])
    rc, out = _train_until_signalled(args + longer, str(tmp_path / "run"))
    assert rc == 0, out
    assert f"stopping before iteration {start + 1}: received SIGUSR1 during start-up" in out
    assert "Traceback" not in out and "iteration 1/" not in out
    with open(tmp_path / "run" / "stopped.json") as fh:
        record = json.load(fh)
    assert record == {
        "iteration": start, "reason": "received SIGUSR1 during start-up", "saved": resumed,
        "checkpoint": os.path.join(ck, "iter_0000003") if resumed else None}
    assert sorted(os.listdir(ck)) == (["iter_0000003", "latest_checkpointed_iteration.txt"]
                                      if resumed else [])

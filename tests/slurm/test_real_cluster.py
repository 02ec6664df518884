"""The SLURM scripts on a real two-node Slurm (tests/slurm/cluster.py), CPU nodes, gloo.

Every job goes through launch/slurm/submit.sh. The long scenarios (a time limit, two
preemptions, a chain) mostly wait on Slurm, so they start first and run in background
threads (:class:`tests.slurm.jobs.Background`) while the other tests run; the tests at
the end of this file collect them. Their steps are stretched with the test hook
MTP_MEGATRON_STEP_DELAY_S (a sleep per step; numbers unchanged), so a tiny model still
spans several jobs.

Every comparison is exact: per-iteration losses from metrics.jsonl, and every tensor of
the final checkpoint against a run of the same flags under ``torchrun --nproc-per-node N``
on one machine.
"""

from __future__ import annotations

import os
import pathlib
import re
import time

import pytest
import torch

from tests.functional.launcher import ROOT
from tests.slurm.jobs import (
    FLAGS,
    KEYS,
    LONG,
    SHORT,
    STEP_DELAY,
    SUBMIT,
    Background,
    latest_checkpoint,
    metrics,
    stop_record,
    tensors,
    train_locally,
)

pytestmark = [pytest.mark.slurm, pytest.mark.functional]

# -- runs on one machine, the references --------------------------------------------------

@pytest.fixture(scope="module")
def reference(slurm):
    """``reference(args, nproc)``: the run of these flags under local torchrun, trained
    once per module."""
    runs = {}

    def get(name, args, nproc):
        if (name, nproc) not in runs:
            out = pathlib.Path(slurm.runs) / f"local-{name}-{nproc}"
            train_locally(slurm.cluster, list(args) + ["--save", str(out / "ck")], nproc,
                          str(out / "run"))
            runs[name, nproc] = str(out)
        return runs[name, nproc]

    return get


def _assert_same_losses(run_dirs, expected_dir, iterations):
    """Each iteration's logged numbers, gathered over the job directories of a run (a
    resumed run logs the rest), equal the reference's bit for bit."""
    got = {}
    for run_dir in run_dirs:
        got.update(metrics(run_dir))
    want = metrics(expected_dir)
    assert sorted(got) == list(iterations), sorted(got)
    for it in iterations:
        assert {k: got[it][k] for k in KEYS} == {k: want[it][k] for k in KEYS}, it


def _assert_same_tensors(checkpoint, expected_checkpoint):
    got, want = tensors(checkpoint), tensors(expected_checkpoint)
    assert sorted(got) == sorted(want)
    different = [k for k in want if not torch.equal(got[k], want[k])]
    assert not different, different[:5]


# -- the long scenarios, started first ----------------------------------------------------

TIME_LIMIT = "time-limit"


def _submit_time_limited(slurm):
    """srun mode, ``--time 2 --signal-before 5``: Slurm's own time-limit signal, which
    comes 85 to 115 s after the start (Slurm checks limits every 30 s and signals when
    the remaining time is within the offset plus that period). 60 steps of 2 s cannot
    finish before it."""
    (job,) = slurm.submit("--name", TIME_LIMIT, "--time", "2", "--signal-before", "5",
                          args=LONG, env={STEP_DELAY: "2.0"})
    return job


def _time_limit(slurm, job):
    """Each start is signalled before its limit, saves and requeues itself, until a start
    finishes the run (one or two requeues)."""
    return job, slurm.wait(TIME_LIMIT, job, timeout=600)


def _preempt(slurm, mode):
    """Preemption by hand (``scancel --batch --signal=USR1``, what the time limit sends):
    once as soon as the batch script runs (before training), once in mid-run."""
    name = f"preempt-{mode}"
    (job,) = slurm.submit("--mode", mode, "--name", name, args=LONG, env={STEP_DELAY: "0.5"})

    def requeued(times):
        _wait_for(lambda: int(slurm.cluster.job(job).get("Restarts", "0")) >= times,
                  120 + slurm.cluster.queue_wait,
                  f"job {job} to requeue", lambda: slurm.describe(name, job))

    # early: the batch script has printed its first line, so its trap is set
    _wait_for(lambda: re.search(r"job \d+: 2 nodes", slurm.output(name, job)),
              120 + slurm.cluster.queue_wait, f"job {job} to start",
              lambda: slurm.describe(name, job))
    slurm.cluster.run(["scancel", "--batch", "--signal=USR1", job])
    requeued(1)
    slurm.wait_for_log(name, job, r"iteration 2[0-9]/60", restart=1, timeout=180)
    slurm.cluster.run(["scancel", "--batch", "--signal=USR1", job])
    requeued(2)
    return job, slurm.wait(name, job, timeout=300)


def _chain(slurm):
    """Three jobs of one name (``--chain 3``, --dependency=singleton) under a short
    --time, each ending by itself after 20 iterations (--exit-interval), well before its
    time-limit signal (at least 200 s in, while a start can take 70 s here)."""
    name = "chain"
    jobs = slurm.submit("--name", name, "--chain", "3", "--time", "4", "--signal-before",
                        "10", args=LONG + ["--exit-interval", "20"])
    return jobs, [slurm.wait(name, job, timeout=400) for job in jobs]


@pytest.fixture(scope="module", autouse=True)
def background(slurm, request):
    # The time-limited job first, alone until it trains: ten jobs starting at once on two
    # cores can take longer than its first start's 85 s to reach the first iteration.
    job = _submit_time_limited(slurm)
    slurm.wait_for_log(TIME_LIMIT, job, r"iteration 1/60", timeout=180)
    limit = 900 + 4 * slurm.cluster.queue_wait
    scenarios = {
        "time_limit": Background("time limit", lambda: _time_limit(slurm, job), limit),
        "preempt-srun": Background("preempt srun", lambda: _preempt(slurm, "srun"), limit),
        "preempt-torchrun": Background("preempt torchrun", lambda: _preempt(slurm, "torchrun"),
                                       limit),
        "chain": Background("chain", lambda: _chain(slurm), limit),
    }
    yield scenarios
    lines = []
    for name, scenario in scenarios.items():  # a failed test must not leave a thread behind
        try:
            scenario.result()
        except BaseException:  # reported by its own test
            pass
        if scenario.seconds is not None:
            lines.append(f"slurm scenario {name}: {scenario.seconds:.0f} s (in the background)")
    plugins = request.config.pluginmanager
    report, capture = plugins.get_plugin("terminalreporter"), plugins.get_plugin("capturemanager")
    if report and capture:
        with capture.global_and_fixture_disabled():
            for line in lines:
                report.write_line(line)


# -- (f) the plan --------------------------------------------------------------------------

def test_plan_only_for_two_nodes(slurm):
    done = slurm.cluster.run(["bash", SUBMIT, "--nodes", "2", "--gpus-per-node", "0",
                              "--ranks-per-node", "2", "--plan-only", "--", *FLAGS],
                             env=slurm.env({"PYTHON": slurm.env()["MTP_PYTHON"]}))
    assert "Plan for 4 GPUs: TP 1 x CP 1 x DP 4 x PP 1" in done.stdout, done.stdout
    done = slurm.cluster.run(["bash", SUBMIT, "--nodes", "2", "--gpus-per-node", "8",
                              "--config", "examples/tp2_pp2_mtp2.yaml", "--plan-only"],
                             env=slurm.env({"PYTHON": slurm.env()["MTP_PYTHON"]}), cwd=ROOT)
    assert "Plan for 16 GPUs: TP 2 x CP 1 x DP 4 x PP 2" in done.stdout, done.stdout


# -- (a) the same losses as one machine ---------------------------------------------------

LAYOUTS = {"srun-2x1": ("srun", 1), "torchrun-2x1": ("torchrun", 1),
           "srun-2x2": ("srun", 2), "torchrun-2x2": ("torchrun", 2)}


@pytest.fixture(scope="module")
def layout_runs(slurm):
    """The four layouts, submitted together, 6 iterations each."""
    jobs = {}
    for name, (mode, ranks) in LAYOUTS.items():
        (jobs[name],) = slurm.submit("--mode", mode, "--ranks-per-node", str(ranks),
                                     "--name", f"losses-{name}", args=SHORT)
    return {name: (job, slurm.wait(f"losses-{name}", job)) for name, job in jobs.items()}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_losses_equal_torchrun_on_one_machine(slurm, layout_runs, reference, layout):
    job, info = layout_runs[layout]
    name = f"losses-{layout}"
    assert info["JobState"] == "COMPLETED", slurm.describe(name, job)
    (run_dir,) = slurm.run_dirs(name)
    nproc = 2 * LAYOUTS[layout][1]
    expected = reference("short", SHORT, nproc)
    _assert_same_losses([run_dir], os.path.join(expected, "run"), range(1, 7))
    assert info["NodeList"] == "node[1-2]"


# -- (c) scancel ----------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["srun", "torchrun"])
def test_scancel_ends_the_job_and_leaves_no_process(slurm, mode):
    name = f"scancel-{mode}"
    (job,) = slurm.submit("--mode", mode, "--name", name, args=LONG, env={STEP_DELAY: "0.5"})
    slurm.wait_for_log(name, job, r"iteration 3/60")
    cancelled = time.time()
    slurm.cluster.run(["scancel", job])
    info = slurm.wait(name, job, timeout=60)  # also waits for every process to end
    assert info["JobState"] == "CANCELLED" and info["Restarts"] == "0", slurm.describe(name, job)
    assert time.time() - cancelled < 45  # KillWait (30 s) and a loaded machine's slack
    assert slurm.cluster.leftovers(job) == []
    assert "requeueing" not in slurm.output(name, job)


# -- (d) a node lost mid-run ----------------------------------------------------------------

def test_node_lost_mid_run_fails_fast_and_a_resubmission_resumes(slurm, reference):
    name = "node-lost"
    (job,) = slurm.submit("--name", name, args=LONG, env={STEP_DELAY: "0.3"})
    ckpt = os.path.join(slurm.runs, name, "checkpoints")
    _wait_for(lambda: os.path.exists(os.path.join(ckpt, "iter_0000020")),
              180 + slurm.cluster.queue_wait,
              "the checkpoint of iteration 20", lambda: slurm.describe(name, job))
    second_node = slurm.cluster.run(["scontrol", "show", "hostnames",
                                     slurm.cluster.job(job)["NodeList"]]).stdout.split()[1]
    killed_at = time.time()
    assert slurm.kill_training_on(job, second_node).split(), "no process to kill"
    info = slurm.wait(name, job, timeout=120)
    ended = time.time() - killed_at
    committed = int(open(os.path.join(ckpt, "latest_checkpointed_iteration.txt")).read())
    out = slurm.output(name, job)
    assert info["JobState"] == "FAILED", slurm.describe(name, job)
    assert ended < 60, ended  # not the 10-minute distributed timeout
    assert re.search(r"error: the training step failed with exit \d+ .* The last committed "
                     rf"checkpoint is iteration {committed} in {re.escape(ckpt)}: submit again "
                     rf"with the same job name \({name}\)", out), out
    assert "requeueing" not in out

    (again,) = slurm.submit("--name", name, args=LONG)  # no delay: finish quickly
    info = slurm.wait(name, again)
    assert info["JobState"] == "COMPLETED", slurm.describe(name, again)
    resumed = slurm.run_dirs(name)[-1]
    assert min(metrics(resumed)) == committed + 1
    assert f"resuming from {ckpt} (iteration {committed})" in slurm.output(name, again)
    expected = reference("long", LONG, 2)
    _assert_same_losses([resumed], os.path.join(expected, "run"), range(committed + 1, 61))
    _assert_same_tensors(latest_checkpoint(ckpt), latest_checkpoint(os.path.join(expected, "ck")))


# -- (b) a time limit, and preemption: save, requeue, resume, finish --------------------------

def test_time_limit_saves_requeues_and_resumes_to_the_same_weights(slurm, background,
                                                                    reference):
    job, info = background["time_limit"].result()
    name = TIME_LIMIT
    assert info["JobState"] == "COMPLETED" and int(info["Restarts"]) >= 1, \
        slurm.describe(name, job)
    runs = slurm.run_dirs(name)
    out = slurm.output(name, job)
    assert "SIGUSR1: time limit or preemption ahead" in out, out
    # the first start was training when Slurm signalled it (the fixture waited for that,
    # and the signal comes at least 85 s in); a later start may be signalled too
    record = stop_record(runs[0])
    assert record["saved"] and record["reason"] == "received SIGUSR1", record
    assert 0 < record["iteration"] < 60 and os.path.isdir(record["checkpoint"]), record
    ckpt = os.path.join(slurm.runs, name, "checkpoints")
    assert f"resuming from {ckpt} (iteration {record['iteration']})" in out
    expected = reference("long", LONG, 2)
    _assert_same_losses(runs, os.path.join(expected, "run"), range(1, 61))
    _assert_same_tensors(latest_checkpoint(ckpt), latest_checkpoint(os.path.join(expected, "ck")))


@pytest.mark.parametrize("mode", ["srun", "torchrun"])
def test_preemption_early_and_mid_run_requeues_and_resumes(slurm, background, reference, mode):
    job, info = background[f"preempt-{mode}"].result()
    name = f"preempt-{mode}"
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "2", slurm.describe(name, job)
    runs = slurm.run_dirs(name)
    out = slurm.output(name, job)
    # The early signal: before training started, or during start-up, or (if the launchers
    # were slow to install their handler, the batch script sends it again every 5 s) a
    # few iterations in. Either way the job stopped cleanly and requeued.
    early = stop_record(runs[0])
    if early is None:
        assert "the exit signal came before training started: not starting it" in out, out
    elif early["iteration"] == 0:
        assert early == {"iteration": 0, "reason": "received SIGUSR1 during start-up",
                         "saved": False, "checkpoint": None}
    else:
        assert early["saved"] and early["iteration"] < 20, early
    mid = stop_record(runs[1])
    assert mid["saved"] and mid["reason"] == "received SIGUSR1" and mid["iteration"] >= 20, mid
    assert min(metrics(runs[2])) == mid["iteration"] + 1
    assert out.count("requeueing") == 2 and "training step exited with 0" in out, out
    expected = reference("long", LONG, 2)
    _assert_same_losses(runs, os.path.join(expected, "run"), range(1, 61))
    ckpt = os.path.join(slurm.runs, name, "checkpoints")
    _assert_same_tensors(latest_checkpoint(ckpt), latest_checkpoint(os.path.join(expected, "ck")))


# -- (e) a chain of three jobs ----------------------------------------------------------------

def test_chain_of_three_jobs_finishes_the_run(slurm, background, reference):
    jobs, infos = background["chain"].result()
    name = "chain"
    assert len(jobs) == 3
    for job, info in zip(jobs, infos):
        assert info["JobState"] == "COMPLETED" and info["Restarts"] == "0", \
            slurm.describe(name, job)
    runs = slurm.run_dirs(name)
    assert [os.path.basename(d) for d in runs] == [f"{job}-r0" for job in jobs]
    assert [(min(metrics(d)), max(metrics(d))) for d in runs] == [(1, 20), (21, 40), (41, 60)]
    for run_dir, stop_at in zip(runs[:2], (20, 40)):
        assert stop_record(run_dir) == {
            "iteration": stop_at, "reason": "--exit-interval 20 reached", "saved": True,
            "checkpoint": os.path.join(slurm.runs, name, "checkpoints", f"iter_{stop_at:07d}")}
    # --dependency=singleton: one job of the name at a time
    for before, after in zip(infos, infos[1:]):
        assert after["StartTime"] >= before["EndTime"]
    expected = reference("long", LONG, 2)
    _assert_same_losses(runs, os.path.join(expected, "run"), range(1, 61))
    ckpt = os.path.join(slurm.runs, name, "checkpoints")
    _assert_same_tensors(latest_checkpoint(ckpt), latest_checkpoint(os.path.join(expected, "ck")))


def _wait_for(condition, timeout, what, details=lambda: ""):
    deadline = time.time() + timeout
    while not condition():
        if time.time() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}\n{details()}")
        time.sleep(0.3)

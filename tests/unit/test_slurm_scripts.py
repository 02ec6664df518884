"""The SLURM scripts: syntax, shellcheck, and the command lines they render.

The scripts run for real under bash with SLURM's variables set and stub ``srun``,
``scontrol``, ``sbatch``, ``nvidia-smi`` and ``python`` on PATH that record their
arguments and environment (JSON lines), so each test checks exactly what a cluster would
be asked to run. The stubs encode what real Slurm 22.05 does where it matters (srun
passes SIGUSR1 on to the tasks); tests/slurm runs the same scripts on a real cluster.
"""

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

# bash runs each script with stubbed cluster tools: processes, so not in `make test-fast`
pytestmark = pytest.mark.functional

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SLURM_DIR = os.path.join(ROOT, "launch", "slurm")
SCRIPTS = sorted(glob.glob(os.path.join(SLURM_DIR, "*"))) + [
    os.path.join(ROOT, "scripts", "ngc_tests.sh")]
IMAGE = "nvcr.io#nvidia/pytorch:26.06-py3"

STUB = r'''#!{python}
import json, os, re, signal, sys, time
tool, args = os.path.basename(sys.argv[0]), sys.argv[1:]
if tool == "python" and args[:1] == ["-"]:  # task.sh reading the config: the real python
    os.execv({python!r}, [{python!r}] + args)
keep = ("MTP_", "CUDA_DEVICE_MAX_CONNECTIONS", "PYTHONPATH", "NCCL_", "TORCH_NCCL")
env = {{k: v for k, v in os.environ.items() if k.startswith(keep)}}
def record(**extra):
    with open(os.environ["STUB_LOG"], "a") as fh:
        fh.write(json.dumps(dict(tool=tool, args=args, env=env, **extra)) + "\n")
record()
if tool == "scontrol" and args[:2] == ["show", "hostnames"]:
    time.sleep(float(os.environ.get("STUB_SLOW_SCONTROL", "0")))
    print("gpu01\ngpu02")
elif tool == "nvidia-smi":
    print(os.environ.get("STUB_CC", "9.0"))
elif tool == "sbatch":
    print(1000 + sum(1 for _ in open(os.environ["STUB_LOG"])))
elif tool == "srun" and os.environ.get("STUB_HANG") and "--label" in args:
    # The training step: its tasks start (task.sh writes one marker each), then wait for
    # SIGUSR1, which real srun passes on to every task.
    ntasks = int(next(a for a in args if a.startswith("--ntasks=")).split("=")[1])
    started = os.environ["MTP_TASKS_STARTED"]
    time.sleep(float(os.environ.get("STUB_START_S", "0")))
    for task in range(ntasks):
        open(os.path.join(started, str(task)), "w").close()
    ignore = [int(os.environ.get("STUB_IGNORE_SIGNALS", "0"))]
    def on_usr1(signum, frame):
        record(signal="USR1", markers=len(os.listdir(started)))
        if ignore[0]:  # a launcher still importing: the signal is ignored
            ignore[0] -= 1
            return
        if os.environ.get("STUB_STOPPED"):  # what the launcher writes after its save
            with open(os.path.join(os.path.dirname(started), "stopped.json"), "w") as fh:
                fh.write(os.environ["STUB_STOPPED"] + "\n")
        sys.exit(int(os.environ.get("STUB_RC_AFTER_SIGNAL", "0")))
    signal.signal(signal.SIGUSR1, on_usr1)
    for _ in range(600):
        time.sleep(0.1)
    sys.exit(9)
'''


@pytest.fixture
def stubs(tmp_path):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for tool in ("srun", "scontrol", "sbatch", "nvidia-smi", "python"):
        path = bindir / tool
        path.write_text(STUB.format(python=sys.executable))
        path.chmod(0o755)
    log = tmp_path / "calls.jsonl"
    env = {"PATH": f"{bindir}:/usr/bin:/bin", "HOME": str(tmp_path), "STUB_LOG": str(log),
           "SLURM_JOB_ID": "77", "SLURM_JOB_NAME": "mtp-test", "SLURM_NNODES": "2",
           "SLURM_JOB_NODELIST": "gpu[01-02]", "SLURM_GPUS_PER_NODE": "h100:4",
           "SLURM_CPUS_ON_NODE": "32",
           "SLURM_SUBMIT_DIR": ROOT, "MTP_RUNS": str(tmp_path / "runs"),
           "MTP_CONFIG": "examples/tp2_pp2_mtp2.yaml", "MTP_EXTRA_ARGS": "--train-iters 50 --bf16",
           "MTP_MOUNTS": "/data:/data"}

    def calls(tool=None):
        rows = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
        return [r for r in rows if tool is None or r["tool"] == tool]

    return env, calls, tmp_path


def _run(script, env, *args, check=True):
    done = subprocess.run(["bash", script, *args], env=env, capture_output=True, text=True,
                          timeout=60, cwd=ROOT)
    if check:
        assert done.returncode == 0, done.stdout + done.stderr
    return done


@pytest.mark.parametrize("script", SCRIPTS, ids=os.path.basename)
def test_bash_syntax(script):
    assert subprocess.run(["bash", "-n", script]).returncode == 0


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
def test_shellcheck_clean():
    done = subprocess.run(["shellcheck", "-x", *SCRIPTS], capture_output=True, text=True,
                          cwd=ROOT)
    assert done.returncode == 0, done.stdout


def _container(tmp_path):
    runs = tmp_path / "runs"
    return [f"--container-image={IMAGE}", "--container-name=mtp-77",
            f"--container-mounts={ROOT}:{ROOT},{runs}:{runs},/data:/data",
            f"--container-workdir={ROOT}"]


TAIL = ["--exit-signal-handler", "--exit-signal", "SIGUSR1"]


def test_srun_sbatch_renders_setup_and_one_task_per_gpu(stubs):
    env, calls, tmp = stubs
    _run(os.path.join(SLURM_DIR, "srun.sbatch"), env)
    setup, train = calls("srun")
    assert setup["args"] == ["--ntasks-per-node=1", *_container(tmp), "pip", "install",
                             "--quiet", "--no-deps", "megatron-core==0.19.2"]
    ckpt, job_dir = tmp / "runs/mtp-test/checkpoints", tmp / "runs/mtp-test/77-r0"
    assert train["args"] == [
        "--nodes=2", "--ntasks=8", "--ntasks-per-node=4", "--cpus-per-task=8", *_container(tmp),
        "--kill-on-bad-exit=1", "--label", f"--output={job_dir}/train.log",
        "bash", f"{ROOT}/launch/slurm/task.sh", "--config", "examples/tp2_pp2_mtp2.yaml",
        "--train-iters", "50", "--bf16", *TAIL, "--save", str(ckpt),
        "--output-dir", str(job_dir)]
    assert train["env"]["MTP_LAUNCHER"] == "srun"
    assert train["env"]["PYTHONPATH"].split(":")[0] == ROOT
    assert ckpt.is_dir() and job_dir.is_dir()
    assert not calls("scontrol")[1:]  # no requeue without a signal


@pytest.mark.parametrize("slurm_gpus,ranks,extra,tasks", [
    (None, None, {}, "--ntasks-per-node=1"),  # CPU nodes: one rank per node
    ("0", None, {}, "--ntasks-per-node=1"),  # submitted with --gpus-per-node=0
    ("0", None, {"MTP_RANKS_PER_NODE": "2"}, "--ntasks-per-node=2"),
    ("h100:4", None, {"MTP_GPUS_PER_NODE": "2"}, "--ntasks-per-node=2"),  # the older name
])
def test_srun_sbatch_ranks_per_node(stubs, slurm_gpus, ranks, extra, tasks):
    env, calls, _ = stubs
    env.pop("SLURM_GPUS_PER_NODE")
    if slurm_gpus is not None:
        env["SLURM_GPUS_PER_NODE"] = slurm_gpus
    env.update(MTP_IMAGE="none", SLURM_CPUS_ON_NODE="2", **extra)
    _run(os.path.join(SLURM_DIR, "srun.sbatch"), env)
    (train,) = calls("srun")
    assert tasks in train["args"]


def test_srun_sbatch_more_ranks_than_cpus_is_a_clear_error(stubs):
    env, calls, _ = stubs
    env.update(MTP_IMAGE="none", SLURM_CPUS_ON_NODE="2")  # 4 GPUs per node, 2 CPUs
    done = _run(os.path.join(SLURM_DIR, "srun.sbatch"), env, check=False)
    assert done.returncode == 2 and calls("srun") == []
    assert "error: 4 tasks per node but the job has 2 CPUs per node: submit with " \
           "--ntasks-per-node=4, or --exclusive" in done.stderr


def test_requeued_job_resumes_from_the_shared_checkpoint(stubs):
    env, calls, tmp = stubs
    ckpt = tmp / "runs/mtp-test/checkpoints"
    ckpt.mkdir(parents=True)
    (ckpt / "latest_checkpointed_iteration.txt").write_text("1200")
    env.update(SLURM_RESTART_COUNT="1", MTP_IMAGE="none")
    _run(os.path.join(SLURM_DIR, "srun.sbatch"), env)
    (train,) = calls("srun")  # no container: no setup step
    assert train["args"][4:7] == ["--kill-on-bad-exit=1", "--label",
                                  f"--output={tmp}/runs/mtp-test/77-r1/train.log"]
    assert train["args"][-4:] == ["--output-dir", f"{tmp}/runs/mtp-test/77-r1",
                                  "--load", str(ckpt)]


def test_torchrun_sbatch_renders_one_task_per_node(stubs):
    env, calls, tmp = stubs
    _run(os.path.join(SLURM_DIR, "torchrun.sbatch"), env)
    train = calls("srun")[-1]
    assert train["args"][:4] == ["--nodes=2", "--ntasks=2", "--ntasks-per-node=1",
                                 "--cpus-per-task=32"]
    assert train["args"][4:8] == _container(tmp)
    assert {k: train["env"][k] for k in ("MTP_LAUNCHER", "MTP_NNODES", "MTP_NPROC_PER_NODE",
                                         "MTP_RDZV_ENDPOINT")} == {
        "MTP_LAUNCHER": "torchrun", "MTP_NNODES": "2", "MTP_NPROC_PER_NODE": "4",
        "MTP_RDZV_ENDPOINT": "gpu01:20077"}  # 20000 + job id: jobs sharing a node differ


@pytest.mark.parametrize("cc,args,connections", [
    ("9.0", ["--config", "examples/tp2_pp2_mtp2.yaml"], "1"),  # TP 2 on Hopper
    ("10.0", ["--config", "examples/tp2_pp2_mtp2.yaml"], None),  # Blackwell: not needed
    ("9.0", ["--tensor-model-parallel-size", "1"], None),  # no TP
    ("8.0", ["--tensor-model-parallel-size", "4"], "1"),
])
def test_task_sh_torchrun_command_and_cuda_connections(stubs, cc, args, connections):
    env, calls, _ = stubs
    env.update(MTP_REPO=ROOT, MTP_LAUNCHER="torchrun", MTP_NNODES="2", MTP_NPROC_PER_NODE="4",
               MTP_RDZV_ENDPOINT="gpu01:29500", STUB_CC=cc)
    _run(os.path.join(SLURM_DIR, "task.sh"), env, *args, "--train-iters", "5")
    (torchrun,) = calls("python")
    assert torchrun["args"] == [
        "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=4",
        "--rdzv-backend=c10d", "--rdzv-endpoint=gpu01:29500", "--rdzv-id=77",
        "launch/pretrain_gpt_mtp.py", *args, "--train-iters", "5"]
    assert torchrun["env"].get("CUDA_DEVICE_MAX_CONNECTIONS") == connections


def test_task_sh_srun_mode_runs_the_launcher_directly(stubs):
    env, calls, tmp = stubs
    started = tmp / "started"
    started.mkdir()
    env.update(MTP_REPO=ROOT, MTP_LAUNCHER="srun", MTP_TASKS_STARTED=str(started),
               SLURM_PROCID="3")
    _run(os.path.join(SLURM_DIR, "task.sh"), env, "--mtp-num-layers", "1")
    (python,) = calls("python")
    assert python["args"] == ["launch/pretrain_gpt_mtp.py", "--mtp-num-layers", "1"]
    assert os.listdir(started) == ["3"]  # this task ignores SIGUSR1 now


def test_task_sh_ignores_the_exit_signal_until_the_launcher_handles_it(stubs):
    """The disposition survives exec: torchrun and a launcher still importing ignore
    SIGUSR1 instead of dying of it."""
    env, _, _ = stubs
    env.update(MTP_REPO=ROOT, MTP_LAUNCHER="srun", MTP_PYTHON=sys.executable)
    probe = ("import signal, sys; sys.exit(signal.getsignal(signal.SIGUSR1) == "
             "signal.SIG_IGN and 7)")
    done = subprocess.run(["bash", "-c", f"sed 's|exec \"$PY\" launch/pretrain_gpt_mtp.py "
                           f"\"$@\"|exec \"$PY\" -c \"{probe}\"|' {SLURM_DIR}/task.sh | bash -s"],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 7, done.stderr


SAVED = '{"iteration": 7, "reason": "received SIGUSR1", "saved": true, "checkpoint": "c"}'
NOT_SAVED = ('{"iteration": 0, "reason": "received SIGUSR1 during start-up", "saved": false, '
             '"checkpoint": null}')


def _preempt(env, script, *, signal_after):
    """Start the batch script, send SIGUSR1 to its shell (what --signal=B:USR1@N does)
    once ``signal_after()`` holds, return its (returncode, output)."""
    proc = subprocess.Popen(["bash", os.path.join(SLURM_DIR, script)], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 30
    while not signal_after() and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=60)
    return proc.returncode, out


@pytest.mark.parametrize("script,rc,stopped,requeued", [
    ("srun.sbatch", 0, SAVED, True),
    ("srun.sbatch", 0, NOT_SAVED, True),  # stopped during start-up: nothing to save
    ("srun.sbatch", 0, None, False),  # it had finished: done, no requeue
    ("srun.sbatch", 1, None, False),  # it failed: no requeue
    ("torchrun.sbatch", 0, SAVED, True),
    ("torchrun.sbatch", 1, SAVED, True),  # a non-zero step whose save is committed
    ("torchrun.sbatch", 1, NOT_SAVED, False),
])
def test_exit_signal_is_forwarded_to_the_step_then_the_job_requeues(stubs, script, rc, stopped,
                                                                    requeued):
    env, calls, _ = stubs
    env.update(STUB_HANG="1", STUB_RC_AFTER_SIGNAL=str(rc), MTP_IMAGE="none")
    if stopped:
        env["STUB_STOPPED"] = stopped
    returncode, out = _preempt(env, script, signal_after=lambda: calls("srun"))
    assert returncode == (0 if requeued else rc), out
    # forwarded once every task had started (the stub's markers), not before
    assert [(c.get("signal"), c.get("markers")) for c in calls("srun")] == \
        [(None, None), ("USR1", 8 if script == "srun.sbatch" else 2)]
    requeues = [c["args"] for c in calls("scontrol") if c["args"][0] == "requeue"]
    assert requeues == ([["requeue", "77"]] if requeued else []), out
    if rc and not requeued:
        assert "error: the training step failed with exit 1" in out


def test_exit_signal_is_sent_again_until_the_step_ends(stubs):
    """A launcher that has not installed its handler yet ignores the signal: the batch
    shell sends it again every 5 s."""
    env, calls, _ = stubs
    env.update(STUB_HANG="1", STUB_IGNORE_SIGNALS="1", STUB_STOPPED=SAVED, MTP_IMAGE="none",
               STUB_START_S="1")
    returncode, out = _preempt(env, "srun.sbatch", signal_after=lambda: calls("srun"))
    assert returncode == 0, out
    assert [c.get("signal") for c in calls("srun")] == [None, "USR1", "USR1"]
    assert [c["args"] for c in calls("scontrol")][-1] == ["requeue", "77"]


def test_exit_signal_before_the_step_requeues_without_starting_it(stubs):
    env, calls, _ = stubs
    env.update(STUB_HANG="1", STUB_SLOW_SCONTROL="3", MTP_IMAGE="none")
    returncode, out = _preempt(env, "srun.sbatch", signal_after=lambda: calls("scontrol"))
    assert returncode == 0, out
    assert calls("srun") == []
    assert "the exit signal came before training started: not starting it" in out
    assert [c["args"] for c in calls("scontrol")][-1] == ["requeue", "77"]


def test_requeue_can_be_turned_off(stubs):
    env, calls, _ = stubs
    env.update(STUB_HANG="1", STUB_STOPPED=SAVED, MTP_IMAGE="none", MTP_REQUEUE="0")
    returncode, out = _preempt(env, "srun.sbatch", signal_after=lambda: calls("srun"))
    assert returncode == 0 and "MTP_REQUEUE=0: not requeueing" in out, out
    assert not [c for c in calls("scontrol") if c["args"][0] == "requeue"]


def test_submit_chain_renders_sbatch_calls(stubs):
    env, calls, _ = stubs
    done = _run(os.path.join(SLURM_DIR, "submit.sh"), env, "--mode", "torchrun", "--nodes", "4",
                "--gpus-per-node", "8", "--image", "my/image:1", "--config", "cfg.yaml",
                "--chain", "3", "--name", "run1", "--time", "1:00:00", "--signal-before",
                "300", "--sbatch-arg", "--qos=high", "--", "--train-iters", "10", "--bf16")
    sbatch = calls("sbatch")
    assert len(sbatch) == 3 and "submitted job 1001 (1/3)" in done.stdout
    for call in sbatch:
        assert call["args"] == ["--parsable", "--job-name=run1", "--nodes=4",
                                "--gpus-per-node=8", "--ntasks-per-node=1",
                                "--cpus-per-task=8", "--time=1:00:00", "--signal=B:USR1@300",
                                "--dependency=singleton", "--qos=high",
                                f"{SLURM_DIR}/torchrun.sbatch"]
        assert {k: call["env"][k] for k in ("MTP_IMAGE", "MTP_CONFIG", "MTP_EXTRA_ARGS",
                                            "MTP_RANKS_PER_NODE", "MTP_REPO")} == {
            "MTP_IMAGE": "my/image:1", "MTP_CONFIG": "cfg.yaml",
            "MTP_EXTRA_ARGS": "--train-iters 10 --bf16", "MTP_RANKS_PER_NODE": "8",
            "MTP_REPO": ROOT}


def test_submit_cpu_nodes_ask_for_no_gpu(stubs):
    env, calls, _ = stubs
    done = _run(os.path.join(SLURM_DIR, "submit.sh"), env, "--nodes", "2", "--gpus-per-node",
                "0", "--image", "none", "--no-setup")
    (call,) = calls("sbatch")
    assert call["args"] == ["--parsable", "--job-name=mtp-srun", "--nodes=2",
                            "--ntasks-per-node=1", f"{SLURM_DIR}/srun.sbatch"]
    assert call["env"]["MTP_RANKS_PER_NODE"] == "1" and call["env"]["MTP_SETUP"] == "0"
    assert "2 nodes x 1 ranks (CPU per node)" in done.stdout
    _run(os.path.join(SLURM_DIR, "submit.sh"), env, "--nodes", "2", "--gpus-per-node", "0",
         "--ranks-per-node", "2")
    assert "--ntasks-per-node=2" in calls("sbatch")[-1]["args"]


@pytest.mark.parametrize("flags,message", [
    (["--nodes", "0"], "--nodes=0 is not allowed. Allowed: an integer >= 1."),
    (["--gpus-per-node", "-1"], "--gpus-per-node=-1 is not allowed. Allowed: an integer >= 0"),
    (["--ranks-per-node", "x"], "--ranks-per-node=x is not allowed"),
    (["--mode", "mpi"], "--mode=mpi is not allowed"),
    (["--nodes"], "--nodes needs a value"),
    (["--bogus", "1"], "unknown flag --bogus"),
    (["--time", "2"], "--time=2 is not allowed with --signal-before 120"),
    (["--time", "1", "--signal-before", "30"], "--time=1 is not allowed with --signal-before 30"),
    (["--time", "0-00:02:30"], "--time=0-00:02:30 is not allowed"),
])
def test_submit_bad_flags_are_one_line_errors(stubs, flags, message):
    env, calls, _ = stubs
    bad = _run(os.path.join(SLURM_DIR, "submit.sh"), env, *flags, check=False)
    assert bad.returncode == 2 and message in bad.stderr, bad.stderr
    assert bad.stderr.count("\n") == 1 and calls("sbatch") == []


@pytest.mark.parametrize("time_limit", ["3", "1-0", "2:31", "04:00:00", "1-02:00:00"])
def test_submit_accepts_slurm_time_formats(stubs, time_limit):
    env, calls, _ = stubs
    _run(os.path.join(SLURM_DIR, "submit.sh"), env, "--time", time_limit)
    assert f"--time={time_limit}" in calls("sbatch")[0]["args"]


def test_submit_plan_only_prints_the_plan_for_the_whole_job(stubs):
    env, calls, _ = stubs
    env["PYTHON"] = sys.executable
    done = _run(os.path.join(SLURM_DIR, "submit.sh"), env, "--nodes", "4", "--gpus-per-node",
                "8", "--config", "examples/tp2_pp2_mtp2.yaml", "--plan-only", "--",
                "--global-batch-size", "64")
    assert "Plan for 32 GPUs: TP 2 x CP 1 x DP 8 x PP 2" in done.stdout
    done = _run(os.path.join(SLURM_DIR, "submit.sh"), env, "--nodes", "2", "--gpus-per-node",
                "0", "--ranks-per-node", "2", "--plan-only")
    assert "Plan for 4 GPUs" in done.stdout
    assert calls("sbatch") == []

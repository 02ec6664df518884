"""The SLURM scripts: syntax, shellcheck, and the command lines they render.

The scripts run for real under bash with SLURM's variables set and stub ``srun``,
``scontrol``, ``sbatch``, ``torchrun``, ``nvidia-smi`` and ``python`` on PATH that
record their arguments and environment (JSON lines), so each test checks exactly
what a cluster would be asked to run.
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
IMAGE = "nvcr.io#nvidia/pytorch:25.11-py3"

STUB = r'''#!{python}
import json, os, signal, sys, time
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
    print("gpu01\ngpu02")
elif tool == "nvidia-smi":
    print(os.environ.get("STUB_CC", "9.0"))
elif tool == "sbatch":
    print(1000 + sum(1 for _ in open(os.environ["STUB_LOG"])))
elif tool == "srun" and os.environ.get("STUB_HANG") and "--label" in args:
    def on_term(signum, frame):
        record(signal="TERM")
        if os.environ.get("STUB_STOPPED"):  # what the launcher writes after its save
            job = os.path.join(os.environ["MTP_RUNS"], os.environ["SLURM_JOB_NAME"],
                               os.environ["SLURM_JOB_ID"] + "-r0")
            with open(os.path.join(job, "stopped.json"), "w") as fh:
                fh.write(os.environ["STUB_STOPPED"] + "\n")
        sys.exit(int(os.environ.get("STUB_RC_AFTER_TERM", "0")))
    signal.signal(signal.SIGTERM, on_term)
    for _ in range(600):
        time.sleep(0.1)
    sys.exit(9)
'''


@pytest.fixture
def stubs(tmp_path):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for tool in ("srun", "scontrol", "sbatch", "torchrun", "nvidia-smi", "python"):
        path = bindir / tool
        path.write_text(STUB.format(python=sys.executable))
        path.chmod(0o755)
    log = tmp_path / "calls.jsonl"
    env = {"PATH": f"{bindir}:/usr/bin:/bin", "HOME": str(tmp_path), "STUB_LOG": str(log),
           "SLURM_JOB_ID": "77", "SLURM_JOB_NAME": "mtp-test", "SLURM_NNODES": "2",
           "SLURM_JOB_NODELIST": "gpu[01-02]", "SLURM_GPUS_PER_NODE": "h100:4",
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


def test_srun_sbatch_renders_setup_and_one_task_per_gpu(stubs):
    env, calls, tmp = stubs
    _run(os.path.join(SLURM_DIR, "srun.sbatch"), env)
    setup, train = calls("srun")
    assert setup["args"] == ["--ntasks-per-node=1", *_container(tmp), "pip", "install",
                             "--quiet", "--no-deps", "megatron-core==0.16.1"]
    ckpt, job_dir = tmp / "runs/mtp-test/checkpoints", tmp / "runs/mtp-test/77-r0"
    assert train["args"] == [
        "--ntasks-per-node=4", *_container(tmp), "--label", f"--output={job_dir}/train.log",
        "bash", f"{ROOT}/launch/slurm/task.sh", "--config", "examples/tp2_pp2_mtp2.yaml",
        "--train-iters", "50", "--bf16", "--exit-signal-handler", "--save", str(ckpt),
        "--output-dir", str(job_dir)]
    assert train["env"]["MTP_LAUNCHER"] == "srun"
    assert train["env"]["PYTHONPATH"].split(":")[0] == ROOT
    assert ckpt.is_dir() and job_dir.is_dir()
    assert not calls("scontrol")[1:]  # no requeue without a signal


def test_requeued_job_resumes_from_the_shared_checkpoint(stubs):
    env, calls, tmp = stubs
    ckpt = tmp / "runs/mtp-test/checkpoints"
    ckpt.mkdir(parents=True)
    (ckpt / "latest_checkpointed_iteration.txt").write_text("1200")
    env.update(SLURM_RESTART_COUNT="1", MTP_IMAGE="none")
    _run(os.path.join(SLURM_DIR, "srun.sbatch"), env)
    (train,) = calls("srun")  # no container: no setup step
    assert train["args"][:3] == ["--ntasks-per-node=4", "--label",
                                 f"--output={tmp}/runs/mtp-test/77-r1/train.log"]
    assert train["args"][-4:] == ["--output-dir", f"{tmp}/runs/mtp-test/77-r1",
                                  "--load", str(ckpt)]


def test_torchrun_sbatch_renders_one_task_per_node(stubs):
    env, calls, tmp = stubs
    _run(os.path.join(SLURM_DIR, "torchrun.sbatch"), env)
    train = calls("srun")[-1]
    assert train["args"][0] == "--ntasks-per-node=1"
    assert train["args"][1:5] == _container(tmp)
    assert {k: train["env"][k] for k in ("MTP_LAUNCHER", "MTP_NNODES", "MTP_NPROC_PER_NODE",
                                         "MTP_RDZV_ENDPOINT")} == {
        "MTP_LAUNCHER": "torchrun", "MTP_NNODES": "2", "MTP_NPROC_PER_NODE": "4",
        "MTP_RDZV_ENDPOINT": "gpu01:29500"}


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
    (torchrun,) = calls("torchrun")
    assert torchrun["args"] == [
        "--nnodes=2", "--nproc-per-node=4", "--rdzv-backend=c10d",
        "--rdzv-endpoint=gpu01:29500", "--rdzv-id=77", "launch/pretrain_gpt_mtp.py",
        *args, "--train-iters", "5"]
    assert torchrun["env"].get("CUDA_DEVICE_MAX_CONNECTIONS") == connections


def test_task_sh_srun_mode_runs_the_launcher_directly(stubs):
    env, calls, _ = stubs
    env.update(MTP_REPO=ROOT, MTP_LAUNCHER="srun")
    _run(os.path.join(SLURM_DIR, "task.sh"), env, "--mtp-num-layers", "1")
    (python,) = calls("python")
    assert python["args"] == ["launch/pretrain_gpt_mtp.py", "--mtp-num-layers", "1"]


SAVED = '{"iteration": 7, "reason": "received SIGTERM", "saved": true, "checkpoint": "c"}'
NOT_SAVED = SAVED.replace("true", "false")


@pytest.mark.parametrize("script,rc_after_term,stopped,requeued", [
    ("srun.sbatch", 0, None, True),
    ("srun.sbatch", 1, None, False),
    # torchrun exits 1 when it is the process signalled: the launcher's record decides
    ("torchrun.sbatch", 1, SAVED, True),
    ("torchrun.sbatch", 1, NOT_SAVED, False),
    ("torchrun.sbatch", 1, None, False),
])
def test_time_limit_signal_is_forwarded_then_the_job_requeues(stubs, script, rc_after_term,
                                                              stopped, requeued):
    env, calls, _ = stubs
    env.update(STUB_HANG="1", STUB_RC_AFTER_TERM=str(rc_after_term), MTP_IMAGE="none")
    if stopped:
        env["STUB_STOPPED"] = stopped
    proc = subprocess.Popen(["bash", os.path.join(SLURM_DIR, script)], env=env,
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    deadline = time.time() + 30
    while not calls("srun") and time.time() < deadline:
        time.sleep(0.1)
    time.sleep(0.3)  # let the batch shell install its trap
    proc.send_signal(signal.SIGTERM)  # what #SBATCH --signal=B:TERM@120 does
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == rc_after_term, out
    assert [c.get("signal") for c in calls("srun")] == [None, "TERM"]
    requeues = [c["args"] for c in calls("scontrol") if c["args"][0] == "requeue"]
    assert requeues == ([["requeue", "77"]] if requeued else []), out


def test_submit_chain_renders_sbatch_calls(stubs):
    env, calls, _ = stubs
    done = _run(os.path.join(SLURM_DIR, "submit.sh"), env, "--mode", "torchrun", "--nodes", "4",
                "--gpus-per-node", "8", "--image", "my/image:1", "--config", "cfg.yaml",
                "--chain", "3", "--name", "run1", "--time", "1:00:00", "--",
                "--train-iters", "10", "--bf16")
    sbatch = calls("sbatch")
    assert len(sbatch) == 3 and "submitted job 1001 (1/3)" in done.stdout
    for call in sbatch:
        assert call["args"] == ["--parsable", "--job-name=run1", "--nodes=4",
                                "--gpus-per-node=8", "--ntasks-per-node=1", "--time=1:00:00",
                                "--dependency=singleton", f"{SLURM_DIR}/torchrun.sbatch"]
        assert {k: call["env"][k] for k in ("MTP_IMAGE", "MTP_CONFIG", "MTP_EXTRA_ARGS",
                                            "MTP_GPUS_PER_NODE", "MTP_REPO")} == {
            "MTP_IMAGE": "my/image:1", "MTP_CONFIG": "cfg.yaml",
            "MTP_EXTRA_ARGS": "--train-iters 10 --bf16", "MTP_GPUS_PER_NODE": "8",
            "MTP_REPO": ROOT}


def test_submit_srun_mode_one_task_per_gpu_and_bad_flags(stubs):
    env, calls, _ = stubs
    _run(os.path.join(SLURM_DIR, "submit.sh"), env, "--nodes", "2", "--gpus-per-node", "4")
    (call,) = calls("sbatch")
    assert "--ntasks-per-node=4" in call["args"] and "--dependency=singleton" not in call["args"]
    bad = _run(os.path.join(SLURM_DIR, "submit.sh"), env, "--nodes", "0", check=False)
    assert bad.returncode == 2 and "--nodes=0 is not allowed" in bad.stderr
    bad = _run(os.path.join(SLURM_DIR, "submit.sh"), env, "--mode", "mpi", check=False)
    assert bad.returncode == 2 and "--mode=mpi is not allowed" in bad.stderr


def test_submit_plan_only_prints_the_plan_for_the_whole_job(stubs):
    env, calls, _ = stubs
    env["PYTHON"] = sys.executable
    done = _run(os.path.join(SLURM_DIR, "submit.sh"), env, "--nodes", "4", "--gpus-per-node",
                "8", "--config", "examples/tp2_pp2_mtp2.yaml", "--plan-only", "--",
                "--global-batch-size", "64")
    assert "Plan for 32 GPUs: TP 2 x CP 1 x DP 8 x PP 2" in done.stdout
    assert calls("sbatch") == []

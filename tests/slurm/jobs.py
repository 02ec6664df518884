"""Submitting the project's own scripts to the test cluster, and reading what they left.

Jobs go through ``launch/slurm/submit.sh`` exactly as a user's would, run by the Python
that runs the tests (``MTP_PYTHON``, and its bin directory first on PATH) on the host
(``MTP_IMAGE=none MTP_SETUP=0``), one thread per rank. sbatch's own output lands in the
submit directory (``Slurm.workdir``), runs under ``Slurm.runs`` (``MTP_RUNS``).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

from tests.dist_utils import child_env
from tests.functional.launcher import LAUNCHER, ROOT, TINY, Run
from tests.slurm.cluster import Cluster

SUBMIT = os.path.join(ROOT, "launch", "slurm", "submit.sh")
FLAGS = TINY + ["--mtp-num-layers", "1", "--mock-data"]
SHORT = FLAGS + ["--train-iters", "6"]
# The run the preemption, time-limit, node-loss and chain tests all finish (one reference).
LONG = FLAGS + ["--train-iters", "60", "--save-interval", "10"]
STEP_DELAY = "MTP_MEGATRON_STEP_DELAY_S"  # see mtp_megatron/training/faults.py
KEYS = ("lm loss", "mtp_1 loss", "grad norm", "lr")


@dataclass
class Slurm:
    cluster: Cluster
    workdir: str  # submit directory: slurm-<name>-<job>.out
    runs: str  # MTP_RUNS

    def env(self, extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
        """What a job inherits from the submitting shell (sbatch exports it all)."""
        env = child_env()
        bindir = os.path.dirname(sys.executable)
        env.update(PATH=f"{bindir}:{env.get('PATH', '/usr/bin:/bin')}", MTP_PYTHON=sys.executable,
                   MTP_IMAGE="none", MTP_SETUP="0", MTP_RUNS=self.runs, OMP_NUM_THREADS="1",
                   PYTHONUNBUFFERED="1")
        env.pop(STEP_DELAY, None)
        env.update(extra or {})
        return env

    def submit(self, *flags: str, args: Sequence[str], env: Optional[Dict[str, str]] = None,
               ) -> List[str]:
        """``submit.sh --nodes 2 --gpus-per-node 0 FLAGS -- ARGS`` (CPU nodes, one rank per
        node unless FLAGS say otherwise) with the cluster's own sbatch options; job ids."""
        cmd = ["bash", SUBMIT, "--nodes", "2", "--gpus-per-node", "0"]
        for arg in self.cluster.sbatch_args:
            cmd += ["--sbatch-arg", arg]
        cmd += [*flags, "--", *args]
        done = self.cluster.run(cmd, cwd=self.workdir, env=self.env(env))
        jobs = re.findall(r"^submitted job (\d+) ", done.stdout, flags=re.M)
        assert jobs, done.stdout + done.stderr
        return jobs

    def run_dirs(self, name: str) -> List[str]:
        """The job directories of a run name, oldest first (``<job>-r<restart>``)."""
        root = os.path.join(self.runs, name)
        dirs = [d for d in os.listdir(root) if re.fullmatch(r"\d+-r\d+", d)]
        dirs.sort(key=lambda d: tuple(int(x) for x in d.split("-r")))
        return [os.path.join(root, d) for d in dirs]

    def output(self, name: str, job: str) -> str:
        """The batch script's output (all restarts: --open-mode=append)."""
        return _read(os.path.join(self.workdir, f"slurm-{name}-{job}.out"))

    def kill_training_on(self, job: str, node: str) -> str:
        """SIGKILL every process of the job's training step on ``node`` (what a node that
        dies leaves behind), from a step of the same job there (``scontrol listpids``)."""
        script = (f"scontrol listpids {job} | awk -v me=$SLURM_STEP_ID "
                  "'NR > 1 && $3 ~ /^[0-9]+$/ && $3 != me {print $1}' | "
                  "tee /dev/stderr | xargs -r kill -9")
        done = self.cluster.run(["srun", f"--jobid={job}", "--overlap", "--nodes=1",
                                 "--ntasks=1", f"--nodelist={node}", "bash", "-c", script],
                                cwd=self.workdir)
        return done.stderr

    def describe(self, name: str, job: str) -> str:
        """For failure messages: the batch output, each train.log's tail, the daemons' logs."""
        parts = [f"--- slurm-{name}-{job}.out\n{self.output(name, job)}"]
        if os.path.isdir(os.path.join(self.runs, name)):
            for run_dir in self.run_dirs(name):
                log = _read(os.path.join(run_dir, "train.log"))
                parts.append(f"--- {run_dir}/train.log\n{log[-4000:]}")
        return "\n".join(parts + [self.cluster.logs()])

    def wait(self, name: str, job: str, timeout: float = 240) -> Dict[str, str]:
        """Until the job ended (a requeued one has not); ``timeout`` plus the time a job may
        wait in the cluster's queue."""
        try:
            return self.cluster.wait_job(job, timeout + self.cluster.queue_wait)
        except TimeoutError as err:
            raise TimeoutError(f"{err}\n{self.describe(name, job)}") from None

    def wait_for_log(self, name: str, job: str, pattern: str, restart: int = 0,
                     timeout: float = 120) -> None:
        """Until the train.log of the job's start ``restart`` matches ``pattern`` (within
        ``timeout`` plus the time a job may wait in the queue)."""
        log = os.path.join(self.runs, name, f"{job}-r{restart}", "train.log")
        deadline = time.time() + timeout + self.cluster.queue_wait
        while time.time() < deadline:
            if re.search(pattern, _read(log)):
                return
            time.sleep(0.2)
        raise TimeoutError(f"no {pattern!r} in job {job}'s train.log after {timeout} s\n"
                           f"{self.describe(name, job)}")


def metrics(run_dir: str) -> Dict[int, Dict]:
    """Training rows of a run directory's metrics.jsonl, by iteration."""
    return {r["iteration"]: r for r in Run(0, "", "", run_dir).metrics()}


def stop_record(run_dir: str) -> Optional[Dict]:
    path = os.path.join(run_dir, "stopped.json")
    return json.loads(_read(path)) if os.path.exists(path) else None


def tensors(checkpoint_dir: str) -> Dict[str, "object"]:
    """Every tensor of a torch_dist checkpoint (weights and optimizer state), read
    without a process group or a model."""
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "all.pt")
        dcp_to_torch_save(checkpoint_dir, path)
        state = torch.load(path, weights_only=False)
    flat = {}

    def walk(obj, prefix):
        if isinstance(obj, dict):
            for key, value in obj.items():
                walk(value, f"{prefix}/{key}")
        elif isinstance(obj, torch.Tensor):
            flat[prefix] = obj

    walk(state, "")
    return flat


def latest_checkpoint(ckpt_root: str) -> str:
    iteration = int(_read(os.path.join(ckpt_root, "latest_checkpointed_iteration.txt")))
    return os.path.join(ckpt_root, f"iter_{iteration:07d}")


def train_locally(cluster, args: Sequence[str], nproc: int, output_dir: str,
                  timeout: float = 300) -> Run:
    """The same flags under ``torchrun --nproc-per-node N`` on one machine (this one, or
    one node of a site's cluster)."""
    cmd = [*cluster.reference_prefix(nproc), sys.executable, "-m", "torch.distributed.run",
           "--standalone", "--nproc-per-node", str(nproc), LAUNCHER, *args,
           "--output-dir", output_dir]
    env = child_env()
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop(STEP_DELAY, None)
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)
    run = Run(done.returncode, done.stdout, done.stderr, output_dir)
    assert run.returncode == 0, run
    return run


class Background:
    """A scenario that runs in a thread while other tests run (a job that waits on a
    time limit mostly sleeps); :meth:`result` joins it and re-raises its failure."""

    def __init__(self, name: str, body: Callable[[], object], timeout: float):
        self.name, self._body, self.timeout = name, body, timeout
        self._result: object = None
        self._error: Optional[BaseException] = None
        self.started = time.time()
        self.seconds: Optional[float] = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._result = self._body()
        except BaseException as err:  # re-raised in the test's thread
            self._error = err
        self.seconds = time.time() - self.started

    def result(self):
        self._thread.join(max(0.0, self.started + self.timeout - time.time()))
        if self._thread.is_alive():
            raise TimeoutError(f"{self.name} still running after {self.timeout:.0f} s")
        if self._error is not None:
            raise self._error
        return self._result


def _read(path: str) -> str:
    try:
        with open(path) as fh:
            return fh.read()
    except OSError:
        return ""

"""Train one run with the normal launcher under torchrun, once.

A run is finished when its directory holds ``DONE.json`` (written after torchrun exited 0
and ``metrics.jsonl`` has the final validation row) with the same launcher command; a
finished run is never trained again. An unfinished or changed run is wiped and
retrained from scratch (nothing of the old run is kept; the trainer itself would only move
an old ``metrics.jsonl`` aside).

    done = ensure_trained(run, spec)   # {"command": [...], "wall_seconds": ...}
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from typing import Dict, List, Optional

from mtp_megatron.experiments.spec import ExperimentSpec, RunSpec
from mtp_megatron.training.writers import metrics_path, read_run

logger = logging.getLogger("mtp_megatron")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LAUNCHER = os.path.join(ROOT, "launch", "pretrain_gpt_mtp.py")
DONE = "DONE.json"


def torchrun_command(run: RunSpec, spec: ExperimentSpec) -> List[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            "--nproc-per-node", str(spec.nproc_per_node), LAUNCHER,
            *run.launcher_args(spec)]


def read_done(run_dir: str) -> Optional[Dict]:
    path = os.path.join(run_dir, DONE)
    if not os.path.isfile(path):
        return None
    with open(path) as fh:
        return json.load(fh)


def has_final_validation(run_dir: str, train_iters: int) -> bool:
    if not os.path.isfile(metrics_path(run_dir)):
        return False
    _, valid = read_run(run_dir)
    return any(row.get("iteration") == train_iters for row in valid)


def launch(command: List[str], log_path: str, threads: Optional[int] = None) -> int:
    """Run the command with its output in ``log_path``; returns the exit code."""
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
    with open(log_path, "w") as log:
        return subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                              cwd=os.getcwd()).returncode


def ensure_trained(run: RunSpec, spec: ExperimentSpec) -> Dict:
    """Train ``run`` unless it is already finished with the same command."""
    run_dir = run.directory(spec.out_dir)
    command = torchrun_command(run, spec)
    done = read_done(run_dir)
    args = command[command.index(LAUNCHER) + 1:]
    if done is not None and (done["launcher_args"], done["nproc_per_node"],
                             done.get("threads")) == (args, spec.nproc_per_node, spec.threads):
        logger.info("%s: finished earlier, not retrained", run.name)
        return done
    if os.path.isdir(run_dir):
        shutil.rmtree(run_dir)
    os.makedirs(run_dir)
    logger.info("%s: training %d iterations (log: %s)", run.name, run.train_iters,
                os.path.join(run_dir, "train.log"))
    start = time.time()
    code = launch(command, os.path.join(run_dir, "train.log"), spec.threads)
    wall = time.time() - start
    if code != 0 or not has_final_validation(run_dir, run.train_iters):
        raise RuntimeError(f"{run.name}: the launcher exited with {code} and no final "
                           f"validation; see {os.path.join(run_dir, 'train.log')}")
    done = {"run": run.name, "command": command,
            "launcher_args": args, "nproc_per_node": spec.nproc_per_node,
            "threads": spec.threads,
            "wall_seconds": round(wall, 2), "finished_at": time.strftime("%Y-%m-%d %H:%M:%S"),
            "load_average": list(os.getloadavg())}
    with open(os.path.join(run_dir, DONE), "w") as fh:
        json.dump(done, fh, indent=2)
    return done

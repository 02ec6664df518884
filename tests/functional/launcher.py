"""Run the real launcher under torchrun (or plain python) and read what it logged."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

from mtp_megatron.training.writers import read_rows
from tests.dist_utils import child_env

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LAUNCHER = os.path.join(ROOT, "launch", "pretrain_gpt_mtp.py")

# A tiny model: 2 layers (PP=2 splits them), 4 heads (TP=2 splits them), short sequences.
TINY = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
        "--seq-length", "32", "--micro-batch-size", "2", "--global-batch-size", "8",
        "--lr", "3e-3", "--log-interval", "1"]

# The runs tests/functional/conftest.py::saved_run trains once per session (with --save):
# the arguments of each (and of a run that resumes one), and name -> (ranks, extra flags).
SAVED_ARGS = TINY + ["--mtp-num-layers", "2", "--mock-data", "--lr-warmup-iters", "2",
                     "--eval-iters", "1", "--train-iters", "20"]
SAVED_LAYOUTS = {
    "tp1_mtp2": (1, []),
    "tp2_pp2_mtp2": (4, ["--tensor-model-parallel-size", "2",
                         "--pipeline-model-parallel-size", "2"]),
    "dp2_mtp2_distopt": (2, ["--use-distributed-optimizer"]),
}


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str
    output_dir: str

    def metrics(self, split: Optional[str] = None) -> List[Dict]:
        path = os.path.join(self.output_dir, "metrics.jsonl")
        if not os.path.exists(path):
            return []
        return [r for r in read_rows(path) if r.get("split") == split]

    def __repr__(self) -> str:
        return (f"rc={self.returncode}\nstdout:\n{self.stdout[-3000:]}"
                f"\nstderr:\n{self.stderr[-3000:]}")


def launch_env(env: Optional[Dict[str, str]] = None, *, gpu: bool = False) -> Dict[str, str]:
    """The launched processes' environment: CUDA hidden unless ``gpu`` (so the CPU tiers
    take the gloo path on a GPU machine too), strict device mode, one thread each."""
    full_env = child_env(gpu=gpu)
    full_env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    full_env.update(env or {})
    return full_env


def launch(args: Sequence[str], *, output_dir: str, nproc: int = 1, torchrun: bool = True,
           env: Optional[Dict[str, str]] = None, timeout: float = 600, gpu: bool = False) -> Run:
    """``torchrun --nproc-per-node N launch/pretrain_gpt_mtp.py ARGS --output-dir DIR``.

    ``gpu=True`` only from GPU-marked tests: the others run with CUDA hidden."""
    if torchrun:
        # --standalone: torchrun picks a free port for its own rendezvous (no races).
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", str(nproc), LAUNCHER]
    else:
        cmd = [sys.executable, LAUNCHER]
    cmd += list(args) + ["--output-dir", output_dir]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env=launch_env(env, gpu=gpu))
    return Run(proc.returncode, proc.stdout, proc.stderr, output_dir)

"""Run a function on N CPU ranks with gloo, nanotron-style, and collect what each returns.

    def _body(rank, world_size, x):        # module level, so spawn can pickle it
        return rank * x

    assert spawn(2, _body, 10) == [0, 10]

Each rank gets RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT/LOCAL_RANK in its environment;
an exception on any rank fails the caller with that rank's traceback. Ranks of CPU tests
see no GPU (``CUDA_VISIBLE_DEVICES=""``, so a GPU machine runs them on gloo too) and run
in strict device mode (:func:`child_env`); ``spawn(..., gpu=True)`` for GPU-marked tests.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import traceback
from typing import Any, Callable, Dict, List, Optional

from mtp_megatron.runtime.launch_env import free_port
from mtp_megatron.runtime.strict_device import STRICT_ENV


def child_env(base: Optional[Dict[str, str]] = None, *, gpu: bool = False) -> Dict[str, str]:
    """The environment for a process a test starts: strict device mode always; CUDA
    hidden unless ``gpu`` (a CPU test must take the gloo path on a GPU machine too)."""
    env = dict(os.environ if base is None else base)
    env[STRICT_ENV] = "1"
    if gpu:
        if env.get("CUDA_VISIBLE_DEVICES") == "":
            env.pop("CUDA_VISIBLE_DEVICES")  # hidden for the CPU tests, see conftest.py
    else:
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env




def _entry(fn, rank, world_size, port, args, queue, gpu=False):
    env = child_env(gpu=gpu)  # before CUDA is first touched in this process
    os.environ.clear()
    os.environ.update(env)
    os.environ.update({
        "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
    })
    try:
        import torch

        torch.set_num_threads(1)
        # plain pickle: tensors travel by value, not as shared memory the exiting child owns
        queue.put((rank, True, pickle.dumps(fn(rank, world_size, *args))))
    except BaseException:  # report every failure to the parent
        queue.put((rank, False, traceback.format_exc()))


def spawn(world_size: int, fn: Callable, *args: Any, timeout: float = 600,
          gpu: bool = False) -> List[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` processes; return results."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(fn, r, world_size, port, args, queue, gpu))
             for r in range(world_size)]
    for p in procs:
        p.start()
    results, errors = {}, []
    try:
        for _ in range(world_size):
            rank, ok, value = queue.get(timeout=timeout)
            if ok:
                results[rank] = pickle.loads(value)
            else:
                errors.append(f"rank {rank}:\n{value}")
                break
    finally:
        for p in procs:
            p.join(timeout=5 if errors else 60)
            if p.is_alive():
                p.kill()
    if errors:
        raise AssertionError("\n".join(errors))
    return [results[r] for r in range(world_size)]


def init_ranks(cfg):
    """Process groups + seeds for ``cfg`` in a spawned rank (CPU bridge included)."""
    from mtp_megatron.runtime.distributed import initialize
    from mtp_megatron.runtime.launch_env import read_launch_env

    return initialize(cfg, read_launch_env(os.environ))

"""Run a function on N CPU ranks with gloo, nanotron-style, and collect what each returns.

    def _body(rank, world_size, x):        # module level, so spawn can pickle it
        return rank * x

    assert spawn(2, _body, 10) == [0, 10]

Each rank gets RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT/LOCAL_RANK in its environment;
an exception on any rank fails the caller with that rank's traceback.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import traceback
from typing import Any, Callable, List

from mtp_megatron.runtime.launch_env import free_port


def _entry(fn, rank, world_size, port, args, queue):
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


def spawn(world_size: int, fn: Callable, *args: Any, timeout: float = 600) -> List[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` processes; return results."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(fn, r, world_size, port, args, queue))
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

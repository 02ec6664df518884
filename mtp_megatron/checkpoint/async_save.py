"""``--async-save`` (GPU): write the checkpoint in the background while training goes on.

The same checkpoint as :func:`~mtp_megatron.checkpoint.dist_ckpt.save_checkpoint`
(same sharded state, same ``iter_N.partial`` -> ``iter_N`` commit, tracker last), but
``dist_checkpointing.save(..., async_sharded_save=True)`` only stages the tensors to host
memory and returns an ``AsyncRequest``; megatron-core's ``AsyncCallsQueue`` writes the
files in a background process. The commit (config file, rename, tracker) is the
request's last finalize step, run on every rank once *all* ranks finished writing, so a
checkpoint becomes visible only when complete, exactly as with the synchronous save.

Finalisation is polled (a collective) only at log windows, before the next save and
at the end of training (blocking), not every step.

    saver = AsyncSaver()
    saver.save(state, "/ckpt")       # returns after staging; files are written behind
    saver.poll()                     # at --log-interval: commit what has finished
    saver.close()                    # at the end: wait for and commit everything

GPU only: the writer uses CUDA streams and devices; on CPU the run is refused at start.
"""

from __future__ import annotations

import logging
import time
from functools import partial

import torch.distributed as dist
import yaml
from megatron.core import dist_checkpointing

from mtp_megatron.checkpoint import dist_ckpt
from mtp_megatron.checkpoint.commit import SaveGuard
from mtp_megatron.config import to_dict
from mtp_megatron.runtime import mcore_compat

logger = logging.getLogger("mtp_megatron")


def _commit(guard: SaveGuard, cfg, started: float) -> None:
    """Publish ``iter_N`` once every rank's files are written (the request's finalize
    step, run on every rank): the same commit as the synchronous save (rename aside,
    tracker, ``--ckpt-keep-last``; checkpoint/commit.py)."""
    final = guard.commit({dist_ckpt.CONFIG_NAME: yaml.safe_dump(to_dict(cfg), sort_keys=False)})
    if dist.get_rank() == dist.get_world_size() - 1:
        logger.info("saved checkpoint %s asynchronously in %.2f s", final,
                    time.perf_counter() - started)


class AsyncSaver:
    """Background checkpoint saves through megatron-core's ``AsyncCallsQueue``."""

    def __init__(self):
        from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

        self.queue = AsyncCallsQueue()

    def save(self, state, save_dir: str) -> str:
        """Stage ``state`` and schedule its write; returns the final directory's path."""
        self.poll(blocking=True)  # one save in flight at a time, committed in order
        started = time.perf_counter()
        guard = SaveGuard(save_dir, state.iteration,
                          keep_last=state.cfg.checkpoint.ckpt_keep_last)
        guard.prepare()
        with guard.writing():  # staging errors: one CheckpointError on every rank
            request = dist_checkpointing.save(dist_ckpt.sharded_state(state), guard.work,
                                              async_sharded_save=True,
                                              **dist_ckpt.save_kwargs(state.cfg),
                                              **mcore_compat.async_save_kwargs())
        request.add_finalize_fn(partial(_commit, guard, state.cfg, started))
        self.queue.schedule_async_request(request)
        return guard.final

    def poll(self, blocking: bool = False) -> None:
        """Commit the saves that have finished (all ranks must call it together)."""
        if self.queue.get_num_unfinalized_calls():
            self.queue.maybe_finalize_async_calls(blocking=blocking)

    def close(self) -> None:
        self.poll(blocking=True)
        self.queue.close()

"""No helper process of a checkpoint save outlives the run.

megatron-core 0.16.1's torch_dist save (``FileSystemWriterAsync``, used for synchronous
saves too) does two things with processes:

* On its first save it creates ``multiprocessing.get_context("spawn").Manager().Queue()``
  (``filesystem_async._get_write_results_queue``) to carry write results back from an
  async save process. The Manager is a ``multiprocessing.spawn`` server process (with
  the resource tracker beside it) that lives until the interpreter exits; it does not
  watch its parent, so after a ``kill -9`` of the run it stays alive forever,
  re-parented to init. A synchronous save collects the results in the same process,
  so a plain ``queue.Queue`` does the job with no process at all.
* 0.16 forks one writer process per shard file. They are joined within the save; if the
  run is killed mid-save they would finish writing into a directory nobody will commit.
  ``PR_SET_PDEATHSIG`` makes the kernel kill them with their parent. (0.19 writes with
  threads of this process instead: nothing to kill.)

And one thing it leaves in memory: when 0.19's in-process writer threads fail (disk full),
the exception's traceback keeps an ``io.BytesIO`` and a ``getbuffer()`` view of it in a
reference cycle, and CPython before 3.12.2 crashes (SIGSEGV in ``bytesiobuf_releasebuffer``)
when the garbage collector clears such a cycle (python/cpython#111049, #111211): the next
collection after a failed save killed the run instead of letting it report the error
(seen with Python 3.12.1). After a failed save, :func:`_keep_failed_save_garbage` moves the
cycles that are garbage at that moment to ``gc.garbage``, where they are never cleared:
the failed save's buffers stay allocated, and the run reports its error and exits.

    with no_orphan_writers():
        dist_checkpointing.save(sharded, directory, async_sharded_save=False)
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import queue
import signal
import sys
from typing import Iterator

from megatron.core.dist_checkpointing.strategies import filesystem_async

_PR_SET_PDEATHSIG = 1
_active = False
_parent_pid = 0


def _die_with_parent() -> None:
    """In a child forked during a save: SIGKILL when the parent dies (Linux)."""
    if not _active or not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != _parent_pid:  # the parent died before prctl took effect
        os._exit(1)


os.register_at_fork(after_in_child=_die_with_parent)


@contextlib.contextmanager
def no_orphan_writers() -> Iterator[None]:
    """Run a synchronous ``dist_checkpointing.save`` without processes that could outlive
    this one (see the module docstring)."""
    global _active, _parent_pid
    before = filesystem_async._results_queue
    filesystem_async._results_queue = queue.Queue()  # sync save: results stay in-process
    _active, _parent_pid = True, os.getpid()
    try:
        yield
    except BaseException:
        _keep_failed_save_garbage()
        raise
    finally:
        _active = False
        filesystem_async._results_queue = before


def _keep_failed_save_garbage() -> None:
    """Move what is unreachable now (the failed writers' cycles) to ``gc.garbage`` instead
    of clearing it (see the module docstring)."""
    flags = gc.get_debug()
    gc.set_debug(flags | gc.DEBUG_SAVEALL)
    try:
        gc.collect()
    finally:
        gc.set_debug(flags)

"""One writer per ``--save`` directory: a lock file that names its owner.

    lock = SaveLock.acquire("runs/x/checkpoints")    # CheckpointError if another run has it
    ...
    lock.release()                                    # also at interpreter exit

``<save>/.save.lock`` holds the owner's host, pid, process start time, SLURM job and
command line, and is held with ``flock`` for the life of the run (the kernel drops it
when the process dies, ``kill -9`` included). A second run is refused with an error
naming the directory and the owner. A lock left behind by a dead run is taken over
with a warning:

* same host: its pid is gone, or now belongs to another process (start time differs);
* another host: only an earlier incarnation of this same SLURM job (same
  ``SLURM_JOB_ID``, another ``SLURM_RESTART_COUNT``: a requeued job) is known dead.
  Any other lock from another host is refused; the message says how to remove it.

In a multi-rank run call :func:`acquire_on_rank0`: rank 0 takes the lock and every rank
raises the same error if it could not.
"""

from __future__ import annotations

import atexit
import fcntl
import json
import logging
import os
import socket
import sys
import time
from typing import Any, Dict, Optional

import torch.distributed as dist

from mtp_megatron.checkpoint.layout import CheckpointError, restore_replaced
from mtp_megatron.runtime import comm

logger = logging.getLogger("mtp_megatron")

LOCK_NAME = ".save.lock"


def _start_time(pid: int) -> Optional[str]:
    """The process start time in clock ticks since boot (Linux), or None."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def owner_info() -> Dict[str, Any]:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "pid_start": _start_time(os.getpid()),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "slurm_restart_count": os.environ.get("SLURM_RESTART_COUNT", "0"),
        "command": " ".join(sys.argv)[:500],
    }


def describe_owner(owner: Dict[str, Any]) -> str:
    job = f", SLURM job {owner['slurm_job_id']}" if owner.get("slurm_job_id") else ""
    return (f"pid {owner.get('pid')} on host {owner.get('host')}{job}, started "
            f"{owner.get('started')}: {owner.get('command', '')[:200]}")


def stale_reason(owner: Dict[str, Any], me: Dict[str, Any]) -> Optional[str]:
    """Why ``owner`` (read from a lock file) is known to be dead, or None if it may live."""
    if owner.get("host") == me["host"]:
        pid = owner.get("pid")
        if not isinstance(pid, int) or not _alive(pid):
            return f"pid {pid} is no longer running"
        if owner.get("pid_start") and owner["pid_start"] != _start_time(pid):
            return f"pid {pid} now belongs to another process"
        return None
    job = owner.get("slurm_job_id")
    if job and job == me["slurm_job_id"] and \
            owner.get("slurm_restart_count") != me["slurm_restart_count"]:
        return f"it was restart {owner.get('slurm_restart_count')} of this SLURM job {job}"
    return None


class SaveLock:
    """The lock of one save directory, held by this process."""

    def __init__(self, path: str, fd: int):
        self.path, self._fd = path, fd
        atexit.register(self.release)

    @classmethod
    def acquire(cls, save_dir: str) -> "SaveLock":
        os.makedirs(save_dir, exist_ok=True)
        path = os.path.join(save_dir, LOCK_NAME)
        me = owner_info()
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = _read(fd)
                os.close(fd)
                raise CheckpointError(_refusal(save_dir, path, owner, "it is running")) \
                    from None
            try:
                same = os.fstat(fd).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # released and removed by its owner meanwhile: try again
        owner = _read(fd)
        if owner:
            reason = stale_reason(owner, me)
            if reason is None:
                os.close(fd)
                raise CheckpointError(_refusal(save_dir, path, owner, "it may be running"))
            logger.warning("%s: taking over the lock of a run that ended without releasing "
                           "it (%s; %s)", save_dir, describe_owner(owner), reason)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me, indent=1).encode() + b"\n", 0)
        os.fsync(fd)
        for action in restore_replaced(save_dir):
            logger.warning("%s: %s (a re-save was interrupted)", save_dir, action)
        return cls(path, fd)

    def release(self) -> None:
        """Remove the lock file (if still ours) and drop the lock. Idempotent."""
        if self._fd is None:
            return
        try:
            if os.fstat(self._fd).st_ino == os.stat(self.path).st_ino:
                os.remove(self.path)
        except OSError:
            pass
        os.close(self._fd)
        self._fd = None


def _read(fd: int) -> Optional[Dict[str, Any]]:
    try:
        data = os.pread(fd, 65536, 0)
        return json.loads(data) if data.strip() else None
    except (OSError, ValueError):
        return {"host": "?", "pid": "?", "command": "(unreadable lock file)"}


def _refusal(save_dir: str, path: str, owner: Optional[Dict[str, Any]], state: str) -> str:
    who = describe_owner(owner) if owner else "an unknown process"
    return (f"--save {save_dir} is in use by another run ({who}); {state}. Two runs must not "
            f"save to one directory: use another --save, or stop that run. If it is no longer "
            f"running (e.g. it was on another host that went down), delete {path} and restart.")


def acquire_on_rank0(save_dir: Optional[str]) -> Optional[SaveLock]:
    """Rank 0 takes the lock of ``save_dir``; every rank raises if it could not."""
    if not save_dir:
        return None
    lock, error = None, None
    if dist.get_rank() == 0:
        try:
            lock = SaveLock.acquire(save_dir)
        except CheckpointError as exc:
            error = str(exc)
        except OSError as exc:
            error = f"--save {save_dir}: cannot create the lock file ({exc})"
    error = comm.broadcast_object(error, src=0)
    if error:
        raise CheckpointError(error)
    return lock

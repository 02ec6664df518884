"""The three phases of a save around ``dist_checkpointing.save``, each agreed by all ranks.

    guard = SaveGuard(save_dir, iteration, keep_last=cfg.checkpoint.ckpt_keep_last)
    guard.prepare()                  # rank 0: iter_N.partial/ created and writable
    with guard.writing():            # every rank: dist_checkpointing.save(..., guard.work)
        dist_checkpointing.save(sharded, guard.work)
    guard.commit({"run_config.yaml": text})   # rank 0: rename, tracker, retention

A failure in any phase raises the same :class:`CheckpointError` on every rank, naming the
directory and the cause (``[Errno 28] No space left on device``, ``Read-only file
system``, ...); the previous checkpoint is left as it was and ``iter_N.partial/`` is
removed where possible.

The commit never deletes a committed checkpoint before its replacement is in place
(:func:`commit_partial`). Retention (``--ckpt-keep-last N``) runs after the tracker names
the new checkpoint and never removes the one it names.

One limit: megatron-core writes three small files on rank 0 alone (``common.pt``,
``.metadata``, ``metadata.json``) while the other ranks wait in a collective. If one of
those writes fails (the disk filled up in the middle of the save), rank 0 reports the
cause and leaves; the others cannot be told why and report that another rank stopped
during the save of the same directory. :meth:`SaveGuard.prepare` writes a probe first, so
a full or read-only disk is almost always caught before megatron-core starts.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
from typing import Dict, Iterator, List, Optional

import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

from mtp_megatron.checkpoint.layout import (
    CheckpointError,
    iteration_dir,
    partial_dir,
    read_tracker,
    replaced_dir,
    restore_replaced,
    retention_victims,
    write_tracker,
)
from mtp_megatron.checkpoint.processes import no_orphan_writers
from mtp_megatron.runtime import comm

logger = logging.getLogger("mtp_megatron")

PROBE_NAME = ".write_probe"
PROBE_BYTES = 4096
# gloo's words when the peer process is gone (it failed elsewhere and exited)
_PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe")
# Test hook: MTP_MEGATRON_INJECT_SAVE_ERROR=<phase>:<rank>[:<iteration>] raises
# OSError(ENOSPC) on that rank in that phase (prepare, commit), as a full disk would.
INJECT_ENV = "MTP_MEGATRON_INJECT_SAVE_ERROR"


def describe(error: BaseException, details: Optional[List[Optional[str]]] = None) -> str:
    """One line for an error: errno text and path for OSError, the root cause for
    torch's CheckpointException (which carries the failing ranks' exceptions; ``details``,
    by rank, replace a failing rank's text with what its writer logged)."""
    if isinstance(error, CheckpointException):
        failures = getattr(error, "failures", {}) or {}
        parts = []
        for rank, (exc, _trace) in sorted(failures.items()):
            text = describe(exc).replace("RuntimeError: Worker failure: ", "")
            if details and rank < len(details) and details[rank]:
                text = details[rank]
            parts.append(f"rank {rank}: {text}")
        return "; ".join(parts) or "a write failed on another rank"
    if isinstance(error, OSError) and error.strerror:
        where = f": {error.filename!r}" if error.filename else ""
        return f"[Errno {error.errno}] {error.strerror}{where}"
    text = str(error).strip().splitlines()
    line = text[0][:300] if text else ""
    if "unexpected pos" in line:  # torch.save's zip writer after a short write
        line += " (a short write: the disk is full or a file size limit was hit)"
    return f"{type(error).__name__}: {line}"


class _WriterErrors(logging.Handler):
    """What megatron-core's checkpoint writers log when a write fails. 0.19's writer
    threads report a failed write as "An error is caught while starting worker 0, error:
    <class 'OSError'>" (the type only) and log the cause itself ("Local worker 0
    encountered an error: [Errno 27] File too large"); this keeps the first cause."""

    LOGGER = "megatron.core.dist_checkpointing"
    MARK = "encountered an error: "

    def __init__(self):
        super().__init__(level=logging.ERROR)
        self.first: Optional[str] = None

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if self.first is None and self.MARK in message:
            self.first = message.split(self.MARK, 1)[1].strip().splitlines()[0][:300]

    @contextlib.contextmanager
    def captured(self) -> Iterator[None]:
        log = logging.getLogger(self.LOGGER)
        log.addHandler(self)
        try:
            yield
        finally:
            log.removeHandler(self)


def _peer_gone(error: BaseException) -> bool:
    return any(words in str(error) for words in _PEER_GONE)


def _inject(phase: str, iteration: int) -> None:
    spec = os.environ.get(INJECT_ENV, "").split(":")
    if len(spec) < 2 or spec[0] != phase or spec[1] != str(dist.get_rank()):
        return
    if len(spec) > 2 and spec[2] != str(iteration):
        return
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), f"<{INJECT_ENV}>")


def from_rank0(text: Optional[str]) -> Optional[str]:
    """Rank 0's ``text`` on every rank (a collective: every rank must call it)."""
    return comm.broadcast_object(text, src=0)


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def prepare_partial(save_dir: str, iteration: int) -> str:
    """Rank 0: an empty ``iter_N.partial/``, proven writable by a probe file."""
    os.makedirs(save_dir, exist_ok=True)
    restore_replaced(save_dir)
    work = partial_dir(save_dir, iteration)
    if os.path.isdir(work) and not os.path.islink(work):
        shutil.rmtree(work)  # a leftover of an interrupted save
    os.makedirs(work)
    probe = os.path.join(work, PROBE_NAME)
    with open(probe, "wb") as fh:  # a full or read-only disk fails here, on rank 0
        fh.write(b"\0" * PROBE_BYTES)
        fh.flush()
        os.fsync(fh.fileno())
    os.remove(probe)
    return work


def commit_partial(save_dir: str, iteration: int, files: Dict[str, str]) -> str:
    """Rank 0, once every rank has written: ``iter_N.partial/`` becomes ``iter_N/``.

    A committed ``iter_N/`` (re-saving an iteration) is renamed aside first and removed
    only after the new copy is in place and the tracker names it.
    """
    work, final = partial_dir(save_dir, iteration), iteration_dir(save_dir, iteration)
    for name, text in files.items():
        with open(os.path.join(work, name), "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
    aside = None
    if os.path.exists(final):
        aside = replaced_dir(save_dir, iteration)
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(final, aside)
    os.replace(work, final)
    _fsync_dir(save_dir)
    write_tracker(save_dir, iteration)
    if aside:
        shutil.rmtree(aside, ignore_errors=True)
    return final


def remove_old(save_dir: str, keep_last: Optional[int]) -> List[str]:
    """``--ckpt-keep-last``: delete the older ``iter_N/`` (never the tracked one)."""
    if not keep_last:
        return []
    victims = retention_victims(save_dir, keep_last)
    for path in victims:
        shutil.rmtree(path, ignore_errors=True)
    return victims


class SaveGuard:
    """One save of ``iteration`` into ``save_dir``; see the module docstring."""

    def __init__(self, save_dir: str, iteration: int, keep_last: Optional[int] = None):
        self.save_dir, self.iteration, self.keep_last = save_dir, iteration, keep_last
        self.final = iteration_dir(save_dir, iteration)
        self.work = partial_dir(save_dir, iteration)
        self.rank = dist.get_rank()

    def _fail(self, causes: List[str], cleanup: bool = True) -> CheckpointError:
        if cleanup and self.rank == 0:
            shutil.rmtree(self.work, ignore_errors=True)
        try:
            previous = read_tracker(self.save_dir)
        except CheckpointError:
            previous = None
        kept = (f"the previous checkpoint {iteration_dir(self.save_dir, previous)} is intact"
                if previous is not None else "no earlier checkpoint exists here")
        return CheckpointError(
            f"cannot save checkpoint {self.final}: {'; '.join(causes)}. Nothing was "
            f"committed; {kept}. Free space or fix the permissions of {self.save_dir} "
            "(or choose another --save), then restart to resume."
        )

    def _rank0_then_agree(self, phase: str, action) -> None:
        cause = None
        if self.rank == 0:
            try:
                _inject(phase, self.iteration)
                action()
            except OSError as exc:
                cause = describe(exc)
        cause = from_rank0(cause)
        if cause:
            raise self._fail([f"rank 0: {cause}" if dist.get_world_size() > 1 else cause])

    def prepare(self) -> None:
        """Rank 0 makes ``iter_N.partial/``; all ranks agree before anyone writes."""
        self._rank0_then_agree("prepare", lambda: prepare_partial(self.save_dir,
                                                                  self.iteration))

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        """Around ``dist_checkpointing.save``: its failures as one CheckpointError."""
        writers = _WriterErrors()
        try:
            with writers.captured(), no_orphan_writers():
                yield
        except CheckpointException as exc:
            # megatron-core broadcast the failure: every rank is here; rank 0 (its
            # coordinator) holds every failing rank's exception, each rank its writers' log
            details = comm.all_gather_object(writers.first)
            raise self._fail([from_rank0(describe(exc, details))]) from None
        except Exception as exc:  # this rank alone: the others wait in a collective
            if _peer_gone(exc):
                causes = [f"another rank stopped while saving ({describe(exc)}); its own "
                          "error names the cause"]
            else:
                causes = [f"rank {self.rank}: {writers.first or describe(exc)}"]
            raise self._fail(causes) from None

    def commit(self, files: Dict[str, str]) -> str:
        """Rank 0 renames, updates the tracker and applies retention; all ranks agree."""
        removed: List[str] = []

        def _commit():
            commit_partial(self.save_dir, self.iteration, files)
            removed.extend(remove_old(self.save_dir, self.keep_last))

        self._rank0_then_agree("commit", _commit)
        for path in removed:
            logger.info("removed %s (--ckpt-keep-last %d)", path, self.keep_last)
        return self.final

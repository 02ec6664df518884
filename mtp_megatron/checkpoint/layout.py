"""Checkpoint directory layout, in Megatron-LM's shape, with atomic commits.

    <save>/iter_0000100/                    complete checkpoint (torch_dist format)
    <save>/iter_0000100/run_config.yaml     the resolved config of the run that saved it
    <save>/iter_0000200.partial/            a save in progress (or killed): never loaded
    <save>/iter_0000100.replaced/           a committed checkpoint being replaced by a
                                            re-save of the same iteration (see commit.py)
    <save>/latest_checkpointed_iteration.txt
    <save>/.save.lock                       the run that writes here (see lock.py)

A save writes into ``iter_N.partial/``; once every rank has finished, rank 0 renames it
to ``iter_N/`` and only then rewrites the tracker (write a temp file, ``os.replace``).
So the tracker never names a partial checkpoint, whatever is killed when. A committed
``iter_N/`` is never deleted before its replacement is complete: it is renamed to
``iter_N.replaced/`` first and removed only after the new one is in place;
:func:`restore_replaced` puts it back if a run died in between.
"""

from __future__ import annotations

import os
import re
import shutil
from typing import List, Optional, Tuple

TRACKER = "latest_checkpointed_iteration.txt"
PARTIAL_SUFFIX = ".partial"
REPLACED_SUFFIX = ".replaced"
CONFIG_NAME = "run_config.yaml"
COMPLETE_MARKER = "metadata.json"  # written last by dist_checkpointing.save
_ITER_RE = re.compile(r"^iter_(\d{7,})$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: the message names the path and what is wrong."""


def iteration_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def partial_dir(root: str, iteration: int) -> str:
    return iteration_dir(root, iteration) + PARTIAL_SUFFIX


def read_tracker(root: str) -> Optional[int]:
    """The latest complete iteration under ``root``, or None when there is none."""
    path = os.path.join(root, TRACKER)
    if not os.path.isfile(path):
        return None
    text = open(path).read().strip()
    try:
        return int(text)
    except ValueError:
        raise CheckpointError(
            f"{path}: expected an iteration number, found {text[:40]!r}; "
            "fix or delete the file, or pass --load with a checkpoint directory"
        ) from None


def write_text_atomic(path: str, text: str) -> None:
    """``text`` to ``path`` all or nothing: a temp file, fsync, ``os.replace``."""
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def write_tracker(root: str, iteration: int) -> None:
    write_text_atomic(os.path.join(root, TRACKER), f"{iteration}\n")


def partial_saves(root: str) -> List[str]:
    """Interrupted saves left under ``root`` (reported, never loaded)."""
    if not os.path.isdir(root):
        return []
    return sorted(os.path.join(root, d) for d in os.listdir(root) if d.endswith(PARTIAL_SUFFIX))


def replaced_dir(root: str, iteration: int) -> str:
    return iteration_dir(root, iteration) + REPLACED_SUFFIX


def is_complete(directory: str) -> bool:
    """A committed checkpoint directory with dist_checkpointing's closing metadata."""
    return os.path.isfile(os.path.join(directory, COMPLETE_MARKER))


def committed_iterations(root: str) -> List[Tuple[int, str]]:
    """``(iteration, directory)`` of every ``iter_N/`` under ``root``, oldest first."""
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        match = _ITER_RE.match(name)
        if match and os.path.isdir(os.path.join(root, name)):
            found.append((int(match.group(1)), os.path.join(root, name)))
    return sorted(found)


def retention_victims(root: str, keep_last: int) -> List[str]:
    """The ``iter_N/`` directories beyond the ``keep_last`` most recent ones, never the
    one the tracker names (it stays even when a newer, untracked one exists)."""
    if keep_last < 1:
        raise ValueError(f"keep_last={keep_last}: keep at least one checkpoint")
    tracked = read_tracker(root)
    committed = committed_iterations(root)
    keep = {it for it, _ in committed[-keep_last:]} | {tracked}
    return [path for it, path in committed if it not in keep]


def restore_replaced(root: str) -> List[str]:
    """Finish or undo replacements that a killed run left half done; return what it did.

    ``iter_N.replaced/`` next to a complete ``iter_N/``: the new copy was committed, drop
    the old one. Without a complete ``iter_N/``: the old copy is the good one, put it back.
    """
    actions = []
    if not os.path.isdir(root):
        return actions
    for name in sorted(os.listdir(root)):
        if not name.endswith(REPLACED_SUFFIX):
            continue
        old = os.path.join(root, name)
        final = old[: -len(REPLACED_SUFFIX)]
        if is_complete(final):
            shutil.rmtree(old, ignore_errors=True)
            actions.append(f"removed {old} (replaced by {final})")
        else:
            if os.path.exists(final):
                shutil.rmtree(final, ignore_errors=True)
            os.replace(old, final)
            actions.append(f"restored {final} from {old}")
    return actions


def resolve_load_dir(path: str) -> tuple[str, int]:
    """``path`` is a save root (with a tracker) or one ``iter_N`` directory.

    Returns (iteration directory, iteration). Raises CheckpointError naming the path.
    """
    if not os.path.exists(path):
        raise CheckpointError(f"--load {path}: no such directory")
    if not os.path.isdir(path):
        raise CheckpointError(f"--load {path}: is a file, expected a directory (a --save "
                              "directory of a previous run, or one of its iter_N directories)")
    iteration = read_tracker(path)
    if iteration is not None:
        directory = iteration_dir(path, iteration)
    elif os.path.basename(os.path.normpath(path)).startswith("iter_"):
        directory = path
        try:
            iteration = int(os.path.basename(os.path.normpath(path))[5:])
        except ValueError:
            raise CheckpointError(f"--load {path}: cannot read the iteration from the name") \
                from None
    else:
        raise CheckpointError(
            f"--load {path}: no {TRACKER} and not an iter_N directory; "
            "point --load at a --save directory of a previous run"
        )
    if directory.endswith(PARTIAL_SUFFIX):
        raise CheckpointError(f"--load {path}: {directory} is an interrupted save")
    if not is_complete(directory) and is_complete(directory + REPLACED_SUFFIX):
        directory += REPLACED_SUFFIX  # a re-save of this iteration was killed; the old copy
    if not is_complete(directory):
        raise CheckpointError(
            f"--load {path}: {directory} is missing or incomplete (no metadata.json)"
        )
    return directory, iteration

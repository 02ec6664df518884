"""Checkpoint directory layout, in Megatron-LM's shape, with atomic commits.

    <save>/iter_0000100/                    complete checkpoint (torch_dist format)
    <save>/iter_0000100/run_config.yaml     the resolved config of the run that saved it
    <save>/iter_0000200.partial/            a save in progress (or killed): never loaded
    <save>/latest_checkpointed_iteration.txt

A save writes into ``iter_N.partial/``; once every rank has finished, rank 0 renames it
to ``iter_N/`` and only then rewrites the tracker (write a temp file, ``os.replace``).
So the tracker never names a partial checkpoint, whatever is killed when.
"""

from __future__ import annotations

import os
from typing import List, Optional

TRACKER = "latest_checkpointed_iteration.txt"
PARTIAL_SUFFIX = ".partial"
CONFIG_NAME = "run_config.yaml"


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


def write_tracker(root: str, iteration: int) -> None:
    tmp = os.path.join(root, TRACKER + ".tmp")
    with open(tmp, "w") as fh:
        fh.write(f"{iteration}\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, os.path.join(root, TRACKER))


def partial_saves(root: str) -> List[str]:
    """Interrupted saves left under ``root`` (reported, never loaded)."""
    if not os.path.isdir(root):
        return []
    return sorted(os.path.join(root, d) for d in os.listdir(root) if d.endswith(PARTIAL_SUFFIX))


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
    if not os.path.isfile(os.path.join(directory, "metadata.json")):
        raise CheckpointError(
            f"--load {path}: {directory} is missing or incomplete (no metadata.json)"
        )
    return directory, iteration

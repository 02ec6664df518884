"""Where the scalars go: one writer, several sinks, for training and validation alike.

Training and validation rows go through the same :class:`MetricsWriter`, so every sink
sees the same numbers: ``<output-dir>/metrics.jsonl`` always (validation rows carry
``"split": "valid"``), tensorboard with ``--tensorboard-dir``, Weights & Biases with
``--wandb-project``. Validation scalars are tagged ``"<name> validation"`` in tensorboard
and wandb, as Megatron-LM tags them.

    writer = MetricsWriter.for_run(cfg.logging, enabled=is_last_rank, config=to_dict(cfg))
    writer.write({"iteration": 10, "tokens": 20480, "lm loss": 3.2})
    writer.write({"iteration": 10, "tokens": 20480, "lm loss": 3.3}, split="valid")
    writer.close()

``metrics.jsonl`` describes one run. A run that starts at iteration 0 in an output
directory that already has one moves the old file aside (``metrics.1.jsonl``, then
``.2``, ...); a run resumed at iteration N drops the rows past N (the iterations a crash
lost are redone, and would otherwise appear twice). The file's one reader is here too,
used by ``plot``, ``experiments`` and the tests:

    train, valid = read_run("runs/default")   # an --output-dir, or the .jsonl itself

Whether tensorboard and wandb are installed is checked before the run starts
(``runtime/preflight.py``); here they are only imported.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

logger = logging.getLogger("mtp_megatron")

Row = Dict[str, Any]
NOT_SCALARS = ("iteration", "tokens", "split")  # axes and labels, not curves


def scalars(row: Row, split: str) -> Iterator[Tuple[str, float]]:
    """``(tag, value)`` of a row's numeric entries; validation tags end in ' validation'."""
    for key, value in row.items():
        if key in NOT_SCALARS or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        yield (key if split == "train" else f"{key} validation"), float(value)


METRICS_FILE = "metrics.jsonl"


def metrics_path(path: str) -> str:
    """``path`` itself if it is a ``.jsonl`` file, else ``path/metrics.jsonl`` (a run's
    --output-dir)."""
    return path if path.endswith(".jsonl") else os.path.join(path, METRICS_FILE)


def read_rows(path: str) -> List[Row]:
    """The rows of a ``metrics.jsonl`` (or of a run's --output-dir), in file order. A torn
    last line, left by a run killed mid-write, is skipped; a bad line elsewhere is a
    ``ValueError`` naming the file and line."""
    file = metrics_path(path)
    with open(file) as fh:
        lines = fh.read().splitlines()
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except ValueError:
            if number == len(lines):
                continue  # torn by a kill mid-write
            raise ValueError(f"{file}:{number}: not a JSON line") from None
    return rows


def read_run(path: str) -> Tuple[List[Row], List[Row]]:
    """(training rows, validation rows) of a run's metrics, in file order."""
    train, valid = [], []
    for row in read_rows(path):
        (valid if row.get("split") == "valid" else train).append(row)
    return train, valid


def start_run_file(path: str, iteration: int) -> Optional[str]:
    """Make ``path`` hold this run's rows only, before it appends: a run starting at
    iteration 0 moves an existing file aside, a run resumed at ``iteration`` drops the rows
    past it. Returns what was done (to log), or None."""
    if not os.path.exists(path) or os.path.getsize(path) == 0:
        return None
    if iteration == 0:
        stem, ext = os.path.splitext(path)
        n = 1
        while os.path.exists(f"{stem}.{n}{ext}"):
            n += 1
        os.replace(path, f"{stem}.{n}{ext}")
        return (f"{path} holds an earlier run's metrics: moved to {stem}.{n}{ext}; this run "
                "writes a new one")
    with open(path) as fh:
        lines = fh.readlines()
    kept = [line for line in lines if _iteration(line) is not None
            and _iteration(line) <= iteration]
    if len(kept) == len(lines):
        return None
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        fh.writelines(line if line.endswith("\n") else line + "\n" for line in kept)
    os.replace(tmp, path)
    return (f"{path}: dropped {len(lines) - len(kept)} rows past iteration {iteration}, "
            "where this run resumes (they are redone)")


def _iteration(line: str) -> Optional[int]:
    try:
        return int(json.loads(line)["iteration"])
    except (ValueError, KeyError, TypeError):
        return None


class JsonlSink:
    """One JSON object per line, appended to ``path`` (the input of ``mtp_megatron.plot``).

    ``start_iteration``: where the run starts (0, or the resumed iteration): see
    :func:`start_run_file`; None appends to whatever is there."""

    def __init__(self, path: str, start_iteration: Optional[int] = None):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        if start_iteration is not None:
            note = start_run_file(path, start_iteration)
            if note:
                logger.warning(note)
        self.fh = open(path, "a")

    def write(self, row: Row, split: str) -> None:
        out = row if split == "train" else {"iteration": row["iteration"], "split": split,
                                            **row}
        self.fh.write(json.dumps(out) + "\n")
        self.fh.flush()

    def close(self) -> None:
        self.fh.close()


class TensorboardSink:
    def __init__(self, log_dir: str):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=log_dir)

    def write(self, row: Row, split: str) -> None:
        for tag, value in scalars(row, split):
            self.writer.add_scalar(tag, value, row["iteration"])
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    """Weights & Biases; ``WANDB_MODE=offline`` keeps everything under ``save_dir``."""

    def __init__(self, project: str, name: Optional[str], save_dir: str,
                 config: Optional[Dict[str, Any]] = None):
        import wandb

        os.makedirs(save_dir, exist_ok=True)
        self.run = wandb.init(project=project, name=name, dir=save_dir, config=config or {})

    def write(self, row: Row, split: str) -> None:
        values = dict(scalars(row, split))
        if "tokens" in row:
            values["tokens"] = row["tokens"]
        self.run.log(values, step=row["iteration"])

    def close(self) -> None:
        self.run.finish()


class MetricsWriter:
    """Fans each row out to its sinks; with no sinks (other ranks) it does nothing."""

    def __init__(self, sinks: Sequence[Any] = ()):
        self.sinks: List[Any] = list(sinks)

    @classmethod
    def for_run(cls, logs, *, enabled: bool, config: Optional[Dict[str, Any]] = None,
                start_iteration: int = 0) -> "MetricsWriter":
        """The sinks ``logs`` (a :class:`LoggingConfig`) asks for, on the logging rank, for
        a run that starts at ``start_iteration`` (0, or where it resumed)."""
        if not enabled:
            return cls()
        sinks: List[Any] = []
        if logs.output_dir:
            sinks.append(JsonlSink(os.path.join(logs.output_dir, "metrics.jsonl"),
                                   start_iteration=start_iteration))
        if logs.tensorboard_dir:
            sinks.append(TensorboardSink(logs.tensorboard_dir))
        if logs.wandb_project:
            save_dir = logs.wandb_save_dir or os.path.join(logs.output_dir, "wandb")
            name = logs.wandb_exp_name or os.path.basename(os.path.abspath(logs.output_dir))
            sinks.append(WandbSink(logs.wandb_project, name, save_dir, config))
        return cls(sinks)

    def write(self, row: Row, split: str = "train") -> None:
        """``row`` has ``iteration`` (and ``tokens``, the tokens consumed so far)."""
        for sink in self.sinks:
            sink.write(row, split)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
        self.sinks = []

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

Whether tensorboard and wandb are installed is checked before the run starts
(``runtime/preflight.py``); here they are only imported.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

Row = Dict[str, Any]
NOT_SCALARS = ("iteration", "tokens", "split")  # axes and labels, not curves


def scalars(row: Row, split: str) -> Iterator[Tuple[str, float]]:
    """``(tag, value)`` of a row's numeric entries; validation tags end in ' validation'."""
    for key, value in row.items():
        if key in NOT_SCALARS or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        yield (key if split == "train" else f"{key} validation"), float(value)


class JsonlSink:
    """One JSON object per line, appended to ``path`` (the input of ``mtp_megatron.plot``)."""

    def __init__(self, path: str):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
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
    def for_run(cls, logs, *, enabled: bool, config: Optional[Dict[str, Any]] = None
                ) -> "MetricsWriter":
        """The sinks ``logs`` (a :class:`LoggingConfig`) asks for, on the logging rank."""
        if not enabled:
            return cls()
        sinks: List[Any] = []
        if logs.output_dir:
            sinks.append(JsonlSink(os.path.join(logs.output_dir, "metrics.jsonl")))
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

"""Plot training curves from one or more runs' metrics.jsonl, overlaid, to a PNG.

    python -m mtp_megatron.plot runs/baseline runs/mtp1 runs/mtp2 --out compare.png

One row of panels per curve (lm loss; each ``mtp_k loss``; validation loss, the lm loss
solid and the depths dashed; validation acceptance per depth), one column against
iterations and one against tokens consumed. Each run keeps one colour. Needs matplotlib
(``pip install -e .[plot]``).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

from mtp_megatron.training import writers

MTP_LOSS = re.compile(r"^mtp_(\d+) loss$")
ACCEPTANCE = re.compile(r"^(mtp|chained)_(\d+) acceptance$")


class PlotError(ValueError):
    """A run directory without usable metrics, or matplotlib missing."""


@dataclass
class Run:
    name: str
    train: List[dict] = field(default_factory=list)
    valid: List[dict] = field(default_factory=list)


def read_run(path: str) -> Run:
    """The training and validation rows of ``path/metrics.jsonl`` (or a .jsonl file)."""
    file = writers.metrics_path(path)
    if not os.path.isfile(file):
        raise PlotError(f"{path}: no metrics.jsonl (is it a run's --output-dir?)")
    name = os.path.basename(os.path.dirname(os.path.abspath(file)))
    run = Run(name)
    tokens_per_iter = _tokens_per_iteration(os.path.dirname(file))
    try:
        run.train, run.valid = writers.read_run(file)
    except ValueError as exc:
        raise PlotError(str(exc)) from None
    for row in run.train + run.valid:
        if "tokens" not in row and tokens_per_iter:
            row["tokens"] = row["iteration"] * tokens_per_iter  # runs from before tokens
    if not run.train and not run.valid:
        raise PlotError(f"{file}: no rows")
    return run


def _tokens_per_iteration(run_dir: str) -> Optional[int]:
    path = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(path):
        return None
    import yaml

    with open(path) as fh:
        cfg = yaml.safe_load(fh) or {}
    try:
        return int(cfg["training"]["global_batch_size"]) * int(cfg["model"]["seq_length"])
    except (KeyError, TypeError, ValueError):
        return None


def panels(runs: Sequence[Run]) -> List[Tuple[str, str, List[str]]]:
    """``(title, split, keys)`` for each row of panels, in order; only what some run has."""
    def keys(split: str, pattern) -> List[str]:
        found = {k for run in runs for row in getattr(run, split) for k in row
                 if pattern.match(k)}
        # mtp_1, mtp_2, ..., then chained_2, ...
        return sorted(found, key=lambda k: (not k.startswith("mtp_"),
                                            int(pattern.match(k).groups()[-1])))

    rows = []
    if any("lm loss" in r for run in runs for r in run.train):
        rows.append(("lm loss", "train", ["lm loss"]))
    rows += [(k, "train", [k]) for k in keys("train", MTP_LOSS)]
    if any(run.valid for run in runs):
        rows.append(("validation loss", "valid", ["lm loss"] + keys("valid", MTP_LOSS)))
        acceptance = keys("valid", ACCEPTANCE)
        if acceptance:
            rows.append(("validation acceptance", "valid", acceptance))
    return rows


def series(rows: Sequence[dict], x: str, key: str) -> Tuple[List[float], List[float]]:
    points = [(r[x], r[key]) for r in rows if r.get(key) is not None and r.get(x) is not None]
    return [p[0] for p in points], [p[1] for p in points]


def plot(runs: Sequence[Run], out: str) -> str:
    """Draw ``runs`` overlaid into ``out`` (PNG); returns ``out``."""
    try:
        import matplotlib
    except ImportError:
        raise PlotError("python -m mtp_megatron.plot needs matplotlib: "
                        "pip install -e .[plot]") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = panels(runs)
    if not rows:
        raise PlotError("no losses to plot in " + ", ".join(r.name for r in runs))
    fig, axes = plt.subplots(len(rows), 2, figsize=(12, 3.2 * len(rows)), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for (title, split, keys), (by_iter, by_tokens) in zip(rows, axes):
        for ax, x in ((by_iter, "iteration"), (by_tokens, "tokens")):
            for i, run in enumerate(runs):
                for j, key in enumerate(keys):
                    xs, ys = series(getattr(run, split), x, key)
                    label = run.name if keys == [title] else f"{run.name}: {key}"
                    ax.plot(xs, ys, color=colours[i % len(colours)], label=label,
                            linestyle="-" if j == 0 else ("--", ":", "-.")[(j - 1) % 3],
                            marker="o" if split == "valid" else None, markersize=3)
            ax.set_title(title)
            ax.set_xlabel("iterations" if x == "iteration" else "tokens")
            ax.grid(alpha=0.3)
            ax.legend(fontsize="small")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m mtp_megatron.plot", description=__doc__
                                     .split("\n\n")[0])
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR",
                        help="A run's --output-dir (its metrics.jsonl), or the .jsonl itself.")
    parser.add_argument("--out", help="The PNG to write (default: RUN_DIR/metrics.png for "
                                      "one run, metrics.png here for several).")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    out = args.out or (os.path.join(args.runs[0], "metrics.png") if len(args.runs) == 1
                       and os.path.isdir(args.runs[0]) else "metrics.png")
    try:
        runs = [read_run(path) for path in args.runs]
        print(f"wrote {plot(runs, out)}")
    except PlotError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

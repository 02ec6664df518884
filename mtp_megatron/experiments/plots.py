"""The experiment's PNGs (matplotlib, headless): loss curves and acceptance per depth.

* ``valid_loss.png``: main-head validation lm loss against training tokens (left) and
  training FLOPs (right), one line per variant (mean over seeds);
* ``acceptance.png``: validation acceptance per MTP depth and chained acceptance.

    paths = write_plots(results, "runs/compare")
"""

from __future__ import annotations

import logging
import os
from typing import Dict, List

logger = logging.getLogger("mtp_megatron")


def _mean_curves(runs: List[Dict]) -> Dict[str, Dict[str, List[float]]]:
    """Per variant: tokens, flops and the seed-mean loss at each validation point."""
    curves: Dict[str, Dict[int, List[Dict]]] = {}
    for run in runs:
        for point in run["curve"]:
            curves.setdefault(run["variant"], {}).setdefault(point["iteration"], []).append(point)
    out = {}
    for variant, by_iter in curves.items():
        its = sorted(by_iter)
        out[variant] = {
            "tokens": [by_iter[i][0]["tokens"] for i in its],
            "flops": [by_iter[i][0]["flops"] for i in its],
            "loss": [sum(p["valid_lm_loss"] for p in by_iter[i]) / len(by_iter[i]) for i in its],
        }
    return out


def write_plots(results: Dict, out_dir: str) -> List[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: no PNGs (pip install -e .[plot])")
        return []
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    curves = _mean_curves(results["runs"])
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for variant in sorted(curves):
        c = curves[variant]
        style = "--" if variant.startswith("baseline") else "-"
        for ax, x in zip(axes, ("tokens", "flops")):
            ax.plot(c[x], c["loss"], style, marker="o", ms=3, label=variant)
    axes[0].set(xlabel="training tokens", ylabel="validation lm loss (main head)",
                title="Next-token loss vs tokens")
    axes[1].set(xlabel="training FLOPs", title="Next-token loss vs training FLOPs")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "valid_loss.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    mtp = {name: v for name, v in results["variants"].items() if v["depth"]}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for name in sorted(mtp):
        v = mtp[name]
        depths = list(range(1, v["depth"] + 1))
        for ax, key in zip(axes, ("acceptance", "chained_acceptance")):
            means = [s["mean"] for s in v[key]]
            stds = [s["std"] for s in v[key]]
            ax.errorbar(depths, means, yerr=stds, marker="o", capsize=3, label=name)
    axes[0].set(xlabel="MTP depth k", ylabel="top-1 acceptance (validation)",
                title="Acceptance per depth", ylim=(0, 1))
    axes[1].set(xlabel="draft length k", ylabel="depths 1..k all right",
                title="Chained acceptance", ylim=(0, 1))
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        ax.set_xticks(range(1, max([v["depth"] for v in mtp.values()], default=1) + 1))
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "acceptance.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths

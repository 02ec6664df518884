"""Seeds -> mean +- std, comparisons against the baselines, results.json and the tables.

Every comparison pairs runs of the same seed: ``delta_equal_tokens`` is the MTP run's
main-head validation loss minus the baseline's (same iterations), ``delta_equal_flops``
minus the equal-FLOPs baseline's (``baseline_eqflops_d<D>``); negative = MTP is better.
Speed: ``step_time_ratio`` = MTP ms/iter over baseline ms/iter (measured) next to
``flop_ratio`` (the FLOP model's prediction of the same number).

    summary = summarize(results, flop_ratios={1: 1.16, 2: 1.33})
    write_markdown(summary, "runs/compare/results.md")
"""

from __future__ import annotations

import math
import os
from typing import Dict, List, Optional

SCHEMA_VERSION = 1
SCALARS = ("valid_lm_loss", "valid_lm_ppl", "valid_lm_accuracy", "train_objective",
           "ms_per_iter", "tokens_per_s", "peak_rss_mib", "peak_gpu_mib", "tokens",
           "train_flops", "train_iters")
LISTS = ("valid_mtp_loss", "acceptance", "chained_acceptance")


def mean_std(values: List[Optional[float]]) -> Optional[Dict[str, float]]:
    """``{"mean", "std", "n"}`` (sample std, 0 for one value); None without values."""
    values = [float(v) for v in values if v is not None]
    if not values:
        return None
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1) if len(values) > 1 else 0.0
    return {"mean": mean, "std": math.sqrt(var), "n": len(values)}


def _by_variant(results: List[Dict]) -> Dict[str, List[Dict]]:
    groups: Dict[str, List[Dict]] = {}
    for r in results:
        groups.setdefault(r["variant"], []).append(r)
    return groups


def _paired(runs: List[Dict], base: Dict[int, Dict], fn) -> Optional[Dict[str, float]]:
    return mean_std([fn(r, base[r["seed"]]) for r in runs if r["seed"] in base])


def _speculative(runs: List[Dict]) -> Optional[Dict]:
    reports = [r["speculative"] for r in runs if r.get("speculative")]
    if not reports:
        return None
    out = {}
    for key in reports[0]["modes"]:
        modes = [rep["modes"][key] for rep in reports]
        out[key] = {
            "tokens_per_main_forward": mean_std([m["tokens_per_main_forward"] for m in modes]),
            "speedup": mean_std([m["speedup"] for m in modes]),
            "acceptance_per_position": [mean_std(list(v)) for v in
                                        zip(*[m["acceptance_per_position"] for m in modes])],
            "matches_greedy": all(m["matches_greedy"] for m in modes),
        }
    return out


def summarize(results: List[Dict], flop_ratios: Dict[int, float]) -> Dict:
    """Per-variant aggregates and the paired comparisons against the baselines."""
    groups = _by_variant(results)
    base = {r["seed"]: r for r in groups.get("baseline", [])}
    variants = {}
    for name, runs in groups.items():
        depth, flops_depth = runs[0]["depth"], runs[0]["flops_depth"]
        entry = {"depth": depth, "factor": runs[0]["factor"], "flops_depth": flops_depth,
                 "depth_weights": runs[0].get("depth_weights", "uniform"),
                 "schedule": runs[0].get("schedule", "constant"),
                 "seeds": sorted(r["seed"] for r in runs)}
        for key in SCALARS:
            entry[key] = mean_std([r.get(key) for r in runs])
        for key in LISTS:
            entry[key] = [mean_std(list(v)) for v in zip(*[r[key] for r in runs])]
        if depth:
            flops_base = {r["seed"]: r for r in groups.get(f"baseline_eqflops_d{depth}", [])}
            entry["delta_equal_tokens"] = _paired(
                runs, base, lambda r, b: r["valid_lm_loss"] - b["valid_lm_loss"])
            entry["delta_equal_flops"] = _paired(
                runs, flops_base, lambda r, b: r["valid_lm_loss"] - b["valid_lm_loss"])
            entry["step_time_ratio"] = _paired(
                runs, base, lambda r, b: r["ms_per_iter"] / b["ms_per_iter"])
            entry["tokens_per_s_ratio"] = _paired(
                runs, base, lambda r, b: r["tokens_per_s"] / b["tokens_per_s"])
            entry["flop_ratio"] = flop_ratios.get(depth)
            entry["speculative"] = _speculative(runs)
        elif flops_depth:
            entry["flop_ratio"] = flop_ratios.get(flops_depth)
            entry["delta_vs_equal_tokens_baseline"] = _paired(
                runs, base, lambda r, b: r["valid_lm_loss"] - b["valid_lm_loss"])
        variants[name] = entry
    return {"variants": variants}


def build_results(spec_dict: Dict, summary: Dict, runs: List[Dict], *, flop_ratios: Dict,
                  command: str, wall_seconds: float, load_average: List[float],
                  environment: Dict) -> Dict:
    """The results.json document (``SCHEMA_VERSION``)."""
    return {
        "schema_version": SCHEMA_VERSION,
        "command": command,
        "wall_seconds": round(wall_seconds, 1),
        "load_average": [round(x, 2) for x in load_average],
        "environment": environment,
        "spec": spec_dict,
        "flop_ratios": {str(k): v for k, v in sorted(flop_ratios.items())},
        "comparison": "main-head next-token validation loss (lm loss), paired by seed; "
                      "never the MTP training objective",
        "variants": summary["variants"],
        "runs": runs,
    }


# -- markdown ----------------------------------------------------------------------------
def fmt(stat: Optional[Dict[str, float]], digits: int = 4, signed: bool = False) -> str:
    if not stat:
        return "-"
    sign = "+" if signed else ""
    text = f"{stat['mean']:{sign}.{digits}f}"
    return text + (f" ± {stat['std']:.{digits}f}" if stat["n"] > 1 else "")


def _list(stats: List[Optional[Dict]], digits: int = 3) -> str:
    return " / ".join(fmt(s, digits) for s in stats) if stats else "-"


def _order(variants: Dict) -> List[str]:
    def key(name):
        v = variants[name]
        return (v["flops_depth"] is not None, v["depth"], v["factor"] or 0.0,
                v.get("depth_weights", "uniform") != "uniform",
                v.get("schedule", "constant") != "constant", name)
    return sorted(variants, key=key)


def _objective(variant: Dict) -> str:
    """'depth weights | factor schedule' cells ('-' for a baseline)."""
    if not variant["depth"]:
        return "- | -"
    return f"{variant.get('depth_weights', 'uniform')} | {variant.get('schedule', 'constant')}"


def quality_table(results: Dict) -> List[str]:
    lines = ["| run | D | factor | depth weights | factor schedule | iters | tokens | "
             "valid lm loss (main head) | PPL | "
             "Δ vs baseline, equal tokens | Δ vs baseline, equal FLOPs | "
             "valid MTP loss per depth | acceptance per depth | chained acceptance |",
             "|" + "---|" * 14]
    variants = results["variants"]
    for name in _order(variants):
        v = variants[name]
        delta_t = v.get("delta_equal_tokens") or v.get("delta_vs_equal_tokens_baseline")
        lines.append(
            f"| {name} | {v['depth']} | {v['factor'] if v['factor'] is not None else '-'} | "
            f"{_objective(v)} | {fmt(v['train_iters'], 0)} | {fmt(v['tokens'], 0)} | "
            f"{fmt(v['valid_lm_loss'])} | "
            f"{fmt(v['valid_lm_ppl'], 3)} | {fmt(delta_t, 4, True)} | "
            f"{fmt(v.get('delta_equal_flops'), 4, True)} | {_list(v['valid_mtp_loss'])} | "
            f"{_list(v['acceptance'])} | {_list(v['chained_acceptance'])} |")
    return lines


def cost_table(results: Dict) -> List[str]:
    lines = ["| run | FLOP model ratio | measured step-time ratio | tokens/s ratio | ms/iter | "
             "tokens/s | peak RSS MiB | peak GPU MiB |", "|" + "---|" * 8]
    variants = results["variants"]
    for name in _order(variants):
        v = variants[name]
        ratio = v.get("flop_ratio")
        lines.append(
            f"| {name} | {f'{ratio:.4f}' if ratio else ('1' if name == 'baseline' else '-')} | "
            f"{fmt(v.get('step_time_ratio'), 3)} | {fmt(v.get('tokens_per_s_ratio'), 3)} | "
            f"{fmt(v['ms_per_iter'], 1)} | {fmt(v['tokens_per_s'], 0)} | "
            f"{fmt(v['peak_rss_mib'], 0)} | {fmt(v['peak_gpu_mib'], 0)} |")
    return lines


def speculative_table(results: Dict) -> List[str]:
    lines = ["| run | draft depth k | tokens per main forward | speedup vs greedy | "
             "acceptance per draft position | identical to greedy |", "|" + "---|" * 6]
    variants = results["variants"]
    for name in _order(variants):
        spec = variants[name].get("speculative")
        for key, m in sorted((spec or {}).items()):
            if key == "k0":
                continue
            lines.append(f"| {name} | {key[1:]} | {fmt(m['tokens_per_main_forward'], 3)} | "
                         f"{fmt(m['speedup'], 3)} | {_list(m['acceptance_per_position'])} | "
                         f"{'yes' if m['matches_greedy'] else 'NO'} |")
    return lines


def markdown(results: Dict, pngs: List[str]) -> str:
    ratios = ", ".join(f"D={k}: {v:.4f}" for k, v in results["flop_ratios"].items() if k != "0")
    spec = results["spec"]
    out = [
        "## Results", "",
        f"Command: `{results['command']}`  ",
        f"Wall time: {results['wall_seconds']:.0f} s; load average at the end "
        f"{results['load_average']}; seeds {spec['seeds']} (mean ± sample std, paired by seed).",
        "",
        f"Training FLOPs per token relative to the baseline (model/counting.py): {ratios}. "
        "The equal-FLOPs baselines train that many times more iterations (and tokens).",
        "",
        "### Next-token quality (main head only; Δ < 0: MTP better)", "",
        *quality_table(results), "",
        "### Training cost", "",
        *cost_table(results), "",
    ]
    spec_lines = speculative_table(results)
    if len(spec_lines) > 2:
        out += ["### Self-speculative decoding on held-out prompts", "", *spec_lines, ""]
    out += [f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in pngs]
    return "\n".join(out) + "\n"


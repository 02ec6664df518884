"""Decode a list of prompts greedily and speculatively in one process, and report.

Both modes run on the same runner (the same KV-cache code), prompt by prompt and
interleaved, after one warm-up generation, so their tokens/s are comparable.
"""

from __future__ import annotations

import json
import math
from typing import Any, Callable, Dict, List, Optional, Tuple

from megatron.core.models.gpt.gpt_model import GPTModel

from mtp_megatron.inference.decoding import Generation, generate
from mtp_megatron.inference.runner import KVCachedRunner
from mtp_megatron.inference.stats import DecodeStats


def run_modes(runner: KVCachedRunner, prompts: List[List[int]], depths: List[int], *,
              max_new_tokens: int, eod: Optional[int]
              ) -> Dict[int, Tuple[DecodeStats, List[Generation]]]:
    """Every prompt with every draft depth (0 = greedy), interleaved prompt by prompt.

    Returns ``{depth: (merged stats, generations in prompt order)}``.
    """
    generate(runner, prompts[0], max_new_tokens=min(8, max_new_tokens),
             draft_depth=max(depths), eod=None)  # warm-up: allocations, first-call costs
    results = {k: (DecodeStats(draft_depth=k), []) for k in depths}
    for prompt in prompts:
        for k in depths:
            gen = generate(runner, prompt, max_new_tokens=max_new_tokens, draft_depth=k, eod=eod)
            results[k][0].merge(gen.stats)
            results[k][1].append(gen)
    return results


def decode_prompts(model: GPTModel, prompts: List[List[int]], *, vocab_size: int,
                   max_new_tokens: int, draft_depth: int, eod: Optional[int],
                   baseline: bool = True,
                   detokenize: Optional[Callable[[List[int]], str]] = None) -> Dict:
    """Generate for every prompt; with ``draft_depth > 0`` and ``baseline`` also greedily.

    Returns a report: per-prompt outputs, the summary of each mode, the speedup and
    whether speculative decoding reproduced greedy decoding token for token.
    """
    runner = KVCachedRunner(model, vocab_size)
    depths = [0, draft_depth] if draft_depth and baseline else [draft_depth]
    results = run_modes(runner, prompts, depths, max_new_tokens=max_new_tokens, eod=eod)
    stats, gens = results[draft_depth]
    outputs = []
    for i, (prompt, gen) in enumerate(zip(prompts, gens)):
        entry = {"prompt_tokens": len(prompt), "tokens": gen.tokens,
                 "finish_reason": gen.finish_reason}
        if detokenize is not None:
            entry["text"] = detokenize([t for t in gen.tokens if t != eod])
        if len(depths) > 1:
            entry["matches_greedy"] = gen.tokens == results[0][1][i].tokens
        outputs.append(entry)
    report = {"mode": "mtp-speculative" if draft_depth else "greedy", "outputs": outputs,
              draft_key(draft_depth): stats.summary()}
    if len(depths) > 1:
        greedy = results[0][0]
        report["greedy"] = greedy.summary()
        report["speedup"] = speedup(stats, greedy)
        report["matches_greedy"] = all(o["matches_greedy"] for o in outputs)
    return report


def speedup(spec: DecodeStats, greedy: DecodeStats, cpu: bool = False) -> Optional[float]:
    """Ratio of tokens/s (of wall time, or with ``cpu`` of process CPU time), speculative
    over greedy: same prompts, same process."""
    if cpu:
        a, b = spec.tokens_per_cpu_second, greedy.tokens_per_cpu_second
    else:
        a, b = spec.tokens_per_second, greedy.tokens_per_second
    return round(a / b, 3) if b else None


def draft_key(draft_depth: int) -> str:
    return f"speculative_k{draft_depth}" if draft_depth else "greedy"


def report_json(report: Dict) -> str:
    """The report as strict JSON: an undefined number (NaN, e.g. the acceptance of a draft
    position never reached, or an infinity) is ``null``, which jq and JavaScript accept."""
    return json.dumps(_finite_or_none(report), indent=2, allow_nan=False)


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(v) for v in value]
    return value


def format_report(report: Dict) -> str:
    """Outputs, then one line per mode, then the speedup."""
    lines = []
    for i, out in enumerate(report["outputs"]):
        text = out.get("text", " ".join(map(str, out["tokens"])))
        lines.append(f"[{i}] ({out['finish_reason']}, {len(out['tokens'])} tokens) {text}")
    lines.append("")
    lines.append(f"{'mode':<16}{'tok/s':>9}{'fwd/tok':>9}{'acc/step':>10}  acceptance per position")
    for key in ("greedy",) + tuple(k for k in report if k.startswith("speculative_")):
        if key not in report:
            continue
        s = report[key]
        acc = ", ".join(f"{a:.3f}" for a in s["acceptance_per_position"]) or "-"
        lines.append(f"{key:<16}{s['tokens_per_second']:>9.1f}{s['main_forwards_per_token']:>9.3f}"
                     f"{s['mean_accepted_per_step']:>10.3f}  {acc}")
    if "speedup" in report:
        lines.append(f"speedup {report['speedup']}x; outputs identical to greedy: "
                     f"{report['matches_greedy']}")
    return "\n".join(lines)

"""Decode a list of prompts plainly and speculatively in one process, and report.

Both modes run on the same runner (the same KV-cache code), batch by batch and
interleaved, after one warm-up generation, so their tokens/s are comparable. Greedy
decoding must be reproduced token for token; with sampling the outputs differ (other
random draws) and are equal in distribution (``tests/unit/test_speculative_sampling.py``).
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from megatron.core.models.gpt.gpt_model import GPTModel

from mtp_megatron.inference.decoding import DraftDepth, Generation, generate_batch
from mtp_megatron.inference.runner import KVCachedRunner
from mtp_megatron.inference.sampling import Sampling
from mtp_megatron.inference.stats import DecodeStats


def run_modes(runner: KVCachedRunner, prompts: List[List[int]], depths: Sequence[DraftDepth],
              *, max_new_tokens: int, eod: Optional[int], batch_size: int = 1,
              sampling: Optional[Sampling] = None
              ) -> Dict[DraftDepth, Tuple[DecodeStats, List[Generation]]]:
    """Every prompt with every draft depth (0 = plain decoding; N; "auto"), ``batch_size``
    prompts at a time, the modes interleaved batch by batch.

    Returns ``{depth: (merged stats, generations in prompt order)}``. With ``sampling``,
    batch ``b`` of every mode draws from its own generator seeded ``sampling.seed + b``.
    """
    sampling = sampling or Sampling()
    deepest = "auto" if "auto" in depths else max(depths)
    generate_batch(runner, prompts[:batch_size], max_new_tokens=min(8, max_new_tokens),
                   draft_depth=deepest, sampling=_seeded(sampling, 0))  # warm-up
    results: Dict[DraftDepth, Tuple[Optional[DecodeStats], List[Generation]]] = {
        k: (None, []) for k in depths}
    for b, start in enumerate(range(0, len(prompts), batch_size)):
        batch = prompts[start:start + batch_size]
        for k in depths:
            gens, stats = generate_batch(runner, batch, max_new_tokens=max_new_tokens,
                                         draft_depth=k, eod=eod,
                                         sampling=_seeded(sampling, b))
            merged, outs = results[k]
            results[k] = (stats if merged is None else merged.merge(stats), outs + gens)
    return results


def _seeded(sampling: Sampling, offset: int) -> Sampling:
    return dataclasses.replace(sampling, seed=sampling.seed + offset, generator=None)


def decode_prompts(model: GPTModel, prompts: List[List[int]], *, vocab_size: int,
                   max_new_tokens: int, draft_depth: DraftDepth, eod: Optional[int],
                   baseline: bool = True, batch_size: int = 1,
                   sampling: Optional[Sampling] = None,
                   detokenize: Optional[Callable[[List[int]], str]] = None) -> Dict:
    """Generate for every prompt; with drafts and ``baseline`` also without (same
    sampling). Returns a report: per-prompt outputs, the summary of each mode, the
    speedup and (greedy) whether speculative decoding reproduced greedy decoding token
    for token."""
    sampling = sampling or Sampling()
    runner = KVCachedRunner(model, vocab_size)
    depths = [0, draft_depth] if draft_depth and baseline else [draft_depth]
    results = run_modes(runner, prompts, depths, max_new_tokens=max_new_tokens, eod=eod,
                        batch_size=batch_size, sampling=sampling)
    stats, gens = results[draft_depth]
    compare = len(depths) > 1 and sampling.greedy
    outputs = []
    for i, (prompt, gen) in enumerate(zip(prompts, gens)):
        entry = {"prompt_tokens": len(prompt), "tokens": gen.tokens,
                 "finish_reason": gen.finish_reason}
        if detokenize is not None:
            entry["text"] = detokenize([t for t in gen.tokens if t != eod])
        if compare:
            entry["matches_greedy"] = gen.tokens == results[0][1][i].tokens
        outputs.append(entry)
    plain = draft_key(0, sampling)
    report = {"mode": "mtp-speculative" if draft_depth else "plain", "outputs": outputs,
              "sampling_params": {"temperature": sampling.temperature,
                                  "top_k": sampling.top_k, "top_p": sampling.top_p,
                                  "seed": sampling.seed},
              "batch_size": batch_size, draft_key(draft_depth, sampling): stats.summary()}
    if len(depths) > 1:
        report[plain] = results[0][0].summary()
        report["speedup"] = speedup(stats, results[0][0])
        if compare:
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


def draft_key(draft_depth: DraftDepth, sampling: Optional[Sampling] = None) -> str:
    """The report's key of a mode: "greedy" / "sampling", "speculative_k2", "speculative_auto"."""
    if draft_depth == "auto":
        return "speculative_auto"
    if draft_depth:
        return f"speculative_k{draft_depth}"
    return "greedy" if sampling is None or sampling.greedy else "sampling"


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
    lines.append(f"{'mode':<17}{'tok/s':>9}{'fwd/tok':>9}{'drafts/step':>12}{'acc/step':>10}"
                 "  acceptance per position")
    for key in ("greedy", "sampling") + tuple(k for k in report if k.startswith("speculative_")):
        if key not in report:
            continue
        s = report[key]
        acc = ", ".join(f"{a:.3f}" for a in s["acceptance_per_position"]) or "-"
        lines.append(f"{key:<17}{s['tokens_per_second']:>9.1f}{s['main_forwards_per_token']:>9.3f}"
                     f"{s.get('mean_drafts_per_step', 0.0):>12.3f}"
                     f"{s['mean_accepted_per_step']:>10.3f}  {acc}")
    if "speedup" in report and "matches_greedy" in report:
        lines.append(f"speedup {report['speedup']}x; outputs identical to greedy: "
                     f"{report['matches_greedy']}")
    elif "speedup" in report:
        lines.append(f"speedup {report['speedup']}x; sampled (equal to plain sampling in "
                     "distribution, not token for token)")
    return "\n".join(lines)

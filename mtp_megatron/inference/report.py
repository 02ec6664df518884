"""Decode a list of prompts greedily and speculatively in one process, and report.

Both modes run on the same runner (the same KV-cache code), prompt by prompt and
interleaved, after one warm-up generation, so their tokens/s are comparable.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional

from megatron.core.models.gpt.gpt_model import GPTModel

from mtp_megatron.inference.decoding import generate
from mtp_megatron.inference.runner import KVCachedRunner
from mtp_megatron.inference.stats import DecodeStats


def decode_prompts(model: GPTModel, prompts: List[List[int]], *, vocab_size: int,
                   max_new_tokens: int, draft_depth: int, eod: Optional[int],
                   baseline: bool = True,
                   detokenize: Optional[Callable[[List[int]], str]] = None) -> Dict:
    """Generate for every prompt; with ``draft_depth > 0`` and ``baseline`` also greedily.

    Returns a report: per-prompt outputs, the summary of each mode, the speedup and
    whether speculative decoding reproduced greedy decoding token for token.
    """
    runner = KVCachedRunner(model, vocab_size)
    generate(runner, prompts[0], max_new_tokens=min(8, max_new_tokens),
             draft_depth=draft_depth, eod=None)  # warm-up: allocations, first-call costs
    modes = [draft_depth] + ([0] if draft_depth and baseline else [])
    totals = {k: DecodeStats(draft_depth=k) for k in modes}
    outputs = []
    for prompt in prompts:
        results = {}
        for k in sorted(modes):  # greedy first, then speculative, per prompt
            gen = generate(runner, prompt, max_new_tokens=max_new_tokens, draft_depth=k, eod=eod)
            totals[k].merge(gen.stats)
            results[k] = gen
        main = results[draft_depth]
        entry = {"prompt_tokens": len(prompt), "tokens": main.tokens,
                 "finish_reason": main.finish_reason}
        if detokenize is not None:
            entry["text"] = detokenize([t for t in main.tokens if t != eod])
        if len(results) > 1:
            entry["matches_greedy"] = main.tokens == results[0].tokens
        outputs.append(entry)
    report = {"mode": "mtp-speculative" if draft_depth else "greedy", "outputs": outputs,
              draft_key(draft_depth): totals[draft_depth].summary()}
    if len(modes) > 1:
        greedy, spec = totals[0], totals[draft_depth]
        report["greedy"] = greedy.summary()
        report["speedup"] = round(spec.tokens_per_second / greedy.tokens_per_second, 3) \
            if greedy.tokens_per_second else None
        report["matches_greedy"] = all(o["matches_greedy"] for o in outputs)
    return report


def draft_key(draft_depth: int) -> str:
    return f"speculative_k{draft_depth}" if draft_depth else "greedy"


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

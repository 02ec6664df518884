"""Self-speculative decoding of each MTP run on held-out prompts, against greedy.

The prompts are held out from training: by default snippets of the embedded corpus's
last files (the ``--split`` validation documents; the corpus order is fixed), or
``--prompt-file``. Each MTP checkpoint decodes every prompt greedily and with each
draft depth ``k <= D`` in one process, interleaved (``inference.report.run_modes``),
and we record tokens per main-model forward, the speedup over greedy and whether the
outputs are identical. Results are cached in the run's ``speculative.json``.

    prompts = heldout_prompts(8, 64)
    with single_rank():
        report = ensure_decoded(run_dir, prompts, max_new_tokens=64)
"""

from __future__ import annotations

import json
import logging
import os
from typing import Dict, List, Optional

logger = logging.getLogger("mtp_megatron")

CACHE = "speculative.json"


def heldout_prompts(count: int, length: int, seed: int = 0,
                    fraction: float = 0.01) -> List[str]:
    """``count`` snippets of ``length`` bytes from the last ``fraction`` of the corpus files.

    With the default ``--split 98,2,0`` the last 2% of documents are validation data; the
    last 1% stays inside them even if a few files were skipped as empty.
    """
    from mtp_megatron.data.corpus import corpus_snippets, stdlib_files

    files = stdlib_files()
    return corpus_snippets(files[-max(1, int(len(files) * fraction)):], count, length, seed)


def read_prompt_file(path: str) -> List[str]:
    with open(path) as fh:
        return [line.rstrip("\n") for line in fh if line.strip()]


def decode(load: str, prompts: List[str], max_new_tokens: int) -> Dict:
    """Greedy and every draft depth of one checkpoint (inside ``single_rank()``)."""
    import torch

    from mtp_megatron.data.tokenizers import encode
    from mtp_megatron.inference.loading import load_for_generation, text_vocab_size
    from mtp_megatron.inference.report import run_modes, speedup
    from mtp_megatron.inference.runner import KVCachedRunner

    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
        else torch.device("cpu")
    model, cfg, tokenizer = load_for_generation(load, device)
    depth = cfg.mtp.mtp_num_layers
    runner = KVCachedRunner(model, text_vocab_size(cfg, tokenizer))
    ids = [[int(t) for t in encode(tokenizer, p)] for p in prompts]
    results = run_modes(runner, ids, list(range(depth + 1)), max_new_tokens=max_new_tokens,
                        eod=tokenizer.eod)
    greedy_stats, greedy_gens = results[0]
    modes = {}
    for k, (stats, gens) in results.items():
        summary = stats.summary()
        modes[f"k{k}"] = {
            "draft_depth": k,
            "tokens_per_main_forward": round(1.0 / summary["main_forwards_per_token"], 4)
            if summary["main_forwards_per_token"] else None,
            "main_forwards_per_token": summary["main_forwards_per_token"],
            "acceptance_per_position": summary["acceptance_per_position"],
            "tokens_per_second": summary["tokens_per_second"],
            "speedup": speedup(stats, greedy_stats) if k else 1.0,
            "matches_greedy": all(a.tokens == b.tokens for a, b in zip(gens, greedy_gens)),
        }
    return {"prompts": len(prompts), "max_new_tokens": max_new_tokens, "modes": modes}


def ensure_decoded(run_dir: str, prompts: List[str], max_new_tokens: int) -> Optional[Dict]:
    """The run's decoding report, measured once (cached with its prompts)."""
    path = os.path.join(run_dir, CACHE)
    key = {"prompts_text": prompts, "max_new_tokens": max_new_tokens}
    if os.path.isfile(path):
        with open(path) as fh:
            cached = json.load(fh)
        if cached.get("key") == key:
            return cached["report"]
    load = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(load):
        logger.warning("%s: no checkpoint, no speculative decoding", run_dir)
        return None
    report = decode(load, prompts, max_new_tokens)
    with open(path, "w") as fh:
        json.dump({"key": key, "report": report}, fh, indent=2)
    return report

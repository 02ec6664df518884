"""Greedy and MTP self-speculative decoding: one loop, drafting is the only difference.

State after every step: committed tokens ``t_0 .. t_N`` (prompt + output); the main
stack has cached positions ``0 .. N-1``, so ``t_N`` (the last token the main model
chose) is still to be fed. One step with ``k`` drafts:

1. draft (speculative only): MTP depth ``d`` at position ``N-1`` combines the depth
   ``d-1`` hidden state with the embedding of token ``t_{N-1+d}`` (``t_N`` for d = 1,
   else draft ``d-1``) and predicts ``t_{N+d}``: drafts ``x_1 .. x_k`` for ``t_{N+1..N+k}``;
2. verify: one main-model forward of ``[t_N, x_1 .. x_k]`` gives the greedy tokens
   ``g_1 .. g_{k+1}`` for ``t_{N+1} .. t_{N+k+1}``;
3. accept the longest prefix with ``x_i == g_i`` (``a`` drafts) and commit
   ``x_1 .. x_a, g_{a+1}``: ``a + 1`` tokens, each the greedy choice given the ones
   before, so the output is greedy decoding's token for token. Roll the main cache back
   to ``N + a + 1`` rows.

Greedy decoding is the same step with ``k = 0``.

Each MTP depth attends over its own earlier positions, as in training, so it keeps a
cache too. Depth ``d`` at position ``j`` needs token ``t_{j+d}``, which is committed only
for ``j <= N - d``: after drafting, depth ``d`` keeps the ``N - d + 1`` rows built from
committed tokens only, plus the one hidden state depth ``d + 1`` will need next
(``pending``); rows built on drafts are recomputed at the next step.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import List, Optional

import torch

from mtp_megatron.inference.runner import KVCachedRunner
from mtp_megatron.inference.stats import DecodeStats


@dataclass
class Generation:
    """One prompt's output. ``tokens`` excludes the prompt and ends with EOD if hit."""

    tokens: List[int]
    finish_reason: str  # "eod" or "length"
    stats: DecodeStats


class _MTPDrafter:
    """The MTP chain's caches and pending hidden states for one sequence."""

    def __init__(self, runner: KVCachedRunner, depth: int):
        self.runner = runner
        self.depth = depth
        # pending[d]: depth-d hidden states for positions [start[d+1], ...) not yet fed to
        # depth d+1; pending[0] are main-model hidden states.
        self.pending: List[Optional[torch.Tensor]] = [None] * (depth + 1)

    def add_main_hidden(self, hidden: torch.Tensor) -> None:
        self.pending[0] = hidden if self.pending[0] is None else torch.cat([self.pending[0],
                                                                            hidden])

    def draft(self, committed: List[int], k: int, stats: DecodeStats) -> List[int]:
        """``k`` draft tokens after ``committed`` (= t_0 .. t_N)."""
        n = len(committed) - 1
        drafts: List[int] = []
        inputs = self.pending[0]  # depth-0 rows for positions [cached(1), n)
        for d in range(1, k + 1):
            start = self.runner.cached(d)
            ahead = committed + drafts  # t_{j+d} for j in [start, n)
            out = self.runner.mtp(d, inputs, ahead[start + d: n + d])
            stats.mtp_forwards += 1
            drafts.append(self.runner.argmax(out[-1:])[0])
            # Depth-d rows for [cached(d+1), n): depth d+1's input.
            inputs = out if self.pending[d] is None else torch.cat([self.pending[d], out])
            first = n - inputs.size(0)
            # Keep the rows whose input token is committed (j + d <= n); depth d+1 will
            # next start at its own committed end, n - d.
            keep, next_start = max(0, n - d + 1), max(0, n - d)
            self.runner.truncate(d, keep)
            self.pending[d] = inputs[next_start - first: keep - first]
        if k:
            self.pending[0] = None  # depth 1 now caches a row for every main row
        return drafts


def _new_tokens(drafts: List[int], greedy: List[int]) -> tuple[int, List[int]]:
    """Accepted drafts count and the tokens committed by one verification."""
    accepted = 0
    while accepted < len(drafts) and drafts[accepted] == greedy[accepted]:
        accepted += 1
    return accepted, drafts[:accepted] + [greedy[accepted]]


def generate(runner: KVCachedRunner, prompt: List[int], *, max_new_tokens: int,
             draft_depth: int = 0, eod: Optional[int] = None) -> Generation:
    """Greedy decoding (``draft_depth=0``) or MTP self-speculative decoding.

    Stops after ``max_new_tokens`` tokens or at ``eod`` (kept as the last token).
    """
    if not prompt:
        raise ValueError("the prompt is empty: give at least one token")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if draft_depth > runner.num_mtp_layers:
        raise ValueError(f"draft depth {draft_depth} > the model's {runner.num_mtp_layers} "
                         "MTP layers")
    stats = DecodeStats(draft_depth=draft_depth)
    runner.reset(len(prompt) + max_new_tokens + draft_depth + 1)
    drafter = _MTPDrafter(runner, draft_depth) if draft_depth else None
    cpu_start = time.process_time()
    with stats.timed("total"):
        with stats.timed("prefill"):
            hidden = runner.main(prompt)
            first = runner.argmax(hidden[-1:])[0]
        stats.main_forwards += 1
        if drafter:
            drafter.add_main_hidden(hidden)
        committed, out = list(prompt) + [first], [first]
        while not _finished(out, max_new_tokens, eod):
            k = min(draft_depth, max_new_tokens - len(out) - 1)
            drafts: List[int] = []
            if k:
                with stats.timed("draft"):
                    drafts = drafter.draft(committed, k, stats)
            with stats.timed("verify"):
                n = len(committed) - 1
                hidden = runner.main([committed[-1]] + drafts)
                accepted, new = _new_tokens(drafts, runner.argmax(hidden))
                runner.truncate(0, n + accepted + 1)
            stats.main_forwards += 1
            if drafter:
                drafter.add_main_hidden(hidden[: accepted + 1])
            if draft_depth:
                stats.record_step(k, accepted)
            committed += new
            out += new
    stats.cpu_seconds = time.process_time() - cpu_start
    out, reason = _cut(out, max_new_tokens, eod)
    stats.generated = len(out)
    return Generation(tokens=out, finish_reason=reason, stats=stats)


def _finished(out: List[int], max_new_tokens: int, eod: Optional[int]) -> bool:
    return len(out) >= max_new_tokens or (eod is not None and eod in out)


def _cut(out: List[int], max_new_tokens: int, eod: Optional[int]) -> tuple[List[int], str]:
    """Cut after the first EOD, or at the token budget (a step may overshoot both)."""
    if eod is not None and eod in out[:max_new_tokens]:
        return out[: out.index(eod) + 1], "eod"
    return out[:max_new_tokens], "length"

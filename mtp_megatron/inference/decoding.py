"""Plain and MTP self-speculative decoding of a batch of prompts: one loop, drafting is
the only difference.

State of each row after every step: committed tokens ``t_0 .. t_N`` (prompt + output);
the main stack has cached positions ``0 .. N-1``, so ``t_N`` (the last token the main
model chose) is still to be fed. One step with ``k`` drafts, every row at once:

1. draft (``k > 0``): MTP depth ``d`` at position ``N-1`` combines the depth ``d-1``
   hidden state with the embedding of token ``t_{N-1+d}`` (``t_N`` for d = 1, else draft
   ``d-1``) and proposes ``t_{N+d}`` (argmax, or a sample of its distribution ``q_d``):
   drafts ``x_1 .. x_k``;
2. verify: one main-model forward of ``[t_N, x_1 .. x_k]`` gives the main model's
   distributions ``p_1 .. p_{k+1}`` for ``t_{N+1} .. t_{N+k+1}``;
3. accept (``sampling.accept_greedy`` / ``accept_sampled``): ``a`` drafts, then one token
   of the main model's own, ``a + 1`` tokens in all; each is what plain decoding would
   choose (greedy: token for token; sampling: in distribution). The row's main cache
   rolls back to ``N + a + 1`` positions.

Rows accept different counts; the caches keep per-row positions (``inference/cache.py``),
and a row that reaches EOD or its token budget leaves the batch. The number of drafts
``k`` is the same for all rows of a step: fixed, or chosen per step from the recent
acceptance and the measured costs (``draft_depth="auto"``, ``inference/controller.py``).

Each MTP depth attends over its own earlier positions, as in training, so it keeps a
cache too. Depth ``d`` at position ``j`` needs token ``t_{j+d}``, committed only for
``j <= N - d``: after drafting, depth ``d`` keeps the rows built from committed tokens
only, and ``pending`` holds the depth-``d`` hidden states depth ``d + 1`` has not seen
yet; rows built on drafts are recomputed at the next step. A step that drafts fewer
depths (or none) leaves the deeper depths' inputs pending: they catch up, in one
forward, the next time they draft.
"""

from __future__ import annotations

import time
import weakref
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch

from mtp_megatron.inference.controller import DraftController
from mtp_megatron.inference.ragged import Ragged
from mtp_megatron.inference.runner import KVCachedRunner
from mtp_megatron.inference.sampling import Sampling, accept_greedy, accept_sampled
from mtp_megatron.inference.stats import DecodeStats

DraftDepth = Union[int, str]  # 0: no drafts; N: always N; "auto": chosen per step


@dataclass
class Generation:
    """One prompt's output. ``tokens`` excludes the prompt and ends with EOD if hit."""

    tokens: List[int]
    finish_reason: str  # "eod" or "length"
    stats: Optional[DecodeStats] = None  # the whole batch's (one prompt: its own)


class _MTPDrafter:
    """The MTP chain's caches and pending hidden states, per row of the batch."""

    def __init__(self, runner: KVCachedRunner, batch: int):
        self.runner = runner
        self.depth = runner.num_mtp_layers
        # pending[d]: per row, the depth-d hidden states not yet fed to depth d+1
        # (d = 0: the main model's), for positions [cached(d+1), ...).
        self.pending: List[Optional[Ragged]] = [None] * (self.depth + 1)

    def add_main_hidden(self, hidden: torch.Tensor, counts: Sequence[int]) -> None:
        """Row ``r``'s new main-model hidden states are ``hidden[:counts[r], r]``."""
        old = self.pending[0]
        self.pending[0] = Ragged.of(hidden, counts) if old is None else old.append(hidden, counts)

    def keep_rows(self, rows: Sequence[int]) -> None:
        self.pending = [None if p is None else p.select(rows) for p in self.pending]

    def draft(self, committed: Sequence[List[int]], k: int, sampling: Sampling,
              stats: DecodeStats) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``k`` drafts per row after ``committed`` (= t_0 .. t_N of each row):
        tokens [batch, k] and, when sampling, their distributions q [batch, k, V]."""
        n = [len(c) - 1 for c in committed]
        batch = len(committed)
        self.caught_up = False  # a depth fed rows it had skipped (not a typical step's cost)
        drafts: List[List[int]] = [[] for _ in range(batch)]
        dists = []
        inputs = self.pending[0]  # depth-0 rows for positions [cached(1), n) of each row
        for d in range(1, k + 1):
            start = self.runner.cached(d)
            tokens = [(committed[r] + drafts[r])[start[r] + d: n[r] + d] for r in range(batch)]
            counts = [len(t) for t in tokens]
            if inputs is None or inputs.counts != counts:
                raise RuntimeError(f"MTP bookkeeping out of step at depth {d}: "
                                   f"{None if inputs is None else inputs.counts} != {counts}")
            self.caught_up |= max(counts) > self.depth + 1
            out = self.runner.mtp(d, inputs.data[: max(counts)], tokens)
            stats.mtp_forwards += batch
            last = out[torch.tensor(counts, device=out.device) - 1,
                       torch.arange(batch, device=out.device)]
            logits = self.runner.logits(last.unsqueeze(0))[0]  # [batch, V]
            if sampling.greedy:
                chosen = logits.argmax(dim=-1)
            else:
                dists.append(sampling.probabilities(logits))
                chosen = sampling.sample(dists[-1])
            for r, token in enumerate(chosen.tolist()):
                drafts[r].append(token)
            inputs = self._keep_for_later(d, k, out, counts, n)
        if k:
            self.pending[0] = None  # depth 1 now has a row for every main row
        tokens = torch.tensor(drafts, dtype=torch.long, device=self.runner.device)
        return tokens.view(batch, k), (torch.stack(dists, dim=1) if dists else None)

    def _keep_for_later(self, d: int, k: int, out: torch.Tensor, counts: List[int],
                        n: List[int]) -> Ragged:
        """Depth ``d``'s rows for the next depth now (returned), the ones it will need
        later (``pending[d]``), and depth ``d``'s cache cut to committed inputs."""
        old = self.pending[d]
        full = Ragged.of(out, counts) if old is None else old.append(out, counts)
        first = [m - c for m, c in zip(n, full.counts)]  # rows cover positions [first, n)
        keep = [max(0, m - d + 1) for m in n]  # rows whose input token is committed
        if d < self.depth:
            # Depth d+1 next starts at its committed end n - d if it drafts now, else
            # where its cache stands.
            nxt = [max(0, m - d) for m in n] if d < k else self.runner.cached(d + 1)
            self.pending[d] = full.slice([a - f for a, f in zip(nxt, first)],
                                         [b - f for b, f in zip(keep, first)])
        self.runner.truncate(d, keep)
        return full


def generate(runner: KVCachedRunner, prompt: List[int], *, max_new_tokens: int,
             draft_depth: DraftDepth = 0, eod: Optional[int] = None,
             sampling: Optional[Sampling] = None) -> Generation:
    """One prompt: plain decoding (``draft_depth=0``) or MTP self-speculative decoding."""
    gens, stats = generate_batch(runner, [prompt], max_new_tokens=max_new_tokens,
                                 draft_depth=draft_depth, eod=eod, sampling=sampling)
    gens[0].stats = stats
    return gens[0]


# The adaptive controllers, per runner and batch size: acceptance and costs learned in
# one generation carry over to the next.
_AUTO: "weakref.WeakKeyDictionary[KVCachedRunner, Dict[int, DraftController]]" = \
    weakref.WeakKeyDictionary()


def _controller(runner: KVCachedRunner, draft_depth: DraftDepth,
                batch: int) -> DraftController:
    depth = runner.num_mtp_layers
    if draft_depth == "auto":
        return _AUTO.setdefault(runner, {}).setdefault(batch, DraftController(depth))
    if not isinstance(draft_depth, int) or draft_depth < 0:
        raise ValueError(f"draft depth must be 'auto' or an integer >= 0, got {draft_depth!r}")
    if draft_depth > depth:
        raise ValueError(f"draft depth {draft_depth} > the model's {depth} MTP layers")
    return DraftController(depth, fixed=draft_depth)


def generate_batch(runner: KVCachedRunner, prompts: Sequence[List[int]], *,
                   max_new_tokens: int, draft_depth: DraftDepth = 0,
                   eod: Optional[int] = None, sampling: Optional[Sampling] = None
                   ) -> Tuple[List[Generation], DecodeStats]:
    """Decode ``prompts`` together (one batch); each stops after ``max_new_tokens``
    tokens or at ``eod`` (kept as its last token). Greedy unless ``sampling`` says
    otherwise. Returns the generations in prompt order and the batch's stats."""
    if not prompts or any(not p for p in prompts):
        raise ValueError("the prompt is empty: give at least one token")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    controller = _controller(runner, draft_depth, len(prompts))
    chosen_before = list(controller.chosen)
    sampling = sampling or Sampling()
    loop = _Loop(runner, prompts, max_new_tokens, eod, sampling, controller)
    cpu_start = time.process_time()
    with loop.stats.timed("total"):
        loop.prefill()
        while loop.rows:
            loop.step()
    loop.stats.cpu_seconds = time.process_time() - cpu_start
    loop.stats.chosen_depths = [a - b for a, b in zip(controller.chosen, chosen_before)]
    gens = []
    for out in loop.outputs:
        tokens, reason = _cut(out, max_new_tokens, eod)
        loop.stats.generated += len(tokens)
        gens.append(Generation(tokens=tokens, finish_reason=reason))
    return gens, loop.stats


class _Loop:
    """The state of one batched generation: live rows, committed tokens, outputs."""

    def __init__(self, runner, prompts, max_new_tokens, eod, sampling, controller):
        self.runner, self.eod, self.sampling = runner, eod, sampling
        self.max_new_tokens, self.controller = max_new_tokens, controller
        depth = runner.num_mtp_layers
        self.stats = DecodeStats(draft_depth=depth if controller.fixed is None
                                 else controller.fixed)
        self.stats.batch_size = len(prompts)
        self.stats.adaptive = controller.fixed is None
        longest = max(len(p) for p in prompts) + max_new_tokens + depth + 1
        runner.reset(longest, batch_size=len(prompts), max_columns=longest + 40)
        self.drafter = _MTPDrafter(runner, len(prompts)) if depth else None
        self.prompts = prompts
        self.rows = list(range(len(prompts)))  # live rows' prompt indices, batch order
        self.committed = [list(p) for p in prompts]
        self.outputs: List[List[int]] = [[] for _ in prompts]

    def _choose(self, logits: torch.Tensor) -> torch.Tensor:
        if self.sampling.greedy:
            return logits.argmax(dim=-1)
        return self.sampling.sample(self.sampling.probabilities(logits))

    def prefill(self) -> None:
        with self.stats.timed("prefill"):
            hidden = self.runner.main(self.prompts)
            lengths = [len(p) for p in self.prompts]
            device = hidden.device
            last = hidden[torch.tensor(lengths, device=device) - 1,
                          torch.arange(len(lengths), device=device)]
            first = self._choose(self.runner.logits(last.unsqueeze(0))[0]).tolist()
        self.stats.main_forwards += len(self.prompts)
        self.stats.batch_forwards += 1
        if self.drafter:
            self.drafter.add_main_hidden(hidden, lengths)
        self._commit([[t] for t in first])

    def step(self) -> None:
        live = [self.committed[r] for r in self.rows]
        left = max(self.max_new_tokens - len(self.outputs[r]) for r in self.rows)
        k = self.controller.choose(limit=left - 1)
        drafts = torch.zeros(len(live), 0, dtype=torch.long, device=self.runner.device)
        q = None
        if k:
            with self.stats.timed("draft") as clock:
                drafts, q = self.drafter.draft(live, k, self.sampling, self.stats)
            if not self.drafter.caught_up:
                self.controller.timed("draft", 1, clock.seconds / k)
        with self.stats.timed("verify") as clock:
            n = [len(c) - 1 for c in live]
            draft_rows = drafts.tolist()
            hidden = self.runner.main([[c[-1]] + d for c, d in zip(live, draft_rows)])
            logits = self.runner.logits(hidden).transpose(0, 1)  # [batch, k + 1, V]
            if self.sampling.greedy:
                accepted, tokens = accept_greedy(drafts.to(logits.device),
                                                 logits.argmax(dim=-1))
            else:
                accepted, tokens = accept_sampled(drafts.to(logits.device), q,
                                                  self.sampling.probabilities(logits),
                                                  self.sampling)
            self.runner.truncate(0, [m + a + 1 for m, a in zip(n, accepted)])
            new = [row[: a + 1] for row, a in zip(tokens.tolist(), accepted)]
        self.controller.timed("verify", k + 1, clock.seconds)
        self.stats.main_forwards += len(live)
        self.stats.batch_forwards += 1
        if self.drafter:
            self.drafter.add_main_hidden(hidden, [a + 1 for a in accepted])
        reached, hits = self.stats.record_batch(k, accepted)
        self.controller.record(k, reached, hits)
        self._commit(new)

    def _commit(self, new: List[List[int]]) -> None:
        """Append each live row's new tokens; finished rows leave the batch."""
        keep = []
        for i, (r, tokens) in enumerate(zip(self.rows, new)):
            self.committed[r] += tokens
            self.outputs[r] += tokens
            if not _finished(self.outputs[r], self.max_new_tokens, self.eod):
                keep.append(i)
        if len(keep) < len(self.rows):
            self.rows = [self.rows[i] for i in keep]
            if keep:
                self.runner.keep_rows(keep)
                if self.drafter:
                    self.drafter.keep_rows(keep)


def _finished(out: List[int], max_new_tokens: int, eod: Optional[int]) -> bool:
    return len(out) >= max_new_tokens or (eod is not None and eod in out)


def _cut(out: List[int], max_new_tokens: int, eod: Optional[int]) -> Tuple[List[int], str]:
    """Cut after the first EOD, or at the token budget (a step may overshoot both)."""
    if eod is not None and eod in out[:max_new_tokens]:
        return out[: out.index(eod) + 1], "eod"
    return out[:max_new_tokens], "length"

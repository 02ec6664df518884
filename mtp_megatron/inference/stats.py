"""What a decoding run counts and times, and the summary a report prints.

Per verification step of speculative decoding with ``k`` drafts (counted per sequence:
a batched step of ``B`` rows is ``B`` steps):

* ``reached[i]``: steps where draft ``i + 1`` was compared (all earlier drafts matched);
* ``accepted[i]``: steps where it matched the main model's greedy token;
* conditional acceptance of position ``i + 1`` = ``accepted[i] / reached[i]``,
  unconditional = ``accepted[i] / drafted[i]`` (``drafted[i]``: steps that drafted it).

``main_forwards`` counts forwards of the main model per sequence, prefill included
(a batched forward of ``B`` rows counts ``B``), so plain decoding has one per generated
token at any batch size and perfect drafting with ``k`` drafts tends to ``1 / (k + 1)``;
``batch_forwards`` counts the forward calls themselves.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Dict, List, Sequence, Tuple


@dataclass
class DecodeStats:
    """Counters and phase timers of one or more generations (add them with ``merge``)."""

    draft_depth: int = 0  # draft positions tracked (the most drafts a step may make)
    adaptive: bool = False  # draft count chosen per step (``--draft-depth auto``)
    generated: int = 0
    main_forwards: int = 0
    mtp_forwards: int = 0
    steps: int = 0  # verification steps (main forwards after prefill)
    accepted_tokens: int = 0  # drafts accepted, summed over steps
    drafted: List[int] = field(default_factory=list)
    reached: List[int] = field(default_factory=list)
    accepted: List[int] = field(default_factory=list)
    seconds: Dict[str, float] = field(
        default_factory=lambda: {"prefill": 0.0, "verify": 0.0, "draft": 0.0, "total": 0.0}
    )
    cpu_seconds: float = 0.0  # process CPU time of the whole generation (all threads)
    batch_forwards: int = 0  # main-model forward calls (prefill included)
    batch_size: int = 1
    chosen_depths: List[int] = field(default_factory=list)  # steps per draft count k

    def __post_init__(self):
        for name in ("drafted", "reached", "accepted"):
            if not getattr(self, name):
                setattr(self, name, [0] * self.draft_depth)

    @contextmanager
    def timed(self, phase: str):
        """Adds the block's wall time to ``phase``; yields a clock whose ``seconds`` is
        set when the block ends."""
        clock = _Clock()
        start = time.perf_counter()
        try:
            yield clock
        finally:
            clock.seconds = time.perf_counter() - start
            self.seconds[phase] += clock.seconds

    def record_step(self, num_drafts: int, num_accepted: int) -> None:
        self.steps += 1
        self.accepted_tokens += num_accepted
        for i in range(num_drafts):
            self.drafted[i] += 1
            if i <= num_accepted:
                self.reached[i] += 1
            if i < num_accepted:
                self.accepted[i] += 1

    def record_batch(self, num_drafts: int, accepted: Sequence[int]
                     ) -> Tuple[List[int], List[int]]:
        """One batched step: every row drafted ``num_drafts``, row ``r`` accepted
        ``accepted[r]``. Returns the step's (reached, accepted) per draft position."""
        reached, hits = [0] * num_drafts, [0] * num_drafts
        for a in accepted:
            self.record_step(num_drafts, a)
            for i in range(num_drafts):
                reached[i] += i <= a
                hits[i] += i < a
        return reached, hits

    def merge(self, other: "DecodeStats") -> "DecodeStats":
        if other.draft_depth != self.draft_depth:
            raise ValueError("cannot merge stats of different draft depths")
        for name in ("generated", "main_forwards", "mtp_forwards", "steps", "accepted_tokens",
                     "cpu_seconds", "batch_forwards"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for name in ("drafted", "reached", "accepted", "chosen_depths"):
            mine, theirs = getattr(self, name), getattr(other, name)
            size = max(len(mine), len(theirs))
            mine, theirs = mine + [0] * (size - len(mine)), theirs + [0] * (size - len(theirs))
            setattr(self, name, [a + b for a, b in zip(mine, theirs)])
        for phase, secs in other.seconds.items():
            self.seconds[phase] = self.seconds.get(phase, 0.0) + secs
        return self

    # -- the report -------------------------------------------------------------------
    @property
    def mean_accepted(self) -> float:
        """Drafts accepted per verification step (tokens per step is this plus one)."""
        return self.accepted_tokens / max(self.steps, 1)

    @property
    def acceptance(self) -> List[float]:
        """Conditional acceptance per draft position (given the earlier ones matched)."""
        return [a / r if r else float("nan") for a, r in zip(self.accepted, self.reached)]

    @property
    def acceptance_unconditional(self) -> List[float]:
        return [a / d if d else float("nan") for a, d in zip(self.accepted, self.drafted)]

    @property
    def forwards_per_token(self) -> float:
        return self.main_forwards / max(self.generated, 1)

    @property
    def tokens_per_second(self) -> float:
        return self.generated / self.seconds["total"] if self.seconds["total"] else 0.0

    @property
    def tokens_per_cpu_second(self) -> float:
        """Tokens per second of process CPU time: steadier than wall time on a busy host."""
        return self.generated / self.cpu_seconds if self.cpu_seconds else 0.0

    def time_shares(self) -> Dict[str, float]:
        """Fraction of wall time in prefill, verify (main forwards), draft, the rest."""
        total = self.seconds["total"] or 1.0
        shares = {p: self.seconds[p] / total for p in ("prefill", "verify", "draft")}
        shares["other"] = max(0.0, 1.0 - sum(shares.values()))
        return shares

    def summary(self) -> Dict[str, object]:
        return {
            "draft_depth": "auto" if self.adaptive else self.draft_depth,
            "generated_tokens": self.generated,
            "verification_steps": self.steps,
            "mean_accepted_per_step": round(self.mean_accepted, 4),
            "tokens_per_step": round(self.mean_accepted + 1, 4) if self.draft_depth else 1.0,
            "acceptance_per_position": [round(a, 4) for a in self.acceptance],
            "acceptance_unconditional": [round(a, 4) for a in self.acceptance_unconditional],
            "main_forwards_per_token": round(self.forwards_per_token, 4),
            "mtp_forwards": self.mtp_forwards,
            "tokens_per_second": round(self.tokens_per_second, 2),
            "tokens_per_cpu_second": round(self.tokens_per_cpu_second, 2),
            "time_shares": {k: round(v, 3) for k, v in self.time_shares().items()},
            "batch_size": self.batch_size,
            "steps_per_draft_count": list(self.chosen_depths),
            "mean_drafts_per_step": round(self.mean_drafts, 4),
        }

    @property
    def mean_drafts(self) -> float:
        """Tokens drafted per verification step (per sequence)."""
        return sum(self.drafted) / max(self.steps, 1)


class _Clock:
    seconds: float = 0.0

"""How many tokens to draft at each step (``--draft-depth auto``).

Drafting ``k`` tokens pays when the tokens it adds are worth more than it costs. With
``a_i`` the recent acceptance of draft ``i`` given drafts ``1 .. i-1`` were accepted, a
step with ``k`` drafts commits on average ``E_k = 1 + a_1 + a_1 a_2 + ... + a_1..a_k``
tokens per sequence and costs ``T_verify(k + 1) + k T_draft`` (one main forward of
``k + 1`` tokens, one forward per MTP depth). :class:`DraftController` picks the ``k``
with the most tokens per second, ``E_k / cost_k``:

* acceptances are decayed counts (each step that compares a draft position ages that
  position's older counts by ``DECAY``), started from an even prior (a deeper position
  from the estimate of the one before), so a checkpoint whose heads are near random
  stops drafting after a few steps and a good one drafts as deep as it can;
* costs are running means of the measured forwards (wall time), with a prior guess
  (an MTP depth a quarter of a main forward, each verified token 5% more) until
  measured;
* a depth that is not drafted teaches nothing: every ``probe`` steps the controller
  drafts one token more than its choice; a probe that fails doubles the interval (up to
  ``MAX_PROBE``), one that succeeds resets it, so a useless head costs well under 1%;
* what it learned carries over from one generation to the next on the same runner and
  batch size (``decoding.generate_batch`` keeps one controller per runner and batch size).

    controller = DraftController(max_depth=2)
    k = controller.choose()
    ... draft k, verify, accept ...
    controller.record(k, reached=[4, 3], accepted=[3, 2])   # over the batch's rows
    controller.timed("verify", k + 1, seconds); controller.timed("draft", 1, seconds)
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

DECAY = 0.9  # weight of the past per step
PRIOR_ACCEPTANCE, PRIOR_WEIGHT = 0.5, 1.0
PRIOR_DRAFT_COST = 0.25  # one MTP depth, in main forwards of one token
PRIOR_VERIFY_SLOPE = 0.05  # extra cost of each verified token, same unit
FIRST_PROBE, MIN_PROBE, MAX_PROBE = 2, 8, 128
COST_MEMORY = 0.8  # running means of the costs


class DraftController:
    """Chooses the draft length per step from recent acceptance and measured costs.

    ``fixed``: always draft that many (``--draft-depth N``); acceptance is still tracked.
    """

    def __init__(self, max_depth: int, fixed: Optional[int] = None):
        self.max_depth = max_depth
        self.fixed = fixed
        self.hits = [0.0] * max_depth
        self.trials = [0.0] * max_depth
        self.seconds: Dict[tuple, float] = {}
        self.probe_every = MIN_PROBE
        self.until_probe = FIRST_PROBE
        self.probing = False
        self.chosen: List[int] = [0] * (max_depth + 1)  # steps per k, for the report

    def acceptance(self) -> List[float]:
        """Estimated acceptance per draft position; an untried position starts from the
        estimate of the one before it (depth 1 from an even prior)."""
        out, prior = [], PRIOR_ACCEPTANCE
        for h, t in zip(self.hits, self.trials):
            prior = (h + prior * PRIOR_WEIGHT) / (t + PRIOR_WEIGHT)
            out.append(prior)
        return out

    def _cost(self, kind: str, width: int) -> float:
        """Measured seconds of one forward, or the prior guess scaled by a measured one."""
        if (kind, width) in self.seconds:
            return self.seconds[(kind, width)]
        unit = self.seconds.get(("verify", 1))
        if unit is None:
            known = [(w, s) for (kd, w), s in self.seconds.items() if kd == "verify"]
            unit = (known[0][1] / (1 + PRIOR_VERIFY_SLOPE * (known[0][0] - 1))) if known else 1.0
        if kind == "draft":
            return unit * PRIOR_DRAFT_COST
        return unit * (1 + PRIOR_VERIFY_SLOPE * (width - 1))

    def rate(self, k: int) -> float:
        """Expected committed tokens per second of a step with ``k`` drafts."""
        expected, chain = 1.0, 1.0
        for a in self.acceptance()[:k]:
            chain *= a
            expected += chain
        return expected / (self._cost("verify", k + 1) + k * self._cost("draft", 1))

    def best(self) -> int:
        return max(range(self.max_depth + 1), key=self.rate)

    def choose(self, limit: Optional[int] = None) -> int:
        """Drafts for the next step, at most ``limit`` (what the token budget can use)."""
        limit = self.max_depth if limit is None else min(limit, self.max_depth)
        if self.fixed is not None:
            k = min(self.fixed, limit)
        else:
            k = self.best()
            self.until_probe -= 1
            self.probing = self.until_probe <= 0 and k < self.max_depth
            if self.probing:
                k += 1
                self.until_probe = self.probe_every
            if k > limit:
                k, self.probing = limit, False
        self.chosen[k] += 1
        return k

    def record(self, k: int, reached: Sequence[int], accepted: Sequence[int]) -> None:
        """One step's counts over the batch: per draft position, rows that compared it
        (all earlier drafts accepted) and rows that accepted it."""
        for i in range(k):
            if reached[i]:  # only new evidence ages the old (an undrafted depth keeps it)
                self.hits[i] = DECAY * self.hits[i] + accepted[i]
                self.trials[i] = DECAY * self.trials[i] + reached[i]
        if self.probing and k:
            deepest = k - 1
            won = reached[deepest] and accepted[deepest] / reached[deepest] > 0.5
            self.probe_every = MIN_PROBE if won else min(2 * self.probe_every, MAX_PROBE)
            self.until_probe = self.probe_every
            self.probing = False

    def timed(self, kind: str, width: int, seconds: float) -> None:
        """A measured forward: ``kind`` "verify" (``width`` tokens) or "draft" (one depth)."""
        key = (kind, width if kind == "verify" else 1)
        old = self.seconds.get(key)
        self.seconds[key] = seconds if old is None else \
            COST_MEMORY * old + (1 - COST_MEMORY) * seconds

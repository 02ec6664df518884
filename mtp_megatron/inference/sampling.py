"""Token choice: greedy, or sampling with temperature / top-k / top-p, and the
verification rule of speculative sampling that keeps the output distribution exact.

    params = Sampling(temperature=0.8, top_k=50, top_p=0.95, seed=0)
    probs = params.probabilities(logits)           # [..., V], rows sum to 1
    tokens = params.sample(probs)                  # one token per row

Speculative sampling (Leviathan et al. 2023, Chen et al. 2023): draft ``x_i`` was sampled
from the draft distribution ``q_i`` (the MTP depth's logits under the same transform);
the main model gives ``p_i``. Draft ``i`` is accepted with probability
``min(1, p_i(x_i) / q_i(x_i))``; the first rejected one is replaced by a sample of the
normalised residual ``max(0, p_i - q_i)``; if every draft is accepted one more token is
sampled from ``p_{k+1}``. Each committed token is then distributed exactly as plain
sampling from ``p`` would draw it, whatever ``q`` is. Greedy (``temperature == 0``)
accepts the longest prefix of drafts equal to the main model's argmax.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import torch


@dataclass
class Sampling:
    """How the next token is chosen; ``temperature == 0`` is greedy (argmax)."""

    temperature: float = 0.0
    top_k: int = 0  # 0: the whole vocabulary
    top_p: float = 1.0  # 1: no nucleus cut
    seed: int = 0
    generator: Optional[torch.Generator] = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        """The rules of the sampling flags (``generate`` reports these messages as they are)."""
        if self.temperature < 0:
            raise ValueError(f"--temperature {self.temperature}: must be >= 0 (0: greedy)")
        if self.top_k < 0:
            raise ValueError(f"--top-k {self.top_k}: must be >= 0 (0: every token)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"--top-p {self.top_p}: must be in (0, 1]")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def rng(self, device: torch.device) -> torch.Generator:
        """The generator every random draw of a generation uses (seeded once)."""
        if self.generator is None or self.generator.device != device:
            self.generator = torch.Generator(device=device).manual_seed(self.seed)
        return self.generator

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Softmax of ``logits / temperature`` restricted to the top-k, then top-p, tokens."""
        logits = logits.float() / self.temperature
        if self.top_k and self.top_k < logits.size(-1):
            kth = torch.topk(logits, self.top_k, dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if self.top_p < 1:
            sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
            before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
            drop = before >= self.top_p  # the most likely token is always kept
            sorted_probs = sorted_probs.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
            probs = probs / probs.sum(dim=-1, keepdim=True)
        return probs

    def sample(self, probs: torch.Tensor) -> torch.Tensor:
        """One token per row of ``probs`` [..., V]."""
        flat = probs.reshape(-1, probs.size(-1))
        out = torch.multinomial(flat, 1, generator=self.rng(probs.device))
        return out.view(probs.shape[:-1])


def accept_greedy(drafts: torch.Tensor, greedy: torch.Tensor) -> Tuple[List[int], torch.Tensor]:
    """Rows of ``drafts`` [B, k] against the main model's argmax ``greedy`` [B, k + 1].

    Returns (accepted drafts per row, the tokens to commit [B, k + 1]: row ``b`` commits
    its first ``accepted[b] + 1``: the accepted drafts, then the main model's token).
    """
    k = drafts.size(1)
    matched = torch.cumprod((drafts == greedy[:, :k]).long(), dim=1).sum(dim=1)
    return matched.tolist(), greedy


def accept_sampled(drafts: torch.Tensor, q: torch.Tensor, p: torch.Tensor,
                   sampling: Sampling) -> Tuple[List[int], torch.Tensor]:
    """Speculative sampling for a batch: drafts [B, k] drawn from q [B, k, V]; the main
    model's distributions p [B, k + 1, V]. Same return as :func:`accept_greedy`."""
    batch, k = drafts.shape
    gen = sampling.rng(p.device)
    rows = torch.arange(batch, device=p.device)
    if k:
        idx = drafts.unsqueeze(-1)
        p_x = p[:, :k].gather(-1, idx).squeeze(-1)
        q_x = q.gather(-1, idx).squeeze(-1)
        u = torch.rand(batch, k, generator=gen, device=p.device)
        ok = u * q_x < p_x  # u < p/q without dividing (q_x > 0: x was drawn from q)
        accepted = torch.cumprod(ok.long(), dim=1).sum(dim=1)
    else:
        accepted = torch.zeros(batch, dtype=torch.long, device=p.device)
    # The token after the accepted drafts: from the residual where a draft was
    # rejected, from p_{k+1} where all were accepted.
    target = p[rows, accepted]
    if k:
        rejected = accepted < k
        q_pad = torch.cat([q, torch.zeros_like(q[:, :1])], dim=1)
        residual = (target - q_pad[rows, accepted]).clamp(min=0)
        mass = residual.sum(dim=-1, keepdim=True)
        use = rejected.unsqueeze(-1) & (mass > 0)  # mass 0: p == q there, never rejected
        target = torch.where(use, residual / mass.clamp(min=1e-30), target)
    last = torch.multinomial(target, 1, generator=gen).squeeze(-1)
    tokens = torch.cat([drafts, drafts.new_zeros(batch, 1)], dim=1)
    tokens[rows, accepted] = last
    return accepted.tolist(), tokens

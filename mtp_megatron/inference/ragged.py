"""Per-row runs of hidden states of different lengths, kept as one padded tensor.

    runs = Ragged.of(hidden, [3, 1])         # row 0: hidden[:3, 0], row 1: hidden[:1, 1]
    runs = runs.append(more, [2, 2])         # row 0 now has 5 rows, row 1 has 3
    runs = runs.slice([1, 0], [4, 2])        # row 0: its rows 1..3, row 1: rows 0..1
    runs.data                                # [max length, batch, h], zero padded

Every operation is a few vectorized tensor ops whatever the batch size (the MTP
drafter moves hidden states between depths for every row at every step).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence

import torch


@dataclass
class Ragged:
    data: torch.Tensor  # [L, batch, h]; row r's runs are data[:counts[r], r]
    counts: List[int]

    @classmethod
    def of(cls, data: torch.Tensor, counts: Sequence[int]) -> "Ragged":
        return cls(data[: max(counts, default=0)], list(counts))

    @classmethod
    def empty(cls, batch: int, like: torch.Tensor) -> "Ragged":
        return cls(like.new_zeros(0, batch, like.size(-1)), [0] * batch)

    def _counts(self) -> torch.Tensor:
        return torch.tensor(self.counts, dtype=torch.long, device=self.data.device)

    def append(self, more: torch.Tensor, counts: Sequence[int]) -> "Ragged":
        """Row ``r`` gets ``more[:counts[r], r]`` after its own rows."""
        total = [a + b for a, b in zip(self.counts, counts)]
        width = max(total, default=0)
        out = self.data.new_zeros(width, self.data.size(1), self.data.size(-1))
        out[: self.data.size(0)] = self.data[:width]
        steps = torch.arange(more.size(0), device=more.device).unsqueeze(1)  # [w, 1]
        added = torch.tensor(list(counts), dtype=torch.long, device=more.device)
        mask = steps < added.unsqueeze(0)  # [w, batch]
        rows = torch.arange(more.size(1), device=more.device).expand_as(mask)
        target = (self._counts().unsqueeze(0) + steps).expand_as(mask)
        out[target[mask], rows[mask]] = more[steps.expand_as(mask)[mask], rows[mask]]
        return Ragged(out, total)

    def slice(self, starts: Sequence[int], ends: Sequence[int]) -> "Ragged":
        """Row ``r`` keeps its rows ``starts[r] .. ends[r] - 1``."""
        counts = [max(0, e - s) for s, e in zip(starts, ends)]
        width = max(counts, default=0)
        if width == 0 or self.data.size(0) == 0:
            return Ragged(self.data[:0], counts)
        first = torch.tensor(list(starts), dtype=torch.long, device=self.data.device)
        index = (first.unsqueeze(0) + torch.arange(width, device=self.data.device).unsqueeze(1))
        index = index.clamp(0, self.data.size(0) - 1)
        index = index.unsqueeze(-1).expand(width, self.data.size(1), self.data.size(-1))
        return Ragged(self.data.gather(0, index), counts)

    def select(self, rows: Sequence[int]) -> "Ragged":
        """Only ``rows`` of the batch, in this order."""
        index = torch.tensor(list(rows), dtype=torch.long, device=self.data.device)
        return Ragged(self.data[:, index], [self.counts[r] for r in rows])

"""One stack's KV cache for a batch of sequences of different lengths.

megatron-core's ``StaticInferenceContext`` stores keys and values in columns
``[0, sequence_len_offset)`` shared by every row of the batch: a forward of ``w`` new
tokens per row writes columns ``[offset, offset + w)`` for all rows at once. Rows here
advance by different amounts (ragged prompts, per-row acceptance of drafts), so each
column also records, per row, the *position* of the token stored there:

* a row feeding fewer than ``w`` tokens pads; its padding columns get position
  :data:`UNUSED` and no query ever attends to them;
* rolling a row back to ``length`` marks its columns at positions ``>= length`` unused;
* a query at position ``p`` attends to the columns of its row with position ``<= p``
  (:meth:`RowCache.mask`), so holes cost compute but never change a result;
* the shared offset rolls back to just after the last used column of any row (with one
  row: exactly to its length, no holes ever), and :meth:`RowCache.compact` squeezes the
  holes out when they grow.

RoPE rotates every cached key again at each forward from a table indexed by column
(megatron-core's static-batching path); :meth:`RowCache.rope` keeps that table per row,
``[columns, batch, 1, dim]``, built from the positions.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from megatron.core.inference.contexts import StaticInferenceContext

UNUSED = 2**40  # the position of a padding or rolled-back column
COMPACT_AFTER = 32  # squeeze holes out once this many unused columns pile up


class RowCache:
    """A ``StaticInferenceContext`` plus each column's position, per row."""

    def __init__(self, batch: int, max_columns: int, device: torch.device,
                 rope: Optional[torch.Tensor]):
        self.ctx = StaticInferenceContext(batch, max_columns)
        self.device = device
        self.columns: List[List[int]] = [[] for _ in range(batch)]  # per row, per position
        self.positions = torch.full((batch, max_columns), UNUSED, dtype=torch.long,
                                    device=device)
        self._rope_source = rope  # [max positions, 1, 1, dim] or None
        self._rope: Optional[torch.Tensor] = None
        if rope is not None:
            self._rope = rope.new_zeros(max_columns, batch, 1, rope.size(-1))

    @property
    def batch(self) -> int:
        return len(self.columns)

    @property
    def offset(self) -> int:
        return self.ctx.sequence_len_offset

    def lengths(self) -> List[int]:
        """Tokens cached per row (= the position of the next token)."""
        return [len(cols) for cols in self.columns]

    def append(self, counts: Sequence[int], width: int) -> torch.Tensor:
        """Reserve ``width`` columns; row ``r`` fills its first ``counts[r]``.

        Returns the new tokens' positions [batch, width] (:data:`UNUSED` for padding).
        """
        start = self.offset
        if start + width > self.positions.size(1):
            self.compact()
            start = self.offset
            if start + width > self.positions.size(1):
                raise ValueError(f"{start + width} cache columns needed, {self.positions.size(1)} "
                                 "allocated; reset() with a larger max_length")
        rows = []
        for r, count in enumerate(counts):
            first = len(self.columns[r])
            rows.append(list(range(first, first + count)) + [UNUSED] * (width - count))
            self.columns[r].extend(range(start, start + count))
        new = torch.tensor(rows, dtype=torch.long, device=self.device)
        self.positions[:, start:start + width] = new
        if self._rope is not None:
            self._rope[start:start + width] = self._rope_rows(new)
        return new

    def _rope_rows(self, positions: torch.Tensor) -> torch.Tensor:
        """[w, batch, 1, dim] rotary angles of ``positions`` [batch, w]."""
        table = self._rope_source[:, 0, 0]  # [L, dim]
        index = positions.t().clamp(max=table.size(0) - 1)
        return table[index].unsqueeze(2)

    def mask(self, new: torch.Tensor) -> torch.Tensor:
        """[batch, 1, w, offset + w] attention mask of the new tokens, True = masked."""
        end = self.offset + new.size(1)
        return self.positions[:, None, None, :end] > new[:, None, :, None]

    def rope(self) -> Optional[torch.Tensor]:
        """The rotary table megatron-core slices by column: [max_columns, batch, 1, dim]."""
        return self._rope

    def advance(self, width: int) -> None:
        self.ctx.sequence_len_offset += width

    def truncate(self, lengths: Sequence[int]) -> None:
        """Keep positions ``< lengths[r]`` of each row; roll the offset back."""
        drop_rows, drop_cols = [], []
        for r, length in enumerate(lengths):
            cols = self.columns[r]
            if length > len(cols):
                raise ValueError(f"cannot truncate row {r} from {len(cols)} up to {length}")
            drop_cols += cols[length:]
            drop_rows += [r] * (len(cols) - length)
            del cols[length:]
        if drop_cols:
            self.positions[drop_rows, drop_cols] = UNUSED
        self.ctx.sequence_len_offset = 1 + max((cols[-1] for cols in self.columns if cols),
                                               default=-1)
        if self.ctx.sequence_len_offset - max(self.lengths()) >= COMPACT_AFTER:
            self.compact()

    def compact(self) -> None:
        """Move each row's cached tokens to columns ``0 .. length - 1`` (no holes)."""
        width = max(self.lengths(), default=0)
        if width == self.offset:
            return
        rows = [cols + [0] * (width - len(cols)) for cols in self.columns]
        index = torch.tensor(rows, dtype=torch.long, device=self.device).t()
        for layer, (key, value) in self.ctx.key_value_memory_dict.items():
            self.ctx.key_value_memory_dict[layer] = (_gather_columns(key, index),
                                                     _gather_columns(value, index))
        self.positions.fill_(UNUSED)
        for r, cols in enumerate(self.columns):
            self.positions[r, : len(cols)] = torch.arange(len(cols), device=self.device)
            self.columns[r] = list(range(len(cols)))
        if self._rope is not None:
            self._rope[:width] = self._rope_rows(self.positions[:, :width])
        self.ctx.sequence_len_offset = width

    def keep_rows(self, rows: Sequence[int]) -> None:
        """Keep only ``rows`` (in this order) of the batch: finished sequences leave."""
        index = torch.tensor(list(rows), dtype=torch.long, device=self.device)
        for layer, (key, value) in self.ctx.key_value_memory_dict.items():
            self.ctx.key_value_memory_dict[layer] = (key[:, index], value[:, index])
        self.ctx.max_batch_size = len(rows)
        self.columns = [self.columns[r] for r in rows]
        self.positions = self.positions[index]
        if self._rope is not None:
            self._rope = self._rope[:, index]


def _gather_columns(memory: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``memory`` [C, B, ...] with row ``b``'s columns ``index[:, b]`` moved to the front."""
    full = index.view(index.shape + (1,) * (memory.dim() - 2)).expand(
        (index.size(0), index.size(1)) + memory.shape[2:])
    out = memory.clone()
    out[: index.size(0)] = memory.gather(0, full)
    return out

"""Deterministic microbatches for a data-parallel rank.

Step ``i`` consumes global samples ``[consumed, consumed + global_batch_size)``; data
parallel rank ``r`` takes the ``r``-th contiguous slice and cuts it into microbatches.
The global batch is the same for every parallel layout, and resuming only needs
``consumed_samples``.

Samples are dicts of tensors (``tokens``, ``labels``, ``loss_mask``, ``position_ids``);
megatron-core's ``BlendedDataset`` (``--data-path`` with two or more prefixes) adds
``dataset_id``, a numpy scalar, which :func:`collate` turns into a tensor like the rest,
so a batch says which dataset each of its samples came from.
"""

from __future__ import annotations

from typing import Dict, List, Sequence

import numpy as np
import torch


def _as_tensor(value) -> torch.Tensor:
    return value if torch.is_tensor(value) else torch.as_tensor(np.asarray(value), device="cpu")


def collate(samples: Sequence[Dict[str, object]]) -> Dict[str, torch.Tensor]:
    """Stack samples field by field; numpy values (e.g. ``dataset_id``) become tensors."""
    return {key: torch.stack([_as_tensor(s[key]) for s in samples]) for key in samples[0]}


class GlobalBatchSampler:
    """Yields, per optimizer step, this rank's microbatches as dicts of tensors."""

    def __init__(self, dataset, *, micro_batch_size: int, global_batch_size: int,
                 dp_rank: int, dp_size: int, consumed_samples: int = 0):
        if global_batch_size % (micro_batch_size * dp_size):
            raise ValueError("global batch must be a multiple of micro batch x DP")
        self.dataset = dataset
        self.micro_batch_size = micro_batch_size
        self.global_batch_size = global_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.consumed_samples = consumed_samples

    @property
    def num_microbatches(self) -> int:
        return self.global_batch_size // (self.micro_batch_size * self.dp_size)

    def _sample(self, index: int) -> Dict[str, torch.Tensor]:
        return self.dataset[index % len(self.dataset)]

    def next_step(self) -> List[Dict[str, torch.Tensor]]:
        """This rank's microbatches for the next optimizer step."""
        per_rank = self.global_batch_size // self.dp_size
        start = self.consumed_samples + self.dp_rank * per_rank
        microbatches = []
        for m in range(self.num_microbatches):
            first = start + m * self.micro_batch_size
            samples = [self._sample(first + j) for j in range(self.micro_batch_size)]
            microbatches.append(collate(samples))
        self.consumed_samples += self.global_batch_size
        return microbatches

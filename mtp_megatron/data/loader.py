"""Microbatches built by ``--num-workers`` background processes, in pinned memory.

:class:`~mtp_megatron.data.iterator.GlobalBatchSampler` builds a step's microbatches in
the main thread, in pageable memory, just before the step needs them (so the
``non_blocking=True`` copy to the GPU is not asynchronous). :class:`PrefetchingLoader`
wraps the *same* sampler in a torch ``DataLoader`` whose item ``i`` is step ``i``'s
microbatches: workers build the next steps while the current one trains, pinned
(``pin_memory=True`` on CUDA) so the host-to-device copy overlaps compute. The sample
order is the sampler's, step for step, so losses and resume are identical to
``--num-workers 0``.

    loader = build_step_loader(dataset, num_workers=2, micro_batch_size=2,
                               global_batch_size=8, dp_rank=0, dp_size=1)
    microbatches = loader.next_step()     # as GlobalBatchSampler.next_step()
    loader.consumed_samples               # samples of the steps handed out so far
"""

from __future__ import annotations

import itertools
from typing import Dict, Iterator, List, Union

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from mtp_megatron.data.iterator import GlobalBatchSampler


class _Steps(Dataset):
    """Item ``i``: this rank's microbatches of the ``i``-th step after ``first_sample``
    (built by the sampler's own ``next_step``)."""

    def __init__(self, dataset, first_sample: int, **sampler_args):
        self.dataset = dataset
        self.first_sample = first_sample
        self.sampler_args = sampler_args

    def __len__(self) -> int:  # steps are unbounded; the sampler decides which are read
        return 2**62

    def __getitem__(self, step: int) -> List[Dict[str, torch.Tensor]]:
        gbs = self.sampler_args["global_batch_size"]
        return GlobalBatchSampler(self.dataset, consumed_samples=self.first_sample + step * gbs,
                                  **self.sampler_args).next_step()


class _StepIndices(Sampler):
    """Step numbers 0, 1, 2, ... forever."""

    def __iter__(self) -> Iterator[int]:
        return itertools.count()


class PrefetchingLoader:
    """``next_step()`` and ``consumed_samples`` like GlobalBatchSampler, built by workers."""

    def __init__(self, dataset, *, num_workers: int, micro_batch_size: int,
                 global_batch_size: int, dp_rank: int, dp_size: int,
                 consumed_samples: int = 0, pin_memory: bool = False, prefetch_factor: int = 2):
        args = dict(micro_batch_size=micro_batch_size, global_batch_size=global_batch_size,
                    dp_rank=dp_rank, dp_size=dp_size)
        self.global_batch_size = global_batch_size
        self.num_microbatches = global_batch_size // (micro_batch_size * dp_size)
        self.consumed_samples = consumed_samples
        self._loader = DataLoader(
            _Steps(dataset, consumed_samples, **args), batch_size=None, sampler=_StepIndices(),
            num_workers=num_workers, pin_memory=pin_memory, prefetch_factor=prefetch_factor,
            persistent_workers=True,
        )
        self._iter = None

    def next_step(self) -> List[Dict[str, torch.Tensor]]:
        if self._iter is None:  # start the workers on first use
            self._iter = iter(self._loader)
        microbatches = next(self._iter)
        self.consumed_samples += self.global_batch_size
        return microbatches

    def close(self) -> None:
        """Stop the workers (they would otherwise live until the process exits)."""
        if self._iter is not None:
            self._iter._shutdown_workers()
            self._iter = None


def build_step_loader(dataset, *, num_workers: int, **sampler_args
                      ) -> Union[GlobalBatchSampler, PrefetchingLoader]:
    """The sampler itself for ``--num-workers 0``, else the prefetching loader (pinned
    memory when CUDA is available)."""
    if num_workers == 0:
        return GlobalBatchSampler(dataset, **sampler_args)
    return PrefetchingLoader(dataset, num_workers=num_workers,
                             pin_memory=torch.cuda.is_available(), **sampler_args)

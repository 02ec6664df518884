"""Put each parameter's distributed-optimizer state where megatron-core reads it.

The bug (megatron-core 0.16.1, still in 0.19.2, ``DistributedOptimizer``; the warning it
logs at save and load is "'embedding.word_embeddings.weight' param range exceeds unpadded
buffer by 64 elements. It will be padded with zeros which can lead to data corruption",
their issue #504). The ``fully_reshardable`` format we save builds each parameter's optimizer state
(fp32 main weight, ``exp_avg``, ``exp_avg_sq``) by slicing "world tensors" from
``get_parameter_state_dp_zero()``, which concatenates the DDP buckets *without* the
padding at the end of each bucket, with the parameter's range from
``buffer.param_index_map``, which counts that padding. With the distributed optimizer a
bucket's end is padded to a multiple of lcm(DP, 128) elements (parameters start at
multiples of 64), so every parameter in a bucket after a padded one is read shifted by the
padding: its saved state is the tail of its own state followed by the head of the next
parameter's (or zeros past the end, which is when megatron-core warns). On load the
saved values are copied back unshifted, so weights and Adam moments change.

When a buffer has more than one bucket:

* PP > 1: the shared embedding (the first stage's, and the copy the MTP block uses on the
  last stage) gets a bucket of its own. The last stage's copy is a replica of the first
  stage's (same key, ``replica_id`` > 0): it is neither written nor read back from its own
  state, the load fills it from the first stage's, which the embedding all-reduce keeps
  identical. That is the usual "by 64 elements" warning with --mtp-num-layers, and nothing
  was lost. On the first stage the same shift *is* saved (and loaded into both stages)
  whenever the bucket before the embedding ends off a multiple of 128 elements (seen with
  h=32, --ffn-hidden-size 66; shapes that are multiples of 128 never do).
* --overlap-grad-reduce: buckets of --ddp-bucket-size elements (megatron-core's default
  is 40M), and every bucket but the first was saved shifted: weights and moments wrong
  after a resume (only the last parameter of the buffer triggers the warning).

The fix, for the duration of ``sharded_state_dict``: give megatron-core world tensors laid
out like the buffer (bucket padding put back as zeros), so ``param_index_map``'s ranges
read each parameter's own state. Save and load both go through it, the checkpoint format
is unchanged (one tensor per parameter), and it does nothing where there is no padding
between buckets or megatron-core already returns padded world tensors.

    with padded_world_tensors(optimizer):
        state = optimizer.sharded_state_dict(model_sd, is_loading=False, metadata=md)
"""

from __future__ import annotations

import contextlib
from typing import Iterator, List

import torch
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

from mtp_megatron.runtime import mcore_compat
from mtp_megatron.runtime.optimizer_parts import sub_optimizers

STATE_KEYS = ("param", "exp_avg", "exp_avg_sq")


def distributed_optimizers(optimizer) -> List[DistributedOptimizer]:
    """The ``DistributedOptimizer`` instances in ``optimizer`` (chained or not)."""
    return [sub for sub in sub_optimizers(optimizer) if isinstance(sub, DistributedOptimizer)]


def pad_like_buffer(world: torch.Tensor, buffer) -> torch.Tensor:
    """``world`` (buckets back to back, end padding dropped) laid out like ``buffer``:
    bucket ``b`` at its offset in the buffer, zeros in the padding."""
    if world.numel() != buffer.numel_unpadded or buffer.numel == buffer.numel_unpadded:
        return world  # no padding between buckets, or already laid out like the buffer
    padded = torch.zeros(buffer.numel, dtype=world.dtype, device=world.device)
    src = 0
    for bucket in buffer.buckets:
        padded[bucket.offset:bucket.offset + bucket.numel_unpadded].copy_(
            world[src:src + bucket.numel_unpadded])
        src += bucket.numel_unpadded
    return padded


def _padded_dp_zero(sub: DistributedOptimizer, original):
    def get_parameter_state_dp_zero(*args, **kwargs):
        state = original(*args, **kwargs)
        if state is None:  # not DP rank 0 in the memory-efficient gather
            return state
        for gbuf_idx, buffer in enumerate(sub.buffers):
            for world_tensors in state[gbuf_idx].values():
                for key in STATE_KEYS:
                    if key in world_tensors:
                        world_tensors[key] = pad_like_buffer(world_tensors[key], buffer)
        return state

    return get_parameter_state_dp_zero


@contextlib.contextmanager
def padded_world_tensors(optimizer) -> Iterator[None]:
    """Within the block, each distributed optimizer's ``get_parameter_state_dp_zero``
    returns buffer-shaped world tensors (see the module docstring)."""
    subs = distributed_optimizers(optimizer) if mcore_compat.needs("distopt_bucket_padding") else []
    for sub in subs:
        sub.get_parameter_state_dp_zero = _padded_dp_zero(sub, sub.get_parameter_state_dp_zero)
    try:
        yield
    finally:
        for sub in subs:
            del sub.get_parameter_state_dp_zero  # the class's method again

"""megatron-core's fused projections <-> Hugging Face's separate ones (pure tensor code).

megatron-core's ``linear_qkv`` (weight ``[(np + 2 ng) hn, h]``, bias likewise) is grouped
by query group: for each group ``g`` it holds the ``np / ng`` query heads of that group,
then the group's key head, then its value head::

    [q_0 .. q_{r-1}, k_0, v_0,  q_r .. q_{2r-1}, k_1, v_1,  ...]     r = np / ng

Hugging Face Llama keeps ``q_proj`` (heads in order), ``k_proj`` and ``v_proj``; query head
``i`` reads key/value head ``i // r`` there as well. GPT-NeoX's ``query_key_value`` is per
head ``[q_i, k_i, v_i]``: megatron-core's layout with ``ng = np``, so it is copied as is.

With SwiGLU, megatron-core's ``linear_fc1`` is ``[gate; up]`` stacked along the output
dimension (``act(first half) * second half``), HF Llama's ``gate_proj`` and ``up_proj``.

    q, k, v = split_qkv(w, heads=8, groups=2, head_dim=64)
    w2 = merge_qkv(q, k, v, heads=8, groups=2, head_dim=64)   # torch.equal(w2, w)
"""

from __future__ import annotations

from typing import Tuple

import torch


def split_qkv(fused: torch.Tensor, *, heads: int, groups: int, head_dim: int
              ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """megatron-core's grouped ``linear_qkv`` weight or bias -> (q, k, v) in HF order."""
    per_group = heads // groups
    rest = fused.shape[1:]
    grouped = fused.reshape(groups, per_group + 2, head_dim, *rest)
    q = grouped[:, :per_group].reshape(heads * head_dim, *rest)
    k = grouped[:, per_group].reshape(groups * head_dim, *rest)
    v = grouped[:, per_group + 1].reshape(groups * head_dim, *rest)
    return q.contiguous(), k.contiguous(), v.contiguous()


def merge_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, heads: int, groups: int,
              head_dim: int) -> torch.Tensor:
    """(q, k, v) in HF order -> megatron-core's grouped ``linear_qkv`` weight or bias."""
    per_group = heads // groups
    rest = q.shape[1:]
    grouped = torch.cat([
        q.reshape(groups, per_group, head_dim, *rest),
        k.reshape(groups, 1, head_dim, *rest),
        v.reshape(groups, 1, head_dim, *rest),
    ], dim=1)
    return grouped.reshape(-1, *rest).contiguous()


def split_gate_up(fused: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """SwiGLU ``linear_fc1`` -> (gate_proj, up_proj)."""
    gate, up = torch.chunk(fused, 2, dim=0)
    return gate.contiguous(), up.contiguous()


def merge_gate_up(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """(gate_proj, up_proj) -> SwiGLU ``linear_fc1``."""
    return torch.cat([gate, up], dim=0).contiguous()

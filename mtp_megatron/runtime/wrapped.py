"""The model inside megatron-core's wrappers.

    gpt = innermost(chunk)   # the GPTModel inside DDP and Float16Module
"""

from __future__ import annotations

import torch


def innermost(chunk: torch.nn.Module) -> torch.nn.Module:
    """Follow ``.module`` through every wrapper (DDP, Float16Module) to the model."""
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk

"""Vocabulary rows that take no probability mass: their logits are masked.

Only a resume whose TP cannot split the checkpoint's padded vocabulary needs this
(``checkpoint/vocab.py``): the rows it adds were never trained, and unmasked their
logits would take probability mass from every token (the loss jumps). A forward hook on
each last-stage chunk's ``output_layer`` (which megatron-core calls for the main head and
every MTP depth) sets the logits of rows ``live`` and up to the dtype's lowest value:
softmax gives them exactly zero, no gradient reaches them, and argmax never picks them.

    mask_dead_rows(model_chunks, live=258, padded=260)   # rows 258, 259 masked
"""

from __future__ import annotations

from typing import List

import torch
from megatron.core import parallel_state

from mtp_megatron.runtime.wrapped import innermost


def dead_columns(local: int, padded: int, live: int, tp_rank: int) -> slice:
    """The columns of a rank's ``local``-wide logits that belong to rows ``live`` and up
    (all ``padded`` rows when the logits are gathered)."""
    start = 0 if local == padded else tp_rank * local
    return slice(min(max(live - start, 0), local), local)


def mask_dead_rows(model_chunks: List[torch.nn.Module], *, live: int, padded: int) -> list:
    """Mask the logits of rows ``live .. padded - 1``; returns the hook handles."""
    if live >= padded:
        return []
    handles = []
    for chunk in model_chunks:
        gpt = innermost(chunk)
        if not getattr(gpt, "post_process", False):
            continue
        handles.append(gpt.output_layer.register_forward_hook(_masker(live, padded)))
    return handles


def _masker(live: int, padded: int):
    def hook(module, inputs, output):
        logits, bias = output
        columns = dead_columns(logits.size(-1), padded, live,
                               parallel_state.get_tensor_model_parallel_rank())
        if columns.start >= columns.stop:
            return output
        mask = torch.zeros(logits.size(-1), dtype=torch.bool, device=logits.device)
        mask[columns] = True
        return logits.masked_fill(mask, torch.finfo(logits.dtype).min), bias

    return hook

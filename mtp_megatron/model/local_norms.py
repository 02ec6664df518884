"""Sequence parallelism on the local backend (no Transformer Engine, e.g. on CPU).

megatron-core's local layer specs build their norms with ``WrappedTorchNorm`` (torch's
``RMSNorm`` / ``LayerNorm``), which asserts ``not config.sequence_parallel``. Yet an MoE
layer under tensor parallelism requires sequence parallelism (``MoELayer.forward`` raises
without it), so TP x EP could not run without Transformer Engine at all.

Under sequence parallelism a norm sees this rank's slice of the sequence. The
normalisation is per token and needs nothing; only its weight (and bias) gradient is a
partial sum over this rank's tokens, which megatron-core's ``finalize_model_grads`` sums
over the tensor-parallel group for every parameter marked ``sequence_parallel`` (the mark
Transformer Engine's and apex's norms set). :class:`SequenceParallelTorchNorm` is torch's
norm with that mark; :func:`with_sequence_parallel_norms` swaps it into a layer spec.

    spec = with_sequence_parallel_norms(get_gpt_decoder_block_spec(config, False))
"""

from __future__ import annotations

import torch
from megatron.core.transformer.torch_norm import WrappedTorchNorm

from mtp_megatron.model.spec_edit import replace_module


class SequenceParallelTorchNorm:
    """``WrappedTorchNorm``'s torch norm, its parameters marked ``sequence_parallel`` so
    that megatron-core sums their gradients over the tensor-parallel ranks."""

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, **_unused):
        norms = {"RMSNorm": torch.nn.RMSNorm, "LayerNorm": torch.nn.LayerNorm}
        norm = norms[config.normalization](normalized_shape=hidden_size, eps=eps)
        for param in norm.parameters():
            param.sequence_parallel = config.sequence_parallel
        return norm


def with_sequence_parallel_norms(spec):
    """A copy of ``spec`` (module specs, submodule dataclasses, lists, partials) with every
    ``WrappedTorchNorm`` replaced by :class:`SequenceParallelTorchNorm`."""
    return replace_module(spec, WrappedTorchNorm, SequenceParallelTorchNorm)

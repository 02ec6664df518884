"""MLA's core attention on the local backend (model/mla.py) is softmax(QK^T * scale) V.

megatron-core 0.19.2's ``DotProductAttention`` cannot take MLA's head widths
(NVIDIA/Megatron-LM#1589); :class:`MLADotProductAttention` does. Here it runs in this
process (no process group: a one-rank TP group stand-in, megatron-core's memory buffer and
a no-op RNG fork) on queries/keys of ``qk_head_dim + qk_pos_emb_head_dim`` and values of
``v_head_dim``, and must equal a plain causal softmax(QK^T * scale) V per head, with its
default scale ``1/sqrt(d_qk + d_pe)`` and with the scale MLA passes (YaRN's mscale).
"""

import contextlib
import math
import types

import pytest
import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.transformer_config import MLATransformerConfig

from mtp_megatron.model.mla import MLADotProductAttention

HEADS, QK, PE, V, SEQ, BATCH = 4, 8, 4, 6, 7, 2
ONE_RANK = types.SimpleNamespace(tp=types.SimpleNamespace(size=lambda: 1))


class _NoFork:
    def fork(self, *args, **kwargs):
        return contextlib.nullcontext()


class _CpuBuffer:  # megatron-core's GlobalMemoryBuffer allocates on the current GPU
    def get_tensor(self, shape, dtype, name):
        return torch.empty(shape, dtype=dtype)


@pytest.fixture
def in_process(monkeypatch):
    monkeypatch.setattr(parallel_state, "get_global_memory_buffer", _CpuBuffer)
    monkeypatch.setattr(tensor_parallel, "get_cuda_rng_tracker", lambda: _NoFork())


def _config():
    return MLATransformerConfig(
        num_layers=1, hidden_size=32, num_attention_heads=HEADS, q_lora_rank=None,
        kv_lora_rank=16, qk_head_dim=QK, qk_pos_emb_head_dim=PE, v_head_dim=V,
        rope_type="rope", rotary_scaling_factor=1.0, attention_dropout=0.0,
    )


def _attention(softmax_scale=None):
    return MLADotProductAttention(
        _config(), layer_number=1, attn_mask_type=AttnMaskType.causal,
        attention_type="self", softmax_scale=softmax_scale, k_channels=QK + PE,
        v_channels=V, pg_collection=ONE_RANK,
    )


def _plain(q, k, v, scale):
    """[s, b, n, d] in, [s, b, n * d_v] out: causal softmax(QK^T * scale) V per head."""
    scores = torch.einsum("sbnd,tbnd->bnst", q, k) * scale
    causal = torch.ones(SEQ, SEQ, dtype=torch.bool).triu(1)
    probs = scores.masked_fill(causal, float("-inf")).softmax(-1)
    return torch.einsum("bnst,tbnd->sbnd", probs, v).reshape(SEQ, BATCH, HEADS * V)


def _inputs():
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(SEQ, BATCH, HEADS, QK + PE, generator=gen)
    k = torch.randn(SEQ, BATCH, HEADS, QK + PE, generator=gen)
    v = torch.randn(SEQ, BATCH, HEADS, V, generator=gen)
    mask = torch.ones(1, 1, SEQ, SEQ, dtype=torch.bool).triu(1)  # True: masked out
    return q, k, v, mask


@pytest.mark.parametrize("softmax_scale", [None, 1.3 / math.sqrt(QK + PE)])
def test_core_attention_is_softmax_qk_scaled_times_v(in_process, softmax_scale):
    q, k, v, mask = _inputs()
    got = _attention(softmax_scale)(q, k, v, mask)
    scale = softmax_scale or 1.0 / math.sqrt(QK + PE)
    assert got.shape == (SEQ, BATCH, HEADS * V)
    torch.testing.assert_close(got, _plain(q, k, v, scale), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got, _plain(q, k, v, 1.0 / math.sqrt(QK)))  # scale matters


def test_megatron_cores_own_class_still_refuses_the_mla_widths():
    """The reason model/mla.py exists: when this fails, megatron-core has the fix and
    ``local_mla_spec`` need not swap the core attention."""
    with pytest.raises(TypeError, match="k_channels"):
        DotProductAttention(_config(), 1, AttnMaskType.causal, "self", k_channels=QK + PE,
                            v_channels=V, pg_collection=ONE_RANK)

"""Multi-latent attention (MLA): our flags as megatron-core's ``MLATransformerConfig``
fields, and a core attention that lets MLA run on the local backend (CPU).

megatron-core builds MLA itself (``MLASelfAttention``, chosen by
``get_gpt_decoder_block_spec`` from ``config.multi_latent_attention``; the MTP layers copy
the decoder's last layer spec, so they are MLA layers too). On the Transformer Engine
backend its core attention is ``TEDotProductAttention``. On the local backend megatron-core
0.19.2 names ``DotProductAttention``, but ``MLASelfAttention`` builds its core attention
with MLA's head widths (``k_channels = qk_head_dim + qk_pos_emb_head_dim``, ``v_channels =
v_head_dim``), which ``DotProductAttention.__init__`` does not accept
(NVIDIA/Megatron-LM#1589, fixed after 0.19.2): the model cannot be built.

:class:`MLADotProductAttention` is ``DotProductAttention`` taking those two widths. Its
forward is megatron-core's unchanged (it reads the head widths from the tensors); only the
output width changes, from ``kv_channels x heads`` to ``v_channels x heads``, and the
default softmax scale to ``1 / sqrt(k_channels)`` (MLA passes its own, with YaRN's
mscale). ``tests/unit/test_mla_attention.py`` compares it with ``softmax(QK^T / sqrt(d)) V``.

Under TP the local spec's down projections are column-parallel, and megatron-core 0.19.2
gathers the key/value latent over TP with ``gather_from_tensor_model_parallel_region``,
whose backward only splits: the rotary key part ``k_pe``, shared by the heads of all TP
ranks, then gets each rank's heads' gradient only (the losses match one rank, the
gradients do not; tests/unit/test_mla_layouts.py caught it). :class:`LocalMLASelfAttention`
hands megatron-core the latent already gathered and, with sequence parallelism, scattered
back to the sequence split, so megatron-core takes its Transformer Engine path (a
whole-width latent): ``k_pe`` is gathered from the sequence-parallel region, whose
backward reduce-scatters, summing the heads of every TP rank. TP > 1 without
``--sequence-parallel`` is refused at config time (``config/mla.py``).

:func:`local_mla_spec` swaps both classes into a layer spec.

    kwargs = mla_config_kwargs(cfg.model)     # MLATransformerConfig fields ({} without MLA)
    spec = local_mla_spec(get_gpt_decoder_block_spec(tconfig, False))
"""

from __future__ import annotations

import math
from typing import Any, Dict, Optional

from megatron.core.tensor_parallel.mappings import (
    gather_from_tensor_model_parallel_region,
    scatter_to_sequence_parallel_region,
)
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.multi_latent_attention import MLASelfAttention

from mtp_megatron.config import ModelConfig
from mtp_megatron.model.spec_edit import replace_module


def mla_config_kwargs(model: ModelConfig) -> Dict[str, Any]:
    """``MLATransformerConfig`` fields for ``--multi-latent-attention`` (empty without)."""
    if not model.multi_latent_attention:
        return {}
    return dict(
        multi_latent_attention=True,
        q_lora_rank=model.q_lora_rank,
        kv_lora_rank=model.kv_lora_rank,
        qk_head_dim=model.qk_head_dim,
        qk_pos_emb_head_dim=model.qk_pos_emb_head_dim,
        v_head_dim=model.v_head_dim,
        qk_layernorm=model.qk_layernorm,
        rope_type=model.mla_rope_type,
        rotary_base=float(model.rotary_base),
        rotary_scaling_factor=model.rotary_scaling_factor,
        mscale=model.mscale,
        mscale_all_dim=model.mscale_all_dim,
        original_max_position_embeddings=model.yarn_original_max_position_embeddings,
        beta_fast=model.yarn_beta_fast,
        beta_slow=model.yarn_beta_slow,
    )


class MLADotProductAttention(DotProductAttention):
    """megatron-core's unfused ``DotProductAttention`` with MLA's per-head widths: queries
    and keys of ``k_channels``, values (and so the output) of ``v_channels``."""

    def __init__(self, config, layer_number: int, attn_mask_type, attention_type: str,
                 attention_dropout: Optional[float] = None,
                 softmax_scale: Optional[float] = None, k_channels: Optional[int] = None,
                 v_channels: Optional[int] = None, cp_comm_type: Optional[str] = None,
                 pg_collection=None):
        super().__init__(config, layer_number, attn_mask_type, attention_type,
                         attention_dropout=attention_dropout, softmax_scale=softmax_scale,
                         cp_comm_type=cp_comm_type, pg_collection=pg_collection)
        if k_channels is not None:
            self.hidden_size_per_attention_head = k_channels
            if softmax_scale is None:
                self.softmax_scale = 1.0 / math.sqrt(k_channels)
                if self.config.apply_query_key_layer_scaling:
                    self.softmax_scale /= self.layer_number
        if v_channels is not None:  # forward's output view: [sq, b, heads x v_channels]
            self.hidden_size_per_partition = v_channels * self.num_attention_heads_per_partition


class LocalMLASelfAttention(MLASelfAttention):
    """megatron-core's ``MLASelfAttention`` whose column-parallel key/value down projection
    output is gathered over TP (and re-split by sequence with sequence parallelism) before
    megatron-core sees it, so the shared rotary key gets the gradient of every TP rank's
    heads (see the module docstring)."""

    def _qkv_down_projection(self, hidden_states):
        q_compressed, kv_combined = super()._qkv_down_projection(hidden_states)
        if kv_combined.size(-1) != self.config.kv_lora_rank + self.config.qk_pos_emb_head_dim:
            kv_combined = gather_from_tensor_model_parallel_region(kv_combined,
                                                                   group=self.tp_group)
            if self.config.sequence_parallel:
                kv_combined = scatter_to_sequence_parallel_region(kv_combined,
                                                                  group=self.tp_group)
        return q_compressed, kv_combined


def local_mla_spec(spec):
    """A copy of ``spec`` whose MLA layers the local backend can build and train under TP:
    :class:`MLADotProductAttention` for megatron-core's ``DotProductAttention`` (only MLA
    layers build it with the MLA widths; the class is the same maths for any other) and
    :class:`LocalMLASelfAttention` for ``MLASelfAttention``."""
    spec = replace_module(spec, DotProductAttention, MLADotProductAttention)
    return replace_module(spec, MLASelfAttention, LocalMLASelfAttention)

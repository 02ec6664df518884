"""Mixture-of-Experts models: our MoE flags as megatron-core settings, and the decoder spec.

With ``--num-experts`` the decoder is megatron-core's block spec
(``get_gpt_decoder_block_spec``): one layer spec per decoder layer, MoE where
``--moe-layer-freq`` says, dense elsewhere (DeepSeek-V3's first dense layers). The MTP
block is built from that spec as megatron-core builds it (``get_gpt_mtp_block_spec``
takes the decoder's *last* layer spec), so each MTP layer has the last decoder layer's
type: an MoE layer with its own router and experts in the DeepSeek-V3 shape.

    kwargs = moe_config_kwargs(cfg)        # TransformerConfig fields (empty when dense)
    spec = decoder_block_spec(cfg, tconfig, "local", vp_stage=None)
    mark_routed_experts(chunk)             # before DDP: experts in their own buffers
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import torch
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

from mtp_megatron.config import RunConfig


def moe_config_kwargs(cfg: RunConfig) -> Dict[str, Any]:
    """TransformerConfig fields for ``--num-experts`` and the expert-parallel split."""
    model, par = cfg.model, cfg.parallel
    if not model.moe:
        return {}
    freq = model.moe_layer_freq
    return dict(
        num_moe_experts=model.num_experts,
        moe_ffn_hidden_size=model.moe_ffn_size,
        moe_router_topk=model.moe_router_topk,
        moe_shared_expert_intermediate_size=model.moe_shared_expert_intermediate_size,
        moe_layer_freq=freq if isinstance(freq, int) else list(freq),
        moe_router_score_function=model.moe_router_score_function,
        moe_router_pre_softmax=model.moe_router_pre_softmax,
        moe_router_topk_scaling_factor=model.moe_router_topk_scaling_factor,
        moe_router_num_groups=model.moe_router_num_groups,
        moe_router_group_topk=model.moe_router_group_topk,
        moe_router_load_balancing_type=model.moe_router_load_balancing_type,
        moe_aux_loss_coeff=model.moe_aux_loss_coeff,
        moe_router_enable_expert_bias=model.moe_router_enable_expert_bias,
        moe_router_bias_update_rate=model.moe_router_bias_update_rate,
        moe_grouped_gemm=model.moe_grouped_gemm,
        moe_token_dispatcher_type=par.moe_token_dispatcher_type,
        expert_model_parallel_size=par.expert_model_parallel_size,
        expert_tensor_parallel_size=par.expert_tensor_size,
    )


def decoder_block_spec(cfg: RunConfig, tconfig, transformer_impl: str,
                       vp_stage: Optional[int] = None):
    """This stage's (and virtual stage's) decoder layer specs, MoE or dense per layer."""
    return get_gpt_decoder_block_spec(
        tconfig, use_transformer_engine=transformer_impl == "transformer_engine",
        normalization=cfg.model.normalization, vp_stage=vp_stage,
    )


def mark_routed_experts(model: torch.nn.Module) -> int:
    """Mark every routed expert's parameter ``allreduce=False`` (megatron-core's "reduced
    over the expert-data-parallel group" mark); returns how many were marked.

    megatron-core marks them only with EP > 1 (or ETP != TP). With EP = 1 the experts are
    then ordinary parameters: DDP reduces them with the dense ones and the optimizer is
    one optimizer, while with EP > 1 it is a ``ChainedOptimizer`` of a dense and an expert
    optimizer. The two save differently structured optimizer states, so an EP2 checkpoint
    would not load into EP1 with its optimizer state (or back). Marked at EP = 1 too, the
    experts always get their own buffers and optimizer; their gradients are still
    reduced over the same ranks (the expert-data-parallel group is the data-parallel group
    when EP = 1 and ETP = TP), so training is unchanged (tests/unit/test_moe_layouts.py).
    """
    marked = 0
    for name, param in model.named_parameters():
        if ".mlp.experts." in name and getattr(param, "allreduce", True):
            param.allreduce = False
            marked += 1
    return marked

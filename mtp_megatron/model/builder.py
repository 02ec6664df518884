"""Build megatron-core's ``GPTModel`` with its MTP block, one chunk per virtual stage.

We use megatron-core's own MTP (``get_gpt_mtp_block_spec`` + ``TransformerConfig(
mtp_num_layers, mtp_loss_scaling_factor)``); this module only translates our config.
The MTP layers live on the last pipeline stage (the last virtual chunk with VPP).
"""

from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
    get_gpt_mtp_block_spec,
)
from megatron.core.models.gpt.gpt_model import GPTModel
from megatron.core.transformer.enums import AttnBackend
from megatron.core.transformer.module import Float16Module
from megatron.core.transformer.transformer_config import MLATransformerConfig, TransformerConfig

from mtp_megatron.config import RunConfig, padded_vocab_size
from mtp_megatron.model.local_norms import with_sequence_parallel_norms
from mtp_megatron.model.mla import local_mla_spec, mla_config_kwargs
from mtp_megatron.model.moe import decoder_block_spec, mark_routed_experts, moe_config_kwargs
from mtp_megatron.runtime import mcore_compat


def params_dtype(cfg: RunConfig) -> torch.dtype:
    if cfg.training.bf16:
        return torch.bfloat16
    if cfg.training.fp16:
        return torch.float16
    return torch.float32


def transformer_config(cfg: RunConfig, *, on_cpu: bool) -> TransformerConfig:
    """Our sections as a megatron-core TransformerConfig (MTP settings included); an
    ``MLATransformerConfig`` with --multi-latent-attention."""
    model, par, train, mtp = cfg.model, cfg.parallel, cfg.training, cfg.mtp
    dtype = params_dtype(cfg)
    fp8 = {}
    if train.fp8_format:
        fp8 = dict(fp8=train.fp8_format, fp8_recipe=train.fp8_recipe,
                   fp8_amax_history_len=train.fp8_amax_history_len,
                   fp8_amax_compute_algo="max")
    config_class = MLATransformerConfig if model.multi_latent_attention else TransformerConfig
    return config_class(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.query_groups,
        ffn_hidden_size=model.ffn_size,
        normalization=model.normalization,
        layernorm_epsilon=model.norm_epsilon,
        gated_linear_unit=model.swiglu,
        activation_func=F.silu if model.swiglu else F.gelu,
        add_bias_linear=not model.disable_bias_linear,
        hidden_dropout=model.hidden_dropout,
        attention_dropout=model.attention_dropout,
        init_method_std=model.init_method_std,
        tensor_model_parallel_size=par.tensor_model_parallel_size,
        pipeline_model_parallel_size=par.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=cfg.virtual_pipeline_size,
        context_parallel_size=par.context_parallel_size,
        sequence_parallel=par.sequence_parallel,
        bf16=train.bf16,
        fp16=train.fp16,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        autocast_dtype=dtype,
        calculate_per_token_loss=train.calculate_per_token_loss,
        use_cpu_initialization=on_cpu,
        mtp_num_layers=mtp.mtp_num_layers,
        mtp_loss_scaling_factor=mtp.mtp_loss_scaling_factor,
        recompute_granularity=train.recompute_granularity,
        recompute_method=train.recompute_method,
        recompute_num_layers=train.recompute_num_layers,
        cross_entropy_loss_fusion=train.cross_entropy_loss_fusion,
        cross_entropy_fusion_impl=train.cross_entropy_fusion_impl,
        attention_backend=AttnBackend[model.attention_backend],
        **mcore_compat.mtp_config_kwargs(repeated_layer=mtp.mtp_use_repeated_layer,
                                         detach_heads=mtp.mtp_detach_heads),
        **_p2p_settings(cfg),
        **moe_config_kwargs(cfg),
        **mla_config_kwargs(model),
        **fp8,
    )


def _p2p_settings(cfg: RunConfig) -> dict:
    """With virtual pipeline stages and PP=2 the previous and next stage are the same
    rank, and megatron-core's batched p2p (its default) swaps activations and gradients
    from the third microbatch on (NVIDIA/Megatron-LM#750, #1450; 0.16 and 0.19). Use
    separate, overlapped sends/receives with VPP, as Megatron-LM does."""
    if cfg.virtual_pipeline_size and mcore_compat.needs("vpp_unbatched_p2p"):
        return {"overlap_p2p_comm": True, "batch_p2p_comm": False}
    return {}


def layer_spec(cfg: RunConfig, transformer_impl: str, tconfig: Optional[TransformerConfig] = None,
               vp_stage: Optional[int] = None):
    """The decoder's layer spec: one for every layer, or with --num-experts or
    --multi-latent-attention the block spec of this (virtual) stage, MoE or dense per layer
    (``model/moe.py``), MLA layers with a core attention the local backend can build
    (``model/mla.py``)."""
    if cfg.model.moe or cfg.model.multi_latent_attention:
        spec = decoder_block_spec(cfg, tconfig, transformer_impl, vp_stage)
        if cfg.model.multi_latent_attention and transformer_impl == "local":
            spec = local_mla_spec(spec)
        return spec
    if transformer_impl == "transformer_engine":
        return get_gpt_layer_with_transformer_engine_spec()
    return get_gpt_layer_local_spec(normalization=cfg.model.normalization)


def vocab_size_for(cfg: RunConfig, tokenizer_vocab: int) -> int:
    """The padded vocabulary the embedding and output head are built with."""
    return padded_vocab_size(
        cfg.model.vocab_size or tokenizer_vocab,
        cfg.model.make_vocab_size_divisible_by,
        cfg.parallel.tensor_model_parallel_size,
    )


def build_gpt_chunk(cfg: RunConfig, tconfig: TransformerConfig, transformer_impl: str,
                    vocab_size: int, vp_stage: Optional[int] = None) -> GPTModel:
    """One GPTModel chunk for this rank (and virtual stage), MTP block where it belongs."""
    spec = layer_spec(cfg, transformer_impl, tconfig, vp_stage)
    mtp_spec = None
    if cfg.mtp.enabled:
        mtp_spec = get_gpt_mtp_block_spec(
            tconfig, spec, use_transformer_engine=transformer_impl == "transformer_engine",
            vp_stage=vp_stage,
        )
    if (cfg.model.moe or cfg.model.multi_latent_attention) and transformer_impl == "local" \
            and cfg.parallel.sequence_parallel:
        # MoE under TP needs sequence parallelism, which torch's norms refuse unmarked (MLA:
        # its latent norms too)
        spec, mtp_spec = with_sequence_parallel_norms(spec), with_sequence_parallel_norms(mtp_spec)
    with mcore_compat.gpt_model_deprecation_silenced():
        model = _gpt_model(cfg, tconfig, spec, mtp_spec, vocab_size, vp_stage)
    _drop_unused_output_weight(model)
    return model


def _gpt_model(cfg: RunConfig, tconfig: TransformerConfig, spec, mtp_spec, vocab_size: int,
               vp_stage: Optional[int]) -> GPTModel:
    return GPTModel(
        config=tconfig,
        transformer_layer_spec=spec,
        vocab_size=vocab_size,
        max_sequence_length=cfg.model.max_position_embeddings or cfg.model.seq_length,
        pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
        post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
        share_embeddings_and_output_weights=not cfg.model.untie_embeddings_and_output_weights,
        position_embedding_type=cfg.model.position_embedding_type,
        rotary_base=cfg.model.rotary_base,
        mtp_block_spec=mtp_spec,
        vp_stage=vp_stage,
    )


def _drop_unused_output_weight(model: GPTModel) -> None:
    """With tied embeddings and the MTP block on a stage that is not the first,
    megatron-core (0.16 and 0.19) allocates ``output_layer.weight`` there but computes
    every logit with the stage's embedding copy. 0.16's checkpointing then asserts the
    weight is absent ("output layer will not have any weight"); 0.19 saves it under a key
    no other layout has, so a PP2 checkpoint would not load into PP1 or back. Remove the
    dead parameter before DDP sees it: no gradient was ever lost, and V x h memory is
    saved (``mcore_compat.WORKAROUNDS["unused_mtp_output_weight"]``)."""
    if not mcore_compat.needs("unused_mtp_output_weight"):
        return
    if (model.share_embeddings_and_output_weights and model.mtp_process
            and not model.pre_process and model.post_process
            and model.output_layer.weight is not None):
        model.output_layer.weight = None


def freeze_main_model(model: GPTModel) -> int:
    """``--freeze-main-model``: every parameter outside the MTP block (embedding, decoder,
    output head) stops requiring a gradient, so megatron-core's DDP gives it no gradient
    buffer and the optimizer never sees it; gradients cannot reach it either (the MTP
    block's inputs come from frozen modules). Returns the parameters left trainable."""
    trainable = 0
    for name, param in model.named_parameters():
        param.requires_grad_(name.startswith("mtp."))
        trainable += param.requires_grad
    return trainable


def ddp_config_for(cfg: RunConfig) -> DistributedDataParallelConfig:
    """megatron-core DDP settings. NaN/Inf is found from the optimizer's grad norm
    (``training/faults.py``), so DDP's per-bucket ``check_for_nan_in_grad`` (a host sync
    per bucket) stays off."""
    par = cfg.parallel
    return DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        use_distributed_optimizer=par.use_distributed_optimizer,
        overlap_grad_reduce=par.overlap_grad_reduce,
        overlap_param_gather=par.overlap_param_gather,
        bucket_size=par.ddp_bucket_size,
        check_for_nan_in_grad=False,
    )


def build_model(cfg: RunConfig, tconfig: TransformerConfig, transformer_impl: str,
                vocab_size: int, device: torch.device) -> List[DistributedDataParallel]:
    """All chunks of this rank, on ``device``, wrapped in megatron-core DDP.

    With --bf16/--fp16 each chunk is first wrapped in megatron-core's ``Float16Module``
    (as Megatron-LM's ``get_model`` does): it casts *every* parameter to the half type.
    Without it the norm weights stay fp32 (megatron-core creates them in fp32 whatever
    ``params_dtype`` says), and the mixed fp32/half parameter list breaks the optimizers'
    checkpoints: ``Float16OptimizerWithFloat16Params.sharded_state_dict`` pairs optimizer
    state ids with the half parameters only ("Optimizer shape ((64,) does not match model
    shape ((192,))"), and the distributed optimizer's buffers get two dtypes.
    """
    # The MTP loss tracker is a process global: start each model with a clean one.
    mcore_compat.reset_mtp_tracker()
    if cfg.model.moe:
        mcore_compat.reset_moe_tracker()
    stages = cfg.virtual_pipeline_size or 1
    chunks = [
        build_gpt_chunk(cfg, tconfig, transformer_impl, vocab_size,
                        vp_stage=i if cfg.virtual_pipeline_size else None)
        for i in range(stages)
    ]
    ddp_config = ddp_config_for(cfg)
    wrapped = []
    for i, chunk in enumerate(chunks):
        if cfg.mtp.freeze_main_model:  # before DDP and the optimizer see the parameters
            freeze_main_model(chunk)
        chunk.to(device)
        if cfg.model.moe:
            mark_routed_experts(chunk)  # one optimizer structure for every EP (model/moe.py)
        if (tconfig.fp16 or tconfig.bf16) and mcore_compat.needs("float16_module"):
            chunk = Float16Module(tconfig, chunk)
        with mcore_compat.ddp_layout_notice_silenced():
            wrapped.append(DistributedDataParallel(
                tconfig, ddp_config, chunk, disable_bucketing=i > 0,
            ))
    return wrapped

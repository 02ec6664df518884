"""Our ``model:`` section <-> a Hugging Face ``config.json`` (Llama, GPT-NeoX, GLM-4.5 MoE;
DeepSeek-V3 in ``hf/deepseek_v3.py``).

    arch = for_model(cfg.model); kwargs = hf_config_kwargs(arch, cfg.model, vocab_size=V)
    arch, model_values = model_values_from_hf(AutoConfig.from_pretrained(hf_dir))

megatron-core's RoPE with ``rotary_interleaved=False`` rotates halves (``[-x2, x1]``) with
``inv_freq = base ** (-2i / d)`` and ``cos/sin`` of ``cat(freqs, freqs)``: HF Llama's and
GPT-NeoX's ``rotate_half`` exactly, so ``rope_theta`` = ``--rotary-base`` and nothing is
permuted. Norm epsilon: ``--norm-epsilon`` (megatron-core's ``layernorm_epsilon``) =
``rms_norm_eps`` / ``layer_norm_eps``.
"""

from __future__ import annotations

from typing import Any, Dict, Tuple

from mtp_megatron.config import ModelConfig
from mtp_megatron.hf.architectures import (
    BY_MODEL_TYPE,
    DEEPSEEK_V3,
    GLM4_MOE,
    LLAMA,
    Architecture,
    dense_prefix,
)
from mtp_megatron.hf.deps import HFError

# Imported runs train on sequences of at most this length unless --seq-length says otherwise.
MAX_IMPORTED_SEQ_LENGTH = 4096

def hf_config_kwargs(arch: Architecture, model: ModelConfig, *, vocab_size: int
                     ) -> Dict[str, Any]:
    """Keyword arguments of the transformers config class for our ``model`` section."""
    common = dict(
        architectures=[arch.hf_class], vocab_size=vocab_size,
        hidden_size=model.hidden_size, intermediate_size=model.ffn_size,
        num_hidden_layers=model.num_layers, num_attention_heads=model.num_attention_heads,
        max_position_embeddings=model.max_position_embeddings or model.seq_length,
        initializer_range=model.init_method_std, attention_dropout=model.attention_dropout,
        tie_word_embeddings=not model.untie_embeddings_and_output_weights,
    )
    theta = float(model.rotary_base)
    if arch is DEEPSEEK_V3:
        from mtp_megatron.hf.deepseek_v3 import deepseek_v3_kwargs  # (it imports this module)

        return dict(common, **deepseek_v3_kwargs(model, theta))
    if arch is GLM4_MOE:
        return dict(common, **glm4_moe_kwargs(model, theta))
    if arch is LLAMA:
        bias = not model.disable_bias_linear
        return dict(
            common, hidden_act="silu", num_key_value_heads=model.query_groups,
            head_dim=model.hidden_size // model.num_attention_heads,
            rms_norm_eps=model.norm_epsilon, attention_bias=bias, mlp_bias=bias,
            rope_parameters={"rope_type": "default", "rope_theta": theta},
        )
    return dict(
        common, hidden_act="gelu", layer_norm_eps=model.norm_epsilon,
        use_parallel_residual=False, attention_bias=True,
        hidden_dropout=model.hidden_dropout,
        rope_parameters={"rope_type": "default", "rope_theta": theta,
                         "partial_rotary_factor": 1.0},
    )


def glm4_moe_kwargs(model: ModelConfig, theta: float) -> Dict[str, Any]:
    """``Glm4MoeConfig`` fields of an MoE model (``architectures.check_glm4_moe`` passed):
    megatron-core normalises the chosen sigmoid scores when top-k > 1 (norm_topk_prob),
    rotates whole heads (partial_rotary_factor 1.0; GLM-4.5's default is 0.5), and scores
    groups by their top-2 experts when topk = 2 x group-topk."""
    return dict(
        moe_kwargs(model), num_key_value_heads=model.query_groups,
        head_dim=model.hidden_size // model.num_attention_heads, use_qk_norm=False,
        rope_parameters={"rope_type": "default", "rope_theta": theta,
                         "partial_rotary_factor": 1.0},
    )


def moe_kwargs(model: ModelConfig) -> Dict[str, Any]:
    """The MoE fields GLM-4.5's and DeepSeek-V3's configs share (RMSNorm, SwiGLU, no
    biases, sigmoid routing with e_score_correction_bias)."""
    return dict(
        hidden_act="silu", rms_norm_eps=model.norm_epsilon, attention_bias=False,
        n_routed_experts=model.num_experts, num_experts_per_tok=model.moe_router_topk,
        moe_intermediate_size=model.moe_ffn_size,
        n_shared_experts=model.moe_shared_expert_intermediate_size // model.moe_ffn_size,
        first_k_dense_replace=dense_prefix(model),
        routed_scaling_factor=float(model.moe_router_topk_scaling_factor or 1.0),
        n_group=model.moe_router_num_groups or 1, topk_group=model.moe_router_group_topk or 1,
        norm_topk_prob=model.moe_router_topk > 1,
    )


def legacy_config_keys(arch: Architecture, model: ModelConfig) -> Dict[str, Any]:
    """Keys older transformers releases (4.x) and serving engines read instead of
    ``rope_parameters``: without ``rotary_pct`` they would rotate a quarter of each
    GPT-NeoX head (that class's default); vLLM reads GLM-4.5's top-level
    ``partial_rotary_factor`` (default 0.5)."""
    if arch is DEEPSEEK_V3:
        from mtp_megatron.hf.deepseek_v3 import deepseek_v3_legacy_keys

        return deepseek_v3_legacy_keys(model)
    if arch is GLM4_MOE:
        return {"rope_theta": float(model.rotary_base), "partial_rotary_factor": 1.0}
    if arch is LLAMA:
        return {"rope_theta": float(model.rotary_base)}
    return {"rotary_pct": 1.0, "rotary_emb_base": model.rotary_base}


def _rope(hf_config) -> Dict[str, Any]:
    """rope_parameters (transformers 5) or the older top-level keys."""
    params = dict(getattr(hf_config, "rope_parameters", None) or {})
    params.setdefault("rope_type", "default")
    params.setdefault("rope_theta", getattr(hf_config, "rope_theta",
                                            getattr(hf_config, "rotary_emb_base", 10000)))
    if getattr(hf_config, "rotary_pct", None) is not None:
        params.setdefault("partial_rotary_factor", hf_config.rotary_pct)
    return params


def refuse_key(where: str, key: str, value: Any, need: str) -> HFError:
    return HFError(f"{where}: {key}={value!r} is not supported; this import needs {need}")


def model_values_from_hf(hf_config, where: str = "config.json"
                         ) -> Tuple[Architecture, Dict[str, Any]]:
    """(architecture, our ``model:`` values) for a transformers config, or HFError."""
    arch = BY_MODEL_TYPE.get(getattr(hf_config, "model_type", None))
    if arch is None:
        raise HFError(f"{where}: model_type={getattr(hf_config, 'model_type', None)!r}; "
                      f"supported: {', '.join(sorted(BY_MODEL_TYPE))}")
    rope = _rope(hf_config)
    if arch is DEEPSEEK_V3:
        from mtp_megatron.hf.deepseek_v3 import deepseek_v3_values

        return arch, dict(_common_values(hf_config, rope["rope_theta"]),
                          **deepseek_v3_values(hf_config, rope, where))
    if rope["rope_type"] != "default":
        raise refuse_key(where, "rope_type", rope["rope_type"], "plain RoPE (rope_type default)")
    theta = rope["rope_theta"]
    if float(theta) != int(theta):
        raise refuse_key(where, "rope_theta", theta, "an integer base (--rotary-base)")
    heads, hidden = hf_config.num_attention_heads, hf_config.hidden_size
    head_dim = getattr(hf_config, "head_dim", None) or hidden // heads
    if head_dim * heads != hidden:
        raise refuse_key(where, "head_dim", head_dim, f"hidden_size / num_attention_heads = "
                                                   f"{hidden // heads}")
    values = _common_values(hf_config, theta)
    if arch is GLM4_MOE:
        return arch, dict(values, **_glm4_moe(hf_config, rope, where))
    if arch is LLAMA:
        return arch, dict(values, **_llama(hf_config, where))
    return arch, dict(values, **_gpt_neox(hf_config, rope, where))


def _common_values(hf_config, theta) -> Dict[str, Any]:
    max_pos = hf_config.max_position_embeddings
    return dict(
        num_layers=hf_config.num_hidden_layers, hidden_size=hf_config.hidden_size,
        num_attention_heads=hf_config.num_attention_heads,
        ffn_hidden_size=hf_config.intermediate_size, vocab_size=hf_config.vocab_size,
        max_position_embeddings=max_pos, seq_length=min(max_pos, MAX_IMPORTED_SEQ_LENGTH),
        position_embedding_type="rope", rotary_base=int(theta),
        untie_embeddings_and_output_weights=not getattr(hf_config, "tie_word_embeddings", False),
        init_method_std=hf_config.initializer_range,
        attention_dropout=float(getattr(hf_config, "attention_dropout", 0.0) or 0.0),
        hidden_dropout=float(getattr(hf_config, "hidden_dropout", 0.0) or 0.0),
    )


def _glm4_moe(hf_config, rope: Dict[str, Any], where: str) -> Dict[str, Any]:
    """A GLM-4.5 MoE config as our flags; what megatron-core cannot build is refused."""
    if hf_config.hidden_act != "silu":
        raise refuse_key(where, "hidden_act", hf_config.hidden_act, "silu (SwiGLU)")
    for key, need in (("attention_bias", "False (megatron-core's --disable-bias-linear "
                                         "covers every linear, not q/k/v only)"),
                      ("use_qk_norm", "False")):
        if getattr(hf_config, key, False):
            raise refuse_key(where, key, True, need)
    factor = rope.get("partial_rotary_factor", getattr(hf_config, "partial_rotary_factor", 0.5))
    if factor != 1.0:
        raise refuse_key(where, "partial_rotary_factor", factor, "1.0 (whole heads rotated)")
    return dict(_llama_norms(hf_config), **moe_values(hf_config, where))


def moe_values(hf_config, where: str) -> Dict[str, Any]:
    """GLM-4.5's and DeepSeek-V3's MoE fields as our flags (sigmoid routing with expert
    bias, dense layers first, shared experts); what megatron-core cannot build is refused."""
    topk, groups = hf_config.num_experts_per_tok, hf_config.n_group
    if bool(hf_config.norm_topk_prob) != (topk > 1):
        raise refuse_key(where, "norm_topk_prob", hf_config.norm_topk_prob,
                      f"{topk > 1} with num_experts_per_tok={topk} (megatron-core normalises "
                      "the chosen sigmoid scores exactly when top-k > 1)")
    if groups > 1 and topk != 2 * hf_config.topk_group:
        raise refuse_key(where, "topk_group", hf_config.topk_group,
                      f"num_experts_per_tok / 2 = {topk / 2} (groups scored by their top-2)")
    layers, dense = hf_config.num_hidden_layers, hf_config.first_k_dense_replace
    groups_kw = dict(moe_router_num_groups=groups, moe_router_group_topk=hf_config.topk_group) \
        if groups > 1 else {}
    scaling = float(hf_config.routed_scaling_factor)
    return dict(
        swiglu=True, disable_bias_linear=True,
        num_experts=hf_config.n_routed_experts, moe_router_topk=topk,
        moe_ffn_hidden_size=hf_config.moe_intermediate_size,
        moe_shared_expert_intermediate_size=(
            hf_config.moe_intermediate_size * hf_config.n_shared_experts or None),
        moe_layer_freq=[0] * dense + [1] * (layers - dense),
        moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
        moe_router_topk_scaling_factor=scaling if scaling != 1.0 else None,
        moe_router_load_balancing_type="none", **groups_kw,
    )


def _llama_norms(hf_config) -> Dict[str, Any]:
    groups = hf_config.num_key_value_heads or hf_config.num_attention_heads
    return dict(normalization="RMSNorm", norm_epsilon=hf_config.rms_norm_eps,
                num_query_groups=None if groups == hf_config.num_attention_heads else groups)


def _llama(hf_config, where: str) -> Dict[str, Any]:
    if hf_config.hidden_act != "silu":
        raise refuse_key(where, "hidden_act", hf_config.hidden_act, "silu (SwiGLU, --swiglu)")
    attention_bias, mlp_bias = bool(hf_config.attention_bias), bool(hf_config.mlp_bias)
    if attention_bias != mlp_bias:
        raise HFError(
            f"{where}: attention_bias={attention_bias} but mlp_bias={mlp_bias}; megatron-core's "
            "--disable-bias-linear covers every linear layer, so both must be equal"
        )
    groups = hf_config.num_key_value_heads or hf_config.num_attention_heads
    return dict(
        normalization="RMSNorm", swiglu=True, disable_bias_linear=not attention_bias,
        norm_epsilon=hf_config.rms_norm_eps,
        num_query_groups=None if groups == hf_config.num_attention_heads else groups,
    )


def _gpt_neox(hf_config, rope: Dict[str, Any], where: str) -> Dict[str, Any]:
    if hf_config.hidden_act != "gelu":
        raise refuse_key(where, "hidden_act", hf_config.hidden_act, "gelu (exact, erf-based)")
    if hf_config.use_parallel_residual:
        raise refuse_key(where, "use_parallel_residual", True,
                      "False (megatron-core layers add attention, then the MLP)")
    factor = rope.get("partial_rotary_factor", 1.0)
    if factor != 1.0:
        raise refuse_key(where, "rotary_pct (partial_rotary_factor)", factor,
                      "1.0 (megatron-core here rotates whole heads)")
    if not getattr(hf_config, "attention_bias", True):
        raise refuse_key(where, "attention_bias", False,
                      "True (one --disable-bias-linear for attention and MLP)")
    return dict(normalization="LayerNorm", swiglu=False, disable_bias_linear=False,
                norm_epsilon=hf_config.layer_norm_eps, num_query_groups=None)

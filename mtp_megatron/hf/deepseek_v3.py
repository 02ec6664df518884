"""Our MLA + MoE ``model:`` section <-> DeepSeek-V3's ``config.json`` (``DeepseekV3Config``).

    kwargs = deepseek_v3_kwargs(cfg.model, theta)          # export (hf_config_kwargs)
    values = deepseek_v3_values(hf_config, rope, where)    # import (model_values_from_hf)

====================================================  ========================================
DeepSeek-V3                                            ours
====================================================  ========================================
``q_lora_rank``, ``kv_lora_rank``                      ``--q-lora-rank``, ``--kv-lora-rank``
``qk_nope_head_dim``, ``qk_rope_head_dim``             ``--qk-head-dim``, ``--qk-pos-emb-head-dim``
``v_head_dim``                                         ``--v-head-dim``
``q_a_layernorm``, ``kv_a_layernorm`` (always)         ``--qk-layernorm`` (required)
``rope_interleave: true``                              megatron-core's MLA RoPE (de-interleaves)
``rope_parameters`` yarn: ``factor``, ``mscale``,      ``--rotary-scaling-factor``, ``--mscale``,
``mscale_all_dim``, ``original_max_position_           ``--mscale-all-dim``, ``--yarn-original-max-
embeddings``, ``beta_fast``, ``beta_slow``             position-embeddings``, ``--yarn-beta-*``
MoE fields                                             as GLM-4.5's (``config_map.moe_kwargs``)
====================================================  ========================================

YaRN: megatron-core multiplies cos/sin by ``m(f, mscale) / m(f, mscale_all_dim)`` and the
softmax scale by ``m(f, mscale_all_dim)^2`` (``m(f, a) = 0.1 a ln f + 1``); transformers
does the same when both mscales are set, else ``m(f, 1)`` and no softmax factor, which is
ours only with ``mscale = 1``: other combinations are refused.
"""

from __future__ import annotations

import math
from typing import Any, Dict

from mtp_megatron.config import ModelConfig
from mtp_megatron.hf.architectures import DEEPSEEK_LATENT_NORM_EPS
from mtp_megatron.hf.config_map import moe_kwargs, moe_values, refuse_key


def _yarn(model: ModelConfig) -> bool:
    return model.mla_rope_type == "yarn" and model.rotary_scaling_factor > 1.0


def rope_parameters(model: ModelConfig, theta: float) -> Dict[str, Any]:
    """transformers' ``rope_parameters``: plain RoPE (YaRN with factor 1 is plain) or YaRN."""
    if not _yarn(model):
        return {"rope_type": "default", "rope_theta": theta}
    return {"rope_type": "yarn", "rope_theta": theta, "factor": model.rotary_scaling_factor,
            "original_max_position_embeddings": model.yarn_original_max_position_embeddings,
            "beta_fast": model.yarn_beta_fast, "beta_slow": model.yarn_beta_slow,
            "mscale": model.mscale, "mscale_all_dim": model.mscale_all_dim, "truncate": True}


def deepseek_v3_kwargs(model: ModelConfig, theta: float) -> Dict[str, Any]:
    """``DeepseekV3Config`` fields (``architectures.check_deepseek_v3`` passed)."""
    return dict(
        moe_kwargs(model), num_key_value_heads=model.num_attention_heads,
        q_lora_rank=model.q_lora_rank, kv_lora_rank=model.kv_lora_rank,
        qk_nope_head_dim=model.qk_head_dim, qk_rope_head_dim=model.qk_pos_emb_head_dim,
        v_head_dim=model.v_head_dim, rope_interleave=True,
        rope_parameters=rope_parameters(model, theta),
    )


def deepseek_v3_legacy_keys(model: ModelConfig) -> Dict[str, Any]:
    """``rope_theta`` and DeepSeek-V3's own ``rope_scaling`` (what its published config.json
    holds and serving engines read)."""
    keys: Dict[str, Any] = {"rope_theta": float(model.rotary_base)}
    if _yarn(model):
        params = rope_parameters(model, float(model.rotary_base))
        keys["rope_scaling"] = {"type": "yarn", **{k: params[k] for k in (
            "factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale",
            "mscale_all_dim")}}
    return keys


def _m(scale: float, a: float) -> float:
    return 1.0 if scale <= 1 else 0.1 * a * math.log(scale) + 1.0


def _rope_values(hf_config, rope: Dict[str, Any], where: str) -> Dict[str, Any]:
    if rope["rope_type"] == "default":
        return dict(rope_type="rope")
    if rope["rope_type"] != "yarn":
        raise refuse_key(where, "rope_type", rope["rope_type"], "default or yarn")
    if rope.get("truncate", True) is False:
        raise refuse_key(where, "truncate", False, "True (megatron-core rounds YaRN's range)")
    original = rope["original_max_position_embeddings"]
    factor = float(rope.get("factor") or hf_config.max_position_embeddings / original)
    mscale, all_dim = rope.get("mscale"), rope.get("mscale_all_dim")
    if mscale and all_dim:
        mscale, all_dim = float(mscale), float(all_dim)
    elif not all_dim:
        mscale, all_dim = 1.0, 0.0  # transformers' YaRN: m(f, 1) on cos/sin, nothing else
    else:
        raise refuse_key(where, "mscale", mscale, "a positive value with mscale_all_dim")
    attention_factor = rope.get("attention_factor")
    if attention_factor is not None and \
            abs(attention_factor - _m(factor, mscale) / _m(factor, all_dim)) > 1e-6:
        raise refuse_key(where, "attention_factor", attention_factor,
                         "none, or m(factor, mscale) / m(factor, mscale_all_dim)")
    return dict(rope_type="yarn", rotary_scaling_factor=factor, mscale=mscale,
                mscale_all_dim=all_dim, yarn_original_max_position_embeddings=int(original),
                yarn_beta_fast=float(rope.get("beta_fast") or 32),
                yarn_beta_slow=float(rope.get("beta_slow") or 1))


def deepseek_v3_values(hf_config, rope: Dict[str, Any], where: str) -> Dict[str, Any]:
    """A DeepSeek-V3 config as our flags; what megatron-core cannot build is refused."""
    if hf_config.hidden_act != "silu":
        raise refuse_key(where, "hidden_act", hf_config.hidden_act, "silu (SwiGLU)")
    if getattr(hf_config, "attention_bias", False):
        raise refuse_key(where, "attention_bias", True, "False (--disable-bias-linear)")
    if not getattr(hf_config, "rope_interleave", True):
        raise refuse_key(where, "rope_interleave", False,
                         "True (megatron-core's MLA de-interleaves the rotary channels)")
    heads = hf_config.num_attention_heads
    if (hf_config.num_key_value_heads or heads) != heads:
        raise refuse_key(where, "num_key_value_heads", hf_config.num_key_value_heads,
                         f"num_attention_heads = {heads} (MLA has no key/value groups)")
    if hf_config.rms_norm_eps != DEEPSEEK_LATENT_NORM_EPS:
        raise refuse_key(where, "rms_norm_eps", hf_config.rms_norm_eps,
                         f"{DEEPSEEK_LATENT_NORM_EPS} (transformers' latent norms use it "
                         "whatever rms_norm_eps says; megatron-core uses one epsilon)")
    theta = rope["rope_theta"]
    if float(theta) != int(theta):
        raise refuse_key(where, "rope_theta", theta, "an integer base (--rotary-base)")
    return dict(
        normalization="RMSNorm", norm_epsilon=hf_config.rms_norm_eps, num_query_groups=None,
        multi_latent_attention=True, q_lora_rank=hf_config.q_lora_rank,
        kv_lora_rank=hf_config.kv_lora_rank, qk_head_dim=hf_config.qk_nope_head_dim,
        qk_pos_emb_head_dim=hf_config.qk_rope_head_dim, v_head_dim=hf_config.v_head_dim,
        qk_layernorm=True, **_rope_values(hf_config, rope, where),
        **moe_values(hf_config, where),
    )

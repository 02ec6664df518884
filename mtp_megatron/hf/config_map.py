"""Our ``model:`` section <-> a Hugging Face ``config.json`` (Llama, GPT-NeoX).

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
from mtp_megatron.hf.architectures import BY_MODEL_TYPE, LLAMA, Architecture
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


def legacy_config_keys(arch: Architecture, model: ModelConfig) -> Dict[str, Any]:
    """Keys older transformers releases (4.x) and serving engines read instead of
    ``rope_parameters``: without ``rotary_pct`` they would rotate a quarter of each
    GPT-NeoX head (that class's default)."""
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


def _refuse(where: str, key: str, value: Any, need: str) -> HFError:
    return HFError(f"{where}: {key}={value!r} is not supported; this import needs {need}")


def model_values_from_hf(hf_config, where: str = "config.json"
                         ) -> Tuple[Architecture, Dict[str, Any]]:
    """(architecture, our ``model:`` values) for a transformers config, or HFError."""
    arch = BY_MODEL_TYPE.get(getattr(hf_config, "model_type", None))
    if arch is None:
        raise HFError(f"{where}: model_type={getattr(hf_config, 'model_type', None)!r}; "
                      f"supported: {', '.join(sorted(BY_MODEL_TYPE))}")
    rope = _rope(hf_config)
    if rope["rope_type"] != "default":
        raise _refuse(where, "rope_type", rope["rope_type"], "plain RoPE (rope_type default)")
    theta = rope["rope_theta"]
    if float(theta) != int(theta):
        raise _refuse(where, "rope_theta", theta, "an integer base (--rotary-base)")
    heads, hidden = hf_config.num_attention_heads, hf_config.hidden_size
    head_dim = getattr(hf_config, "head_dim", None) or hidden // heads
    if head_dim * heads != hidden:
        raise _refuse(where, "head_dim", head_dim, f"hidden_size / num_attention_heads = "
                                                   f"{hidden // heads}")
    max_pos = hf_config.max_position_embeddings
    values = dict(
        num_layers=hf_config.num_hidden_layers, hidden_size=hidden, num_attention_heads=heads,
        ffn_hidden_size=hf_config.intermediate_size, vocab_size=hf_config.vocab_size,
        max_position_embeddings=max_pos, seq_length=min(max_pos, MAX_IMPORTED_SEQ_LENGTH),
        position_embedding_type="rope", rotary_base=int(theta),
        untie_embeddings_and_output_weights=not getattr(hf_config, "tie_word_embeddings", False),
        init_method_std=hf_config.initializer_range,
        attention_dropout=float(getattr(hf_config, "attention_dropout", 0.0) or 0.0),
        hidden_dropout=float(getattr(hf_config, "hidden_dropout", 0.0) or 0.0),
    )
    if arch is LLAMA:
        return arch, dict(values, **_llama(hf_config, where))
    return arch, dict(values, **_gpt_neox(hf_config, rope, where))


def _llama(hf_config, where: str) -> Dict[str, Any]:
    if hf_config.hidden_act != "silu":
        raise _refuse(where, "hidden_act", hf_config.hidden_act, "silu (SwiGLU, --swiglu)")
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
        raise _refuse(where, "hidden_act", hf_config.hidden_act, "gelu (exact, erf-based)")
    if hf_config.use_parallel_residual:
        raise _refuse(where, "use_parallel_residual", True,
                      "False (megatron-core layers add attention, then the MLP)")
    factor = rope.get("partial_rotary_factor", 1.0)
    if factor != 1.0:
        raise _refuse(where, "rotary_pct (partial_rotary_factor)", factor,
                      "1.0 (megatron-core here rotates whole heads)")
    if not getattr(hf_config, "attention_bias", True):
        raise _refuse(where, "attention_bias", False,
                      "True (one --disable-bias-linear for attention and MLP)")
    return dict(normalization="LayerNorm", swiglu=False, disable_bias_linear=False,
                norm_epsilon=hf_config.layer_norm_eps, num_query_groups=None)

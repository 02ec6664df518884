"""Multi-latent attention (MLA, DeepSeek-V2/V3) rules: the flags live in ``model:``, their
checks here. Megatron-LM's flags and megatron-core's ``MLATransformerConfig`` fields::

    --multi-latent-attention --q-lora-rank 1536 --kv-lora-rank 512
    --qk-head-dim 128 --qk-pos-emb-head-dim 64 --v-head-dim 128 --qk-layernorm
    --rope-type yarn --rotary-scaling-factor 40 --mscale 1.0 --mscale-all-dim 1.0

Per head, a query is ``[q_nope (qk-head-dim); q_pe (qk-pos-emb-head-dim)]`` from the query
latent (or straight from the hidden state without ``--q-lora-rank``); keys are
``[k_nope; k_pe]`` with ``k_nope`` and the value (``v-head-dim``) expanded from the
key/value latent, and ``k_pe`` one rotary part shared by all heads. RoPE touches only the
``pe`` parts; YaRN (``--rope-type yarn``, megatron-core's MLA default) stretches it by
``--rotary-scaling-factor`` (1: plain RoPE) and scales the softmax by ``mscale(factor,
--mscale-all-dim)^2``.

    check_model_mla(model)            # ModelConfig.__post_init__
    check_parallel_mla(model, par)    # RunConfig: TP against the latent widths, TP needs SP
"""

from __future__ import annotations

from mtp_megatron.config.fields import ConfigError, check_float, check_int

ROPE_TYPES = ("rope", "yarn")
# (field, default): the MLA flags of ``model:`` that mean nothing without
# --multi-latent-attention
MLA_FIELDS = (
    ("q_lora_rank", None), ("kv_lora_rank", 32), ("qk_head_dim", 128),
    ("qk_pos_emb_head_dim", 64), ("v_head_dim", 128), ("qk_layernorm", False),
    ("rope_type", "yarn"),
)
# (field, default): YaRN's settings, which mean nothing with --rope-type rope
YARN_FIELDS = (
    ("rotary_scaling_factor", 1.0), ("mscale", 1.0), ("mscale_all_dim", 0.0),
    ("yarn_original_max_position_embeddings", 4096), ("yarn_beta_fast", 32.0),
    ("yarn_beta_slow", 1.0),
)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_model_mla(model) -> None:
    """The ``model:`` section's MLA rules (``ModelConfig.__post_init__`` calls it)."""
    if not model.multi_latent_attention:
        for name, default in MLA_FIELDS + YARN_FIELDS:
            if getattr(model, name) != default:
                raise ConfigError(_flag(name), getattr(model, name),
                                  "only with --multi-latent-attention",
                                  "the model has standard attention without it")
        return
    check_int("--q-lora-rank", model.q_lora_rank, 1, allow_none=True)
    for name in ("kv_lora_rank", "qk_head_dim", "v_head_dim"):
        check_int(_flag(name), getattr(model, name), 1)
    check_int("--qk-pos-emb-head-dim", model.qk_pos_emb_head_dim, 2)
    if model.qk_pos_emb_head_dim % 2:
        raise ConfigError("--qk-pos-emb-head-dim", model.qk_pos_emb_head_dim,
                          "an even number (RoPE rotates pairs of channels)")
    if model.num_query_groups is not None:
        raise ConfigError("--num-query-groups", model.num_query_groups,
                          "omitted with --multi-latent-attention",
                          "MLA's keys and values come from one shared latent, not groups")
    if model.position_embedding_type != "rope":
        raise ConfigError("--position-embedding-type", model.position_embedding_type,
                          "rope with --multi-latent-attention",
                          "MLA applies its own RoPE/YaRN (--rope-type) to the "
                          "--qk-pos-emb-head-dim part of each head")
    _check_yarn(model)


def _check_yarn(model) -> None:
    check_float("--rotary-scaling-factor", model.rotary_scaling_factor, 1.0)
    check_float("--mscale", model.mscale, 0.0)
    check_float("--mscale-all-dim", model.mscale_all_dim, 0.0)
    check_int("--yarn-original-max-position-embeddings",
              model.yarn_original_max_position_embeddings, 1)
    check_float("--yarn-beta-fast", model.yarn_beta_fast, 0.0)
    check_float("--yarn-beta-slow", model.yarn_beta_slow, 0.0)
    if model.mla_rope_type == "rope":
        for name, default in YARN_FIELDS:
            if getattr(model, name) != default:
                raise ConfigError(_flag(name), getattr(model, name),
                                  "only with --rope-type yarn",
                                  "plain RoPE has no context-extension settings")


def check_parallel_mla(model, par) -> None:
    """TP against the latent widths (``RunConfig`` calls it). The local layers
    (``--transformer-impl local``, the CPU default) split the down projections by columns
    over TP (Transformer Engine's keep them whole on every TP rank) and train correctly
    under TP with sequence parallelism only (``model/mla.py``)."""
    if not model.multi_latent_attention or model.transformer_impl == "transformer_engine":
        return
    tp = par.tensor_model_parallel_size
    if tp > 1 and not par.sequence_parallel:
        raise ConfigError(
            "--tensor-model-parallel-size", tp,
            "1, or add --sequence-parallel with --multi-latent-attention",
            "without it megatron-core's local MLA layers give the shared rotary key "
            "only this TP rank's heads' gradient (model/mla.py)",
        )
    widths = [("--kv-lora-rank", model.kv_lora_rank,
               model.kv_lora_rank + model.qk_pos_emb_head_dim,
               "--kv-lora-rank + --qk-pos-emb-head-dim")]
    if model.q_lora_rank:
        widths.insert(0, ("--q-lora-rank", model.q_lora_rank, model.q_lora_rank,
                          "--q-lora-rank"))
    for flag, value, width, what in widths:
        if width % tp:
            raise ConfigError(
                flag, value, f"a value that makes {what} (now {width}) divisible by "
                f"--tensor-model-parallel-size={tp}",
                "the local layers split the down projection by columns over TP "
                "(--transformer-impl transformer_engine keeps it whole)",
            )

"""Which Hugging Face class a model maps to, and the name tables of each (pure Python).

=====================================  ==========================  ========================
mtp_megatron (megatron-core)            LlamaForCausalLM            GPTNeoXForCausalLM
=====================================  ==========================  ========================
embedding.word_embeddings               model.embed_tokens          gpt_neox.embed_in
decoder.layers.i.input_layernorm        model.layers.i.             gpt_neox.layers.i.
                                        input_layernorm             input_layernorm
...self_attention.linear_qkv            self_attn.{q,k,v}_proj      attention.query_key_value
...self_attention.linear_proj           self_attn.o_proj            attention.dense
...pre_mlp_layernorm                    post_attention_layernorm    post_attention_layernorm
...mlp.linear_fc1                       mlp.{gate,up}_proj          mlp.dense_h_to_4h
...mlp.linear_fc2                       mlp.down_proj               mlp.dense_4h_to_h
decoder.final_layernorm                 model.norm                  gpt_neox.final_layer_norm
output_layer (untied only)              lm_head                     embed_out
=====================================  ==========================  ========================

Which one: RMSNorm + SwiGLU + RoPE -> Llama (``attention_bias = mlp_bias = not
--disable-bias-linear``, GQA through ``num_key_value_heads``); LayerNorm + GELU + RoPE with
biases -> GPT-NeoX (``use_parallel_residual=False``, full rotary); with ``--num-experts`` ->
GLM-4.5's ``Glm4MoeForCausalLM`` (Llama's attention and dense layers, MoE layers in
``hf/moe.py``, the MTP layers in the main weight files as GLM-4.5 and DeepSeek-V3 ship
them); with ``--num-experts`` and ``--multi-latent-attention`` -> ``DeepseekV3ForCausalLM``
(GLM-4.5's MoE and MTP layout, MLA's projections copied as they are: megatron-core and
DeepSeek-V3 lay out each head ``[nope; rope]`` and the key/value latent ``[c_kv; k_pe]``
the same way, and both de-interleave the rotary channels). :func:`for_model` raises
:class:`HFError` naming the flags to change for anything else.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

from mtp_megatron.config import ModelConfig
from mtp_megatron.hf.deps import HFError


@dataclass(frozen=True)
class Rule:
    """One of our modules <-> one or more HF modules (each param: weight, bias if any)."""

    ours: str
    hf: Tuple[str, ...]
    kind: str = "copy"  # copy | qkv (grouped split) | gate_up (SwiGLU split)


@dataclass(frozen=True)
class Architecture:
    """The names of one HF model class."""

    name: str
    hf_class: str
    model_type: str
    embedding: str
    final_norm: str
    output: str
    layer_prefix: str  # HF decoder layer i (and MTP module k at i = num_layers + k)
    layer_rules: Tuple[Rule, ...]
    # MoE architectures (GLM-4.5, DeepSeek-V3): MoE layers in hf/moe.py's names; the MTP
    # layers live in the main weight files with their own embed_tokens and shared_head.head
    # copies (what vLLM's and SGLang's MTP loaders and transformers' MtpModel read)
    moe: bool = False


LLAMA = Architecture(
    name="llama", hf_class="LlamaForCausalLM", model_type="llama",
    embedding="model.embed_tokens", final_norm="model.norm", output="lm_head",
    layer_prefix="model.layers.",
    layer_rules=(
        Rule("input_layernorm", ("input_layernorm",)),
        Rule("self_attention.linear_qkv",
             ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "qkv"),
        Rule("self_attention.linear_proj", ("self_attn.o_proj",)),
        Rule("pre_mlp_layernorm", ("post_attention_layernorm",)),
        Rule("mlp.linear_fc1", ("mlp.gate_proj", "mlp.up_proj"), "gate_up"),
        Rule("mlp.linear_fc2", ("mlp.down_proj",)),
    ),
)

GPT_NEOX = Architecture(
    name="gpt_neox", hf_class="GPTNeoXForCausalLM", model_type="gpt_neox",
    embedding="gpt_neox.embed_in", final_norm="gpt_neox.final_layer_norm", output="embed_out",
    layer_prefix="gpt_neox.layers.",
    layer_rules=(
        Rule("input_layernorm", ("input_layernorm",)),
        # Per head [q, k, v]: megatron-core's grouped layout with one head per group.
        Rule("self_attention.linear_qkv", ("attention.query_key_value",)),
        Rule("self_attention.linear_proj", ("attention.dense",)),
        Rule("pre_mlp_layernorm", ("post_attention_layernorm",)),
        Rule("mlp.linear_fc1", ("mlp.dense_h_to_4h",)),
        Rule("mlp.linear_fc2", ("mlp.dense_4h_to_h",)),
    ),
)

GLM4_MOE = Architecture(
    name="glm4_moe", hf_class="Glm4MoeForCausalLM", model_type="glm4_moe",
    embedding="model.embed_tokens", final_norm="model.norm", output="lm_head",
    layer_prefix="model.layers.", layer_rules=LLAMA.layer_rules, moe=True,
)

DEEPSEEK_V3 = Architecture(
    name="deepseek_v3", hf_class="DeepseekV3ForCausalLM", model_type="deepseek_v3",
    embedding="model.embed_tokens", final_norm="model.norm", output="lm_head",
    layer_prefix="model.layers.",
    layer_rules=(
        Rule("input_layernorm", ("input_layernorm",)),
        Rule("self_attention.linear_q_proj", ("self_attn.q_proj",)),
        Rule("self_attention.linear_q_down_proj", ("self_attn.q_a_proj",)),
        Rule("self_attention.q_layernorm", ("self_attn.q_a_layernorm",)),
        Rule("self_attention.linear_q_up_proj", ("self_attn.q_b_proj",)),
        Rule("self_attention.linear_kv_down_proj", ("self_attn.kv_a_proj_with_mqa",)),
        Rule("self_attention.kv_layernorm", ("self_attn.kv_a_layernorm",)),
        Rule("self_attention.linear_kv_up_proj", ("self_attn.kv_b_proj",)),
        Rule("self_attention.linear_proj", ("self_attn.o_proj",)),
    ) + LLAMA.layer_rules[3:],  # post_attention_layernorm, the dense MLP
    moe=True,
)
# transformers' DeepSeek-V3 latent norms (q_a_layernorm, kv_a_layernorm) have this epsilon
# whatever rms_norm_eps says (vLLM's use rms_norm_eps): the two agree only at this value
DEEPSEEK_LATENT_NORM_EPS = 1e-6

BY_MODEL_TYPE = {arch.model_type: arch for arch in (LLAMA, GPT_NEOX, GLM4_MOE, DEEPSEEK_V3)}


def for_model(model: ModelConfig) -> Architecture:
    """The HF architecture our ``model`` section exports to, or HFError naming the flags."""
    if model.position_embedding_type != "rope":
        raise HFError(
            f"--position-embedding-type={model.position_embedding_type} has no Hugging Face "
            "export here: Llama and GPT-NeoX use rotary embeddings (--position-embedding-type "
            "rope)"
        )
    if model.multi_latent_attention:
        check_deepseek_v3(model)
        return DEEPSEEK_V3
    if model.moe:
        check_glm4_moe(model)
        return GLM4_MOE
    if model.normalization == "RMSNorm" and model.swiglu:
        return LLAMA
    if model.normalization == "LayerNorm" and not model.swiglu:
        if model.disable_bias_linear:
            raise HFError(
                "--normalization LayerNorm with a GELU MLP maps to GPT-NeoX, whose linear "
                "layers have biases: train without --disable-bias-linear (or use the Llama "
                "shape: --normalization RMSNorm --swiglu)"
            )
        if model.query_groups != model.num_attention_heads:
            raise HFError(
                f"--num-query-groups={model.num_query_groups}: GPT-NeoX has no grouped-query "
                "attention; omit --num-query-groups (or use the Llama shape: --normalization "
                "RMSNorm --swiglu)"
            )
        return GPT_NEOX
    if model.normalization == "RMSNorm":
        raise HFError(
            "--normalization RMSNorm without --swiglu matches no Hugging Face class: add "
            "--swiglu (Llama) or use --normalization LayerNorm (GPT-NeoX)"
        )
    raise HFError(
        "--normalization LayerNorm with --swiglu matches no Hugging Face class: use "
        "--normalization RMSNorm (Llama) or drop --swiglu (GPT-NeoX)"
    )


def dense_prefix(model: ModelConfig) -> int:
    """How many leading decoder layers are dense (GLM-4.5's ``first_k_dense_replace``)."""
    layers = model.moe_layers
    return next((i for i, moe in enumerate(layers) if moe), len(layers))


def check_glm4_moe(model: ModelConfig) -> None:
    """What ``Glm4MoeForCausalLM`` cannot express, as HFError naming our flags."""
    def refuse(why: str) -> HFError:
        return HFError(f"no Hugging Face architecture expresses this MoE model: {why}")

    if model.normalization != "RMSNorm" or not model.swiglu:
        raise refuse("GLM-4.5 has RMSNorm and SwiGLU experts (--normalization RMSNorm --swiglu)")
    if not model.disable_bias_linear:
        raise refuse("GLM-4.5's linear layers have no bias (its attention_bias is q/k/v "
                     "only): train with --disable-bias-linear")
    if model.moe_router_score_function != "sigmoid":
        raise refuse(f"--moe-router-score-function {model.moe_router_score_function}: GLM-4.5 "
                     "and DeepSeek-V3 route with sigmoid scores (noaux_tc)")
    first = dense_prefix(model)
    if any(not moe for moe in model.moe_layers[first:]):
        raise refuse(f"--moe-layer-freq {model.moe_layer_freq}: GLM-4.5 has dense layers "
                     "first, then only MoE layers (first_k_dense_replace), e.g. "
                     f"\"[0]*{first}+[1]*{model.num_layers - first}\"")
    shared = model.moe_shared_expert_intermediate_size
    if not shared or shared % model.moe_ffn_size:
        raise refuse(f"--moe-shared-expert-intermediate-size={shared}: GLM-4.5 has "
                     "n_shared_experts shared experts of --moe-ffn-hidden-size="
                     f"{model.moe_ffn_size} each (a positive multiple of it)")
    if model.moe_router_group_topk and model.moe_router_topk != 2 * model.moe_router_group_topk:
        raise refuse(f"--moe-router-topk={model.moe_router_topk} with "
                     f"--moe-router-group-topk={model.moe_router_group_topk}: GLM-4.5 and "
                     "DeepSeek-V3 score a group by its top-2 experts, megatron-core by its "
                     "top (topk / group-topk): they agree only when topk = 2 x group-topk")


def check_deepseek_v3(model: ModelConfig) -> None:
    """What ``DeepseekV3ForCausalLM`` cannot express, as HFError naming our flags: its MoE
    rules are GLM-4.5's (:func:`check_glm4_moe`), then MLA's."""
    def refuse(why: str) -> HFError:
        return HFError(f"no Hugging Face architecture expresses this MLA model: {why}")

    if not model.moe:
        raise refuse("DeepSeek-V3 (the MLA architecture) has MoE layers after its dense "
                     "ones, and its MTP layers are MoE: add --num-experts")
    check_glm4_moe(model)
    if not model.qk_layernorm:
        raise refuse("DeepSeek-V3 normalises the query and key/value latents "
                     "(q_a_layernorm, kv_a_layernorm): train with --qk-layernorm")
    if model.norm_epsilon != DEEPSEEK_LATENT_NORM_EPS:
        raise refuse(f"--norm-epsilon={model.norm_epsilon}: transformers' DeepSeek-V3 latent "
                     f"norms use {DEEPSEEK_LATENT_NORM_EPS} whatever rms_norm_eps says; train "
                     f"with --norm-epsilon {DEEPSEEK_LATENT_NORM_EPS}")
    if model.mla_rope_type == "yarn" and model.rotary_scaling_factor > 1 and \
            model.mscale != 1.0 and not model.mscale_all_dim:
        raise refuse(f"--mscale={model.mscale} with --mscale-all-dim 0: transformers' YaRN "
                     "ignores mscale unless mscale_all_dim is set; use --mscale 1 or a "
                     "positive --mscale-all-dim")

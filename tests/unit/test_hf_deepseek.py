"""MLA + MoE <-> DeepSeek-V3 (DeepseekV3ForCausalLM) names, config and refusals (pure
Python). The trained round trip, transformers' logits and MTP loader are in
tests/functional/test_hf_deepseek.py."""

import pytest
import torch

from mtp_megatron.config import build_config
from mtp_megatron.hf.architectures import DEEPSEEK_V3, for_model
from mtp_megatron.hf.convert import Shape, from_hf, to_hf
from mtp_megatron.hf.deps import HFError
from tests.unit.test_hf_moe import MOE, _random_state

MLA = dict(MOE, multi_latent_attention=True, q_lora_rank=16, kv_lora_rank=8, qk_head_dim=6,
           qk_pos_emb_head_dim=4, v_head_dim=5, qk_layernorm=True, norm_epsilon=1e-6,
           rotary_scaling_factor=4.0, mscale_all_dim=1.0)


def _model(**changes):
    return build_config({}, dict(MLA, **changes), 1).model


def test_an_mla_moe_model_exports_as_deepseek_v3():
    from mtp_megatron.hf.config_map import hf_config_kwargs, legacy_config_keys

    assert for_model(_model()) is DEEPSEEK_V3
    kwargs = hf_config_kwargs(DEEPSEEK_V3, _model(), vocab_size=100)
    assert kwargs["architectures"] == ["DeepseekV3ForCausalLM"]
    assert (kwargs["q_lora_rank"], kwargs["kv_lora_rank"], kwargs["qk_nope_head_dim"],
            kwargs["qk_rope_head_dim"], kwargs["v_head_dim"]) == (16, 8, 6, 4, 5)
    assert kwargs["num_key_value_heads"] == 4 and kwargs["rope_interleave"]
    assert kwargs["rope_parameters"]["rope_type"] == "yarn"
    assert kwargs["rope_parameters"]["factor"] == 4.0
    assert (kwargs["first_k_dense_replace"], kwargs["n_shared_experts"]) == (1, 2)
    assert legacy_config_keys(DEEPSEEK_V3, _model())["rope_scaling"]["mscale_all_dim"] == 1.0
    plain = hf_config_kwargs(DEEPSEEK_V3, _model(rotary_scaling_factor=1.0, mscale_all_dim=0.0),
                             vocab_size=100)
    assert plain["rope_parameters"] == {"rope_type": "default", "rope_theta": 10000.0}


@pytest.mark.parametrize("changes,flag", [
    (dict(qk_layernorm=False), "--qk-layernorm"),
    (dict(norm_epsilon=1e-5), "--norm-epsilon=1e-05"),
    (dict(mscale=0.8, mscale_all_dim=0.0), "--mscale=0.8"),
    (dict(moe_router_score_function="softmax", moe_router_enable_expert_bias=False),
     "--moe-router-score-function softmax"),
])
def test_shapes_deepseek_v3_cannot_express_are_refused_naming_the_flag(changes, flag):
    with pytest.raises(HFError, match="no Hugging Face architecture") as err:
        for_model(_model(**changes))
    assert flag in str(err.value)


def test_a_dense_mla_model_is_refused_naming_num_experts():
    dense = {k: v for k, v in MLA.items() if not k.startswith("moe_") and k != "num_experts"}
    with pytest.raises(HFError, match="--num-experts"):
        for_model(build_config({}, dense, 1).model)


def _mla_state(model, q_latent=True):
    """_random_state's MoE model with MLA attention in place of the fused QKV."""
    state = _random_state(model)
    h, heads = model.hidden_size, model.num_attention_heads
    gen = torch.Generator().manual_seed(1)
    for prefix in [k[: -len("self_attention.linear_qkv.weight")] for k in list(state)
                   if k.endswith("self_attention.linear_qkv.weight")]:
        del state[prefix + "self_attention.linear_qkv.weight"]
        a = prefix + "self_attention."
        if q_latent:
            state[a + "linear_q_down_proj.weight"] = torch.randn(16, h, generator=gen)
            state[a + "q_layernorm.weight"] = torch.randn(16, generator=gen)
            state[a + "linear_q_up_proj.weight"] = torch.randn(heads * 10, 16, generator=gen)
        else:
            state[a + "linear_q_proj.weight"] = torch.randn(heads * 10, h, generator=gen)
        state[a + "linear_kv_down_proj.weight"] = torch.randn(8 + 4, h, generator=gen)
        state[a + "kv_layernorm.weight"] = torch.randn(8, generator=gen)
        state[a + "linear_kv_up_proj.weight"] = torch.randn(heads * 11, 8, generator=gen)
        state[a + "linear_proj.weight"] = torch.randn(h, heads * 5, generator=gen)
    return state


@pytest.mark.parametrize("q_latent", [True, False])
def test_mla_names_round_trip(q_latent):
    model = _model(untie_embeddings_and_output_weights=True,
                   **({} if q_latent else dict(q_lora_rank=None)))
    state = _mla_state(model, q_latent)
    shape = Shape(num_layers=3, heads=4, groups=4, head_dim=8, vocab_size=100, padded_vocab=128,
                  mtp_layers=1, tied=False, experts=4, expert_bias=True)
    main, mtp = to_hf(state, DEEPSEEK_V3, shape)
    a = "model.layers.1.self_attn."
    assert torch.equal(main[a + "kv_a_proj_with_mqa.weight"],
                       state["decoder.layers.1.self_attention.linear_kv_down_proj.weight"])
    assert (a + "q_a_layernorm.weight" in main) == q_latent == (a + "q_proj.weight" not in main)
    assert "model.layers.3.self_attn.kv_b_proj.weight" in mtp  # the MTP layer is MLA too
    back = from_hf({**main, **mtp}, {**main, **mtp}, DEEPSEEK_V3, shape, mtp_from_file=1)
    for key, value in state.items():
        expected = value if value.shape[0] != 128 else value[:100]
        assert torch.equal(back[key][:expected.shape[0]], expected), key
    assert set(back) == set(state)


def test_deepseek_v3_configs_megatron_core_cannot_build_are_refused():
    transformers = pytest.importorskip("transformers")
    from mtp_megatron.hf.config_map import model_values_from_hf

    yarn = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
            "original_max_position_embeddings": 16, "mscale": 0.9, "mscale_all_dim": 0.7}
    base = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=4, q_lora_rank=None,
                kv_lora_rank=8, qk_nope_head_dim=6, qk_rope_head_dim=4, v_head_dim=5,
                n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, n_group=1,
                topk_group=1, first_k_dense_replace=1, rope_parameters=yarn)
    _, values = model_values_from_hf(transformers.DeepseekV3Config(**base))
    assert values["multi_latent_attention"] and values["q_lora_rank"] is None
    assert (values["qk_head_dim"], values["qk_pos_emb_head_dim"], values["v_head_dim"]) == \
        (6, 4, 5)
    assert (values["rotary_scaling_factor"], values["mscale"], values["mscale_all_dim"]) == \
        (4.0, 0.9, 0.7)
    build_config({}, values, 1)  # a valid run
    for change, key in ((dict(rope_interleave=False), "rope_interleave"),
                        (dict(num_key_value_heads=2), "num_key_value_heads"),
                        (dict(rms_norm_eps=1e-5), "rms_norm_eps"),
                        (dict(attention_bias=True), "attention_bias"),
                        (dict(rope_parameters={**yarn, "truncate": False}), "truncate"),
                        (dict(rope_parameters={**yarn, "attention_factor": 2.0}),
                         "attention_factor")):
        with pytest.raises(HFError, match=key):
            model_values_from_hf(transformers.DeepseekV3Config(**{**base, **change}))

"""MoE <-> GLM-4.5 (Glm4MoeForCausalLM) names, config and refusals (pure Python).

The trained round trip, transformers' logits and MTP loader are in
tests/functional/test_hf_moe.py."""

import pytest
import torch

from mtp_megatron.config import build_config
from mtp_megatron.hf.architectures import GLM4_MOE, for_model
from mtp_megatron.hf.convert import Shape, from_hf, to_hf
from mtp_megatron.hf.deps import HFError

MOE = dict(num_layers=3, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64,
           num_experts=4, moe_router_topk=2, moe_ffn_hidden_size=16,
           moe_shared_expert_intermediate_size=32, moe_layer_freq="[0]*1+[1]*2",
           moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
           mtp_num_layers=1)


def _model(**changes):
    return build_config({}, dict(MOE, **changes), 1).model


def test_an_moe_model_exports_as_glm4_moe():
    from mtp_megatron.hf.config_map import hf_config_kwargs

    assert for_model(_model()) is GLM4_MOE
    kwargs = hf_config_kwargs(GLM4_MOE, _model(moe_router_topk_scaling_factor=2.5,
                                               moe_router_num_groups=2,
                                               moe_router_group_topk=1), vocab_size=100)
    assert kwargs["architectures"] == ["Glm4MoeForCausalLM"]
    assert (kwargs["first_k_dense_replace"], kwargs["n_shared_experts"]) == (1, 2)
    assert (kwargs["n_group"], kwargs["topk_group"], kwargs["norm_topk_prob"]) == (2, 1, True)
    assert kwargs["routed_scaling_factor"] == 2.5
    assert kwargs["rope_parameters"]["partial_rotary_factor"] == 1.0


@pytest.mark.parametrize("changes,flag", [
    (dict(moe_router_score_function="softmax", moe_router_enable_expert_bias=False),
     "--moe-router-score-function softmax"),
    (dict(moe_layer_freq=[1, 0, 1]), "--moe-layer-freq"),
    (dict(moe_shared_expert_intermediate_size=None), "--moe-shared-expert-intermediate-size"),
    (dict(moe_shared_expert_intermediate_size=24), "--moe-shared-expert-intermediate-size=24"),
    (dict(moe_router_topk=3, moe_router_num_groups=2, moe_router_group_topk=2),
     "--moe-router-group-topk=2"),
    (dict(disable_bias_linear=False), "--disable-bias-linear"),
])
def test_shapes_no_architecture_expresses_are_refused_naming_the_flag(changes, flag):
    with pytest.raises(HFError, match="no Hugging Face architecture") as err:
        for_model(_model(**changes))
    assert flag in str(err.value)


def _random_state(model):
    """A single-rank MoE state dict with our (local spec, 0.16) names."""
    h, f, e = model.hidden_size, model.moe_ffn_size, model.num_experts
    gen = torch.Generator().manual_seed(0)
    state = {"embedding.word_embeddings.weight": torch.randn(128, h, generator=gen),
             "output_layer.weight": torch.randn(128, h, generator=gen),
             "decoder.final_layernorm.weight": torch.randn(h, generator=gen)}

    def layer(prefix, moe):
        state[f"{prefix}input_layernorm.weight"] = torch.randn(h, generator=gen)
        state[f"{prefix}self_attention.linear_qkv.weight"] = torch.randn(3 * h, h, generator=gen)
        state[f"{prefix}self_attention.linear_proj.weight"] = torch.randn(h, h, generator=gen)
        state[f"{prefix}pre_mlp_layernorm.weight"] = torch.randn(h, generator=gen)
        if not moe:
            state[f"{prefix}mlp.linear_fc1.weight"] = torch.randn(128, h, generator=gen)
            state[f"{prefix}mlp.linear_fc2.weight"] = torch.randn(h, 64, generator=gen)
            return
        state[f"{prefix}mlp.router.weight"] = torch.randn(e, h, generator=gen)
        state[f"{prefix}mlp.router.expert_bias"] = torch.randn(e, generator=gen)
        for i in range(e):
            p = f"{prefix}mlp.experts.local_experts.{i}."
            state[p + "linear_fc1.weight"] = torch.randn(2 * f, h, generator=gen)
            state[p + "linear_fc2.weight"] = torch.randn(h, f, generator=gen)
        state[f"{prefix}mlp.shared_experts.linear_fc1.weight"] = torch.randn(64, h, generator=gen)
        state[f"{prefix}mlp.shared_experts.linear_fc2.weight"] = torch.randn(h, 32, generator=gen)

    for i, moe in enumerate(model.moe_layers):
        layer(f"decoder.layers.{i}.", moe)
    for name in ("enorm", "hnorm", "final_layernorm"):
        state[f"mtp.layers.0.{name}.weight"] = torch.randn(h, generator=gen)
    state["mtp.layers.0.eh_proj.weight"] = torch.randn(h, 2 * h, generator=gen)
    layer("mtp.layers.0.transformer_layer.", True)
    return state


def test_moe_names_round_trip_and_expert_layout():
    model = _model(untie_embeddings_and_output_weights=True)
    state = _random_state(model)
    shape = Shape(num_layers=3, heads=4, groups=4, head_dim=8, vocab_size=100, padded_vocab=128,
                  mtp_layers=1, tied=False, experts=4, expert_bias=True)
    main, mtp = to_hf(state, GLM4_MOE, shape)
    fc1 = state["decoder.layers.2.mlp.experts.local_experts.3.linear_fc1.weight"]
    assert torch.equal(main["model.layers.2.mlp.experts.3.gate_proj.weight"], fc1[:16])
    assert torch.equal(main["model.layers.2.mlp.experts.3.up_proj.weight"], fc1[16:])
    assert torch.equal(main["model.layers.1.mlp.gate.e_score_correction_bias"],
                       state["decoder.layers.1.mlp.router.expert_bias"])
    assert "model.layers.0.mlp.gate_proj.weight" in main  # dense
    assert torch.equal(mtp["model.layers.3.embed_tokens.weight"],
                       state["embedding.word_embeddings.weight"][:100])
    assert torch.equal(mtp["model.layers.3.shared_head.head.weight"],
                       state["output_layer.weight"][:100])
    back = from_hf({**main, **mtp}, {**main, **mtp}, GLM4_MOE, shape, mtp_from_file=1)
    for key, value in state.items():
        expected = value if value.shape[0] != 128 else value[:100]
        assert torch.equal(back[key][:expected.shape[0]], expected), key
    assert set(back) == set(state)


def test_glm4_moe_configs_megatron_core_cannot_build_are_refused():
    transformers = pytest.importorskip("transformers")
    from mtp_megatron.hf.config_map import model_values_from_hf

    base = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2, head_dim=8, n_routed_experts=4,
                num_experts_per_tok=2, moe_intermediate_size=16, n_group=1, topk_group=1,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                 "partial_rotary_factor": 1.0})
    _, values = model_values_from_hf(transformers.Glm4MoeConfig(**base))
    assert values["moe_layer_freq"] == [0, 1, 1] and values["num_experts"] == 4
    for change, key in ((dict(attention_bias=True), "attention_bias"),
                        (dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                               "partial_rotary_factor": 0.5}),
                         "partial_rotary_factor"),
                        (dict(norm_topk_prob=False), "norm_topk_prob"),
                        (dict(n_group=2, topk_group=2), "topk_group")):
        with pytest.raises(HFError, match=key):
            model_values_from_hf(transformers.Glm4MoeConfig(**{**base, **change}))

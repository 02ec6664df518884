"""MoE + MTP to and from Hugging Face: GLM-4.5's ``Glm4MoeForCausalLM``.

A tiny DeepSeek-V3-shaped MoE (first layer dense, sigmoid router with expert bias, group
routing, 2 shared experts, MTP D=1) trains 6 steps with the launcher and is exported:
transformers' ``Glm4MoeForCausalLM`` gives our logits (fp32), transformers' own MTP loader
(``MtpModel.from_pretrained``, which raises on any missing weight) loads the MTP layer from
the exported files and gives our depth-1 logits, and the MTP tensors carry the names and
shapes vLLM's ``Glm4MoeMTP.load_weights`` reads. Then a random tiny Glm4Moe made with
transformers is imported, gives transformers' logits, and trains on with MTP.
"""

import json

import pytest
import torch

pytest.importorskip("transformers")

from safetensors.torch import load_file  # noqa: E402

from tests.hf_models import (  # noqa: E402
    hf_depth1_logits,
    hf_model,
    import_random,
    imported_logits,
    loaded,
    our_depth1_logits,
    our_logits,
    sequences,
    train_and_export,
    trains_on,
)

pytestmark = pytest.mark.functional

TOL = 1e-4
MOE = ["--num-layers", "3", "--hidden-size", "32", "--num-attention-heads", "4",
       "--num-query-groups", "2", "--ffn-hidden-size", "64", "--seq-length", "32",
       "--num-experts", "4", "--moe-router-topk", "2", "--moe-ffn-hidden-size", "16",
       "--moe-shared-expert-intermediate-size", "32", "--moe-layer-freq", "[0]*1+[1]*2",
       "--moe-router-score-function", "sigmoid", "--moe-router-enable-expert-bias",
       "--moe-router-bias-update-rate", "0.01", "--moe-router-num-groups", "2",
       "--moe-router-group-topk", "1", "--moe-router-topk-scaling-factor", "2.5",
       "--moe-router-load-balancing-type", "seq_aux_loss", "--moe-aux-loss-coeff", "1e-3",
       "--untie-embeddings-and-output-weights", "--mtp-num-layers", "1"]
TRAIN = ["--mock-data", "--micro-batch-size", "2", "--global-batch-size", "4",
         "--lr", "3e-3", "--lr-warmup-iters", "1", "--log-interval", "1", "--eval-iters", "0"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    return train_and_export(tmp_path_factory.mktemp("hf_moe"), MOE + TRAIN)


@pytest.fixture(scope="module")
def ours(exported):
    yield from loaded(exported[1])


def test_the_export_is_glm4_moe_with_the_mtp_layer_in_the_main_file(exported):
    config = json.loads((exported[0] / "config.json").read_text())
    assert config["architectures"] == ["Glm4MoeForCausalLM"]
    assert config["num_nextn_predict_layers"] == 1 and config["first_k_dense_replace"] == 1
    assert config["partial_rotary_factor"] == 1.0 and config["n_shared_experts"] == 2
    assert (config["n_group"], config["topk_group"], config["routed_scaling_factor"]) == \
        (2, 1, 2.5)
    assert not (exported[0] / "mtp.safetensors").exists()


def test_the_mtp_tensors_have_the_names_serving_engines_read(exported):
    """vLLM's Glm4MoeMTP.load_weights: model.layers.{L+k}.{enorm, hnorm, eh_proj,
    shared_head.norm, shared_head.head, embed_tokens} and the decoder layer's own names
    (per-expert gate/up/down_proj, mlp.gate.weight + e_score_correction_bias)."""
    tensors = load_file(str(exported[0] / "model.safetensors"))
    p, h, v = "model.layers.3.", 32, 512
    shapes = {
        "enorm.weight": (h,), "hnorm.weight": (h,), "eh_proj.weight": (h, 2 * h),
        "shared_head.norm.weight": (h,), "shared_head.head.weight": (v, h),
        "embed_tokens.weight": (v, h), "input_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (h, h), "self_attn.k_proj.weight": (16, h),
        "self_attn.o_proj.weight": (h, h), "post_attention_layernorm.weight": (h,),
        "mlp.gate.weight": (4, h), "mlp.gate.e_score_correction_bias": (4,),
        "mlp.experts.3.gate_proj.weight": (16, h), "mlp.experts.3.down_proj.weight": (h, 16),
        "mlp.shared_experts.up_proj.weight": (32, h),
    }
    for name, shape in shapes.items():
        assert tuple(tensors[p + name].shape) == shape, name
    assert tensors[p + "mlp.gate.e_score_correction_bias"].dtype == torch.float32
    assert torch.equal(tensors[p + "shared_head.head.weight"], tensors["lm_head.weight"])
    assert "model.layers.0.mlp.gate_proj.weight" in tensors  # the dense first layer


def test_the_expert_biases_are_exported(exported, ours):
    """Each router's aux-loss-free bias is e_score_correction_bias (zeros are legitimate:
    with a large --moe-router-bias-update-rate the bias flips sign step by step)."""
    model, _ = ours
    tensors = load_file(str(exported[0] / "model.safetensors"))
    ours_bias = {n: b for n, b in model.named_buffers() if n.endswith("expert_bias")}
    assert len(ours_bias) == 3
    for name, bias in ours_bias.items():
        layer = 3 if name.startswith("mtp.") else int(name.split(".")[2])
        assert torch.equal(tensors[f"model.layers.{layer}.mlp.gate.e_score_correction_bias"],
                           bias.float()), name
    assert any(b.abs().max() > 0 for b in ours_bias.values())


def test_transformers_gives_our_logits(exported, ours):
    model, _ = ours
    hf = hf_model(exported[0])
    ids = sequences(hf.config.vocab_size, seed=3)
    with torch.no_grad():
        diff = (hf(ids).logits - our_logits(model, ids)[..., :hf.config.vocab_size]).abs().max()
    assert diff.item() < TOL, diff.item()


def test_transformers_mtp_loader_reads_the_mtp_layer_and_gives_our_depth1_logits(
        exported, ours):
    model, _ = ours
    hf = hf_model(exported[0])
    ids = sequences(hf.config.vocab_size, seed=4)[:2]
    expected = hf_depth1_logits(hf, ids)
    got = our_depth1_logits(model, ids)[:, :-1, :hf.config.vocab_size]
    assert (got - expected).abs().max().item() < TOL


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    import transformers

    tmp = tmp_path_factory.mktemp("hf_moe_import")
    torch.manual_seed(0)
    config = transformers.Glm4MoeConfig(
        vocab_size=500, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
        n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
        n_shared_experts=1, first_k_dense_replace=1, n_group=2, topk_group=1,
        routed_scaling_factor=1.5, norm_topk_prob=True, num_nextn_predict_layers=0,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                         "partial_rotary_factor": 1.0}, tie_word_embeddings=False)
    hf = transformers.Glm4MoeForCausalLM(config).eval()
    return tmp, hf, import_random(hf, tmp, "glm")


def test_an_imported_glm4_moe_gives_transformers_logits(imported):
    tmp, hf, result = imported
    assert result.cfg.model.moe_layers == (0, 1, 1)
    assert result.cfg.model.moe_router_enable_expert_bias
    ids = sequences(500, seed=5)
    ours = imported_logits(tmp, ids, 500)
    with torch.no_grad():
        diff = (hf(ids).logits - ours).abs().max().item()
        assert diff < TOL, diff
        for name, buf in hf.named_buffers():  # the biases matter: without them hf differs
            if name.endswith("e_score_correction_bias"):
                buf.zero_()
        assert (hf(ids).logits - ours).abs().max().item() > 100 * TOL


def test_an_imported_glm4_moe_trains_on_with_mtp(imported):
    tmp, _, result = imported
    rows = trains_on(result, tmp, TRAIN)
    assert "expert bias min" in rows[-1]

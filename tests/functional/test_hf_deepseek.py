"""MLA + MoE + MTP to and from Hugging Face: DeepSeek-V3's ``DeepseekV3ForCausalLM``.

A tiny DeepSeek-V3-shaped model (multi-latent attention with a query latent, latent norms
and YaRN x4 with both mscales; first layer dense, sigmoid router with expert bias, group
routing, 2 shared experts, MTP D=1) trains 6 steps with the launcher and is exported:
transformers' ``DeepseekV3ForCausalLM`` gives our logits (fp32) and not with plain RoPE,
transformers' MTP loader (``MtpModel.from_pretrained``, which raises on a missing weight)
reads the MTP layer and gives our depth-1 logits, and the MTP tensors carry the names and
shapes DeepSeek-V3's MTP loaders read. Then a random tiny DeepseekV3 made with transformers
(YaRN, query latent) is imported, gives transformers' logits, and trains on with MTP.
"""

import json

import pytest
import torch

pytest.importorskip("transformers")

from safetensors.torch import load_file  # noqa: E402

from tests.functional.test_hf_moe import MOE, TRAIN  # noqa: E402
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
_GQA = MOE.index("--num-query-groups")
MLA = MOE[:_GQA] + MOE[_GQA + 2:] + ["--init-method-std", "0.1",
    "--multi-latent-attention", "--q-lora-rank", "16", "--kv-lora-rank", "16",
    "--qk-head-dim", "8", "--qk-pos-emb-head-dim", "8", "--v-head-dim", "8", "--qk-layernorm",
    "--norm-epsilon", "1e-6", "--rotary-scaling-factor", "4", "--mscale", "0.9",
    "--mscale-all-dim", "0.7", "--yarn-original-max-position-embeddings", "16"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    return train_and_export(tmp_path_factory.mktemp("hf_dsv3"), MLA + TRAIN)


@pytest.fixture(scope="module")
def ours(exported):
    yield from loaded(exported[1])


def test_the_export_is_deepseek_v3_with_mla_yarn_and_the_mtp_layer(exported):
    config = json.loads((exported[0] / "config.json").read_text())
    assert config["architectures"] == ["DeepseekV3ForCausalLM"]
    assert config["num_nextn_predict_layers"] == 1 and config["first_k_dense_replace"] == 1
    assert (config["q_lora_rank"], config["kv_lora_rank"], config["qk_nope_head_dim"],
            config["qk_rope_head_dim"], config["v_head_dim"]) == (16, 16, 8, 8, 8)
    assert config["rope_interleave"] and config["n_shared_experts"] == 2
    assert config["rope_scaling"] == {
        "type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
        "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 0.9, "mscale_all_dim": 0.7}
    assert not (exported[0] / "mtp.safetensors").exists()


def test_the_mtp_tensors_have_the_names_deepseek_v3_loaders_read(exported):
    """DeepSeek-V3's MTP layer L+k (vLLM's DeepSeekMTP / SGLang's DeepseekV3ForCausalLMNextN):
    enorm, hnorm, eh_proj, shared_head.{norm, head}, embed_tokens, and the decoder layer's
    own MLA + MoE names."""
    tensors = load_file(str(exported[0] / "model.safetensors"))
    p, h, v, heads = "model.layers.3.", 32, 512, 4
    shapes = {
        "enorm.weight": (h,), "hnorm.weight": (h,), "eh_proj.weight": (h, 2 * h),
        "shared_head.norm.weight": (h,), "shared_head.head.weight": (v, h),
        "embed_tokens.weight": (v, h), "input_layernorm.weight": (h,),
        "self_attn.q_a_proj.weight": (16, h), "self_attn.q_a_layernorm.weight": (16,),
        "self_attn.q_b_proj.weight": (heads * 16, 16),
        "self_attn.kv_a_proj_with_mqa.weight": (16 + 8, h),
        "self_attn.kv_a_layernorm.weight": (16,),
        "self_attn.kv_b_proj.weight": (heads * 16, 16), "self_attn.o_proj.weight": (h, 32),
        "post_attention_layernorm.weight": (h,), "mlp.gate.weight": (4, h),
        "mlp.gate.e_score_correction_bias": (4,), "mlp.experts.3.gate_proj.weight": (16, h),
        "mlp.experts.3.down_proj.weight": (h, 16), "mlp.shared_experts.up_proj.weight": (32, h),
    }
    for name, shape in shapes.items():
        assert tuple(tensors[p + name].shape) == shape, name
    assert not any(k.startswith(p + "self_attn.q_proj") for k in tensors)
    assert torch.equal(tensors[p + "shared_head.head.weight"], tensors["lm_head.weight"])


def test_transformers_gives_our_logits_and_yarn_matters(exported, ours):
    model, _ = ours
    hf = hf_model(exported[0])
    vocab = hf.config.vocab_size
    ids = sequences(vocab, seed=3)
    mine = our_logits(model, ids)[..., :vocab]
    with torch.no_grad():
        diff = (hf(ids).logits - mine).abs().max().item()
        plain = hf_model(exported[0], rope_parameters={"rope_type": "default",
                                                  "rope_theta": 10000.0})
        off = (plain(ids).logits - mine).abs().max().item()
    assert diff < TOL, diff  # (measured 7.7e-7 with logits up to 2.3)
    assert off > 100 * TOL, off  # plain RoPE instead of YaRN: 0.71


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

    tmp = tmp_path_factory.mktemp("hf_dsv3_import")
    torch.manual_seed(0)
    config = transformers.DeepseekV3Config(
        vocab_size=500, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=4, q_lora_rank=16, kv_lora_rank=16,
        qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, max_position_embeddings=64,
        n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
        n_shared_experts=1, first_k_dense_replace=1, n_group=2, topk_group=1,
        routed_scaling_factor=1.5, norm_topk_prob=True, num_nextn_predict_layers=0,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0,
                         "original_max_position_embeddings": 16, "mscale": 1.0,
                         "mscale_all_dim": 1.0, "beta_fast": 32, "beta_slow": 1},
        tie_word_embeddings=False)
    hf = transformers.DeepseekV3ForCausalLM(config).eval()
    return tmp, hf, import_random(hf, tmp, "dsv3")


def test_an_imported_deepseek_v3_gives_transformers_logits(imported):
    tmp, hf, result = imported
    m = result.cfg.model
    assert m.multi_latent_attention and m.qk_layernorm and m.moe_layers == (0, 1, 1)
    assert (m.mla_rope_type, m.rotary_scaling_factor) == ("yarn", 2.0)
    ids = sequences(500, seed=5)
    ours = imported_logits(tmp, ids, 500)
    with torch.no_grad():
        diff = (hf(ids).logits - ours).abs().max().item()
    assert diff < TOL, diff


def test_an_imported_deepseek_v3_trains_on_with_mtp(imported):
    tmp, _, result = imported
    trains_on(result, tmp, TRAIN)


def test_kv_cached_and_speculative_decoding_of_the_mla_model_match_full_recompute(ours):
    """Generation (python -m mtp_megatron.generate) with MLA: megatron-core's MLA computes
    its own rotary embedding, so the runner passes none; the KV-cached greedy tokens equal a
    full forward per token, and MTP self-speculative decoding equals greedy."""
    from mtp_megatron.inference import KVCachedRunner, generate, generate_batch

    model, _ = ours
    runner = KVCachedRunner(model, 500)
    prompt = [5, 17, 200, 33, 9, 12]
    greedy = generate(runner, prompt, max_new_tokens=12).tokens
    seq = list(prompt)
    for _ in range(12):
        seq.append(int(our_logits(model, torch.tensor([seq]))[0, -1, :500].argmax()))
    assert greedy == seq[len(prompt):]
    assert generate(runner, prompt, max_new_tokens=12, draft_depth=1).tokens == greedy
    with pytest.raises(ValueError, match="one row at a time"):  # RoPE by cache column
        generate_batch(runner, [prompt, prompt[:3]], max_new_tokens=2)

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

from tests.functional.launcher import launch  # noqa: E402
from tests.functional.test_hf_moe import MOE, TRAIN  # noqa: E402
from tests.hf_models import our_logits, sequences  # noqa: E402

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
    from mtp_megatron.hf.export import export

    tmp = tmp_path_factory.mktemp("hf_dsv3")
    run = launch(MLA + TRAIN + ["--train-iters", "6", "--save", str(tmp / "ck")],
                 output_dir=str(tmp / "run"))
    assert run.returncode == 0, run
    export(str(tmp / "ck"), str(tmp / "out"))
    return tmp / "out", str(tmp / "ck")


@pytest.fixture(scope="module")
def ours(exported):
    from mtp_megatron.inference.loading import load_for_generation, single_rank

    with single_rank(seed=1) as device:
        model, cfg, _ = load_for_generation(exported[1], device)
        yield model, cfg


def _hf(path, **changes):
    import transformers

    config = transformers.AutoConfig.from_pretrained(str(path), **changes)
    return transformers.AutoModelForCausalLM.from_pretrained(str(path), config=config).eval()


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
    hf = _hf(exported[0])
    vocab = hf.config.vocab_size
    ids = sequences(vocab, seed=3)
    mine = our_logits(model, ids)[..., :vocab]
    with torch.no_grad():
        diff = (hf(ids).logits - mine).abs().max().item()
        plain = _hf(exported[0], rope_parameters={"rope_type": "default",
                                                  "rope_theta": 10000.0})
        off = (plain(ids).logits - mine).abs().max().item()
    assert diff < TOL, diff  # (measured 7.7e-7 with logits up to 2.3)
    assert off > 100 * TOL, off  # plain RoPE instead of YaRN: 0.71


def test_transformers_mtp_loader_reads_the_mtp_layer_and_gives_our_depth1_logits(
        exported, ours):
    from transformers.modeling_layers import MtpModel

    model, _ = ours
    hf = _hf(exported[0])
    L = hf.config.num_hidden_layers
    hf._keys_to_ignore_on_load_unexpected = [rf"model\.layers\.{L}.*"]  # (61 published)
    mtp = MtpModel.from_pretrained(hf).eval()  # raises if any MTP weight is missing
    ids = sequences(hf.config.vocab_size, seed=4)[:2]
    s = ids.size(1) - 1
    pos = torch.arange(ids.size(1)).expand_as(ids)
    with torch.no_grad():
        hidden = hf.model(ids).last_hidden_state[:, :-1]
        positions = torch.arange(s).unsqueeze(0)
        mask = torch.full((s, s), float("-inf")).triu(1)[None, None]
        out = mtp.layers[0](mtp.embed_tokens(ids[:, 1:]), hidden,
                            position_embeddings=hf.model.rotary_emb(hidden, positions),
                            attention_mask=mask, position_ids=positions, past_key_values=None)
        expected = mtp._project_to_logits(out)
        main = model.decoder(hidden_states=model.embedding(input_ids=ids, position_ids=pos),
                             attention_mask=None, rotary_pos_emb=None)
        depth1 = model.mtp(input_ids=ids, position_ids=pos, hidden_states=main,
                           attention_mask=None, rotary_pos_emb=None,
                           embedding=model.embedding).chunk(2)[1]
        got = model.output_layer(depth1)[0].transpose(0, 1)[:, :-1, :hf.config.vocab_size]
    assert (got - expected).abs().max().item() < TOL


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    import transformers

    from mtp_megatron.hf.importer import import_hf

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
    with torch.no_grad():
        for name, buf in hf.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(torch.randn_like(buf) * 0.05)
        for name, param in hf.named_parameters():
            if "norm" in name:
                param.add_(torch.randn_like(param) * 0.1)
    hf.save_pretrained(str(tmp / "dsv3"))
    result = import_hf(str(tmp / "dsv3"), str(tmp / "ck"), mtp_num_layers=1)
    return tmp, hf, result


def test_an_imported_deepseek_v3_gives_transformers_logits(imported):
    from mtp_megatron.inference.loading import load_for_generation, single_rank

    tmp, hf, result = imported
    m = result.cfg.model
    assert m.multi_latent_attention and m.qk_layernorm and m.moe_layers == (0, 1, 1)
    assert (m.mla_rope_type, m.rotary_scaling_factor) == ("yarn", 2.0)
    ids = sequences(500, seed=5)
    with single_rank(seed=1) as device:
        model, _, _ = load_for_generation(str(tmp / "ck"), device)
        ours = our_logits(model, ids)[..., :500]
    with torch.no_grad():
        diff = (hf(ids).logits - ours).abs().max().item()
    assert diff < TOL, diff


def test_an_imported_deepseek_v3_trains_on_with_mtp(imported):
    tmp, _, result = imported
    run = launch(result.flags + TRAIN + ["--seq-length", "32", "--train-iters", "8",
                                         "--lr", "1e-2"], output_dir=str(tmp / "train"))
    assert run.returncode == 0, run
    rows = run.metrics()
    assert rows[-1]["lm loss"] < rows[0]["lm loss"] and rows[-1]["mtp_1 loss"] < rows[0][
        "mtp_1 loss"]


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

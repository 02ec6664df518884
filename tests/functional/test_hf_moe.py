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

from tests.functional.launcher import launch  # noqa: E402
from tests.hf_models import our_logits, sequences  # noqa: E402

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
    from mtp_megatron.hf.export import export

    tmp = tmp_path_factory.mktemp("hf_moe")
    run = launch(MOE + TRAIN + ["--train-iters", "6", "--save", str(tmp / "ck")],
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


def _hf(path):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(str(path)).eval()


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
    hf = _hf(exported[0])
    ids = sequences(hf.config.vocab_size, seed=3)
    with torch.no_grad():
        diff = (hf(ids).logits - our_logits(model, ids)[..., :hf.config.vocab_size]).abs().max()
    assert diff.item() < TOL, diff.item()


def _our_depth1_logits(model, ids):
    pos = torch.arange(ids.size(1)).expand_as(ids)
    rope = model.rotary_pos_emb(ids.size(1))
    with torch.no_grad():
        main = model.decoder(hidden_states=model.embedding(input_ids=ids, position_ids=pos),
                             attention_mask=None, rotary_pos_emb=rope)
        depth1 = model.mtp(input_ids=ids, position_ids=pos, hidden_states=main,
                           attention_mask=None, rotary_pos_emb=rope,
                           embedding=model.embedding).chunk(2)[1]
        logits, _ = model.output_layer(depth1)
    return logits.transpose(0, 1)


def test_transformers_mtp_loader_reads_the_mtp_layer_and_gives_our_depth1_logits(
        exported, ours):
    from transformers.modeling_layers import MtpModel

    model, _ = ours
    hf = _hf(exported[0])
    L = hf.config.num_hidden_layers
    # transformers finds MTP weights by the layer numbers of the published GLM-4.5 sizes
    # (46, 92); ours has 3 layers: point its heuristic at layer 3, the names are the same
    hf._keys_to_ignore_on_load_unexpected = [rf"model\.layers\.{L}.*"]
    mtp = MtpModel.from_pretrained(hf).eval()  # raises if any MTP weight is missing
    layer = mtp.layers[0]
    ids = sequences(hf.config.vocab_size, seed=4)[:2]
    s = ids.size(1) - 1
    with torch.no_grad():
        hidden = hf.model(ids).last_hidden_state[:, :-1]
        positions = torch.arange(s).unsqueeze(0)
        mask = torch.full((s, s), float("-inf")).triu(1)[None, None]
        out = layer(mtp.embed_tokens(ids[:, 1:]), hidden,
                    position_embeddings=hf.model.rotary_emb(hidden, positions),
                    attention_mask=mask, position_ids=positions, past_key_values=None)
        expected = mtp._project_to_logits(out)
    got = _our_depth1_logits(model, ids)[:, :-1, :hf.config.vocab_size]
    assert (got - expected).abs().max().item() < TOL


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    import transformers

    from mtp_megatron.hf.importer import import_hf

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
    with torch.no_grad():
        for name, buf in hf.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(torch.randn_like(buf) * 0.05)
        for name, param in hf.named_parameters():
            if "norm" in name:
                param.add_(torch.randn_like(param) * 0.1)
    hf.save_pretrained(str(tmp / "glm"))
    result = import_hf(str(tmp / "glm"), str(tmp / "ck"), mtp_num_layers=1)
    return tmp, hf, result


def test_an_imported_glm4_moe_gives_transformers_logits(imported):
    from mtp_megatron.inference.loading import load_for_generation, single_rank

    tmp, hf, result = imported
    assert result.cfg.model.moe_layers == (0, 1, 1)
    assert result.cfg.model.moe_router_enable_expert_bias
    ids = sequences(500, seed=5)
    with single_rank(seed=1) as device:
        model, _, _ = load_for_generation(str(tmp / "ck"), device)
        ours = our_logits(model, ids)[..., :500]
    with torch.no_grad():
        diff = (hf(ids).logits - ours).abs().max().item()
        assert diff < TOL, diff
        for name, buf in hf.named_buffers():  # the biases matter: without them hf differs
            if name.endswith("e_score_correction_bias"):
                buf.zero_()
        assert (hf(ids).logits - ours).abs().max().item() > 100 * TOL


def test_an_imported_glm4_moe_trains_on_with_mtp(imported):
    tmp, _, result = imported
    run = launch(result.flags + TRAIN + ["--seq-length", "32", "--train-iters", "8",
                                         "--lr", "1e-2"], output_dir=str(tmp / "train"))
    assert run.returncode == 0, run
    rows = run.metrics()
    assert rows[-1]["lm loss"] < rows[0]["lm loss"] and rows[-1]["mtp_1 loss"] < rows[0][
        "mtp_1 loss"]
    assert "expert bias min" in rows[-1]

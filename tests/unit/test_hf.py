"""Hugging Face import/export on tiny random transformers models, in this process.

Import -> our model: logits equal transformers' (fp32, 1e-4); export -> transformers:
logits equal ours, loads with no missing/unexpected keys, MTP tensors under the documented
names; import -> export is bit-exact (MTP modules too, through a second import).
"""

import json
import os
import sys

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

# Saving a checkpoint starts dist_checkpointing worker processes.
pytestmark = pytest.mark.multirank

from safetensors.torch import load_file  # noqa: E402

from mtp_megatron.checkpoint import CheckpointError, TrainState, load_checkpoint  # noqa: E402
from mtp_megatron.config import CheckpointConfig, ModelConfig  # noqa: E402
from mtp_megatron.hf import cli  # noqa: E402
from mtp_megatron.hf.architectures import for_model  # noqa: E402
from mtp_megatron.hf.config_map import model_values_from_hf  # noqa: E402
from mtp_megatron.hf.deps import HFError  # noqa: E402
from mtp_megatron.hf.export import export  # noqa: E402
from mtp_megatron.hf.fused import merge_qkv, split_qkv  # noqa: E402
from mtp_megatron.hf.importer import import_hf  # noqa: E402
from mtp_megatron.inference.loading import load_for_generation, single_rank  # noqa: E402
from tests.hf_models import VARIANTS, build_tiny, our_logits, save_tiny, sequences  # noqa: E402

TOL = 1e-4
MTP_NAMES = {  # module 0 of a 2-layer model: HF layer index 2
    "llama": ["enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight",
              "input_layernorm.weight", "self_attn.q_proj.weight", "self_attn.k_proj.weight",
              "self_attn.v_proj.weight", "self_attn.o_proj.weight",
              "post_attention_layernorm.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
              "mlp.down_proj.weight"],
    "gpt_neox": ["enorm.weight", "enorm.bias", "hnorm.weight", "hnorm.bias", "eh_proj.weight",
                 "shared_head.norm.weight", "shared_head.norm.bias", "input_layernorm.weight",
                 "attention.query_key_value.weight", "attention.dense.weight",
                 "post_attention_layernorm.weight", "mlp.dense_h_to_4h.weight",
                 "mlp.dense_4h_to_h.weight"],
}
PREFIX = {"llama": "model.layers.2.", "gpt_neox": "gpt_neox.layers.2."}


@pytest.fixture(scope="module")
def device():
    with single_rank(seed=1234) as dev:
        yield dev


def _weights(directory, pattern="model"):
    out = {}
    for name in sorted(os.listdir(directory)):
        if name.startswith(pattern) and name.endswith(".safetensors"):
            out.update(load_file(os.path.join(directory, name)))
    return out


def test_grouped_qkv_layout():
    """megatron-core's rows per group [q.., k, v] <-> HF q (heads in order), k, v."""
    # 4 query heads in 2 groups, head_dim 1: rows q0 q1 k0 v0 q2 q3 k1 v1
    fused = torch.tensor([[10.], [11.], [20.], [30.], [12.], [13.], [21.], [31.]])
    q, k, v = split_qkv(fused, heads=4, groups=2, head_dim=1)
    assert q.flatten().tolist() == [10, 11, 12, 13]
    assert k.flatten().tolist() == [20, 21] and v.flatten().tolist() == [30, 31]
    assert torch.equal(merge_qkv(q, k, v, heads=4, groups=2, head_dim=1), fused)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_import_export_logits_and_round_trip(name, device, tmp_path):
    kind = VARIANTS[name][0]
    hf_model = build_tiny(name)
    source = save_tiny(name, tmp_path)
    vocab = hf_model.config.vocab_size
    ids = sequences(vocab)
    with torch.no_grad():
        expected = hf_model(ids).logits
    init = "last-layer" if kind == "llama" else "random"
    import_hf(source, str(tmp_path / "ck"), mtp_num_layers=1, mtp_init=init)
    ours_model, cfg, _ = load_for_generation(str(tmp_path / "ck"), device)
    ours = our_logits(ours_model, ids)
    assert ours.shape[-1] >= vocab
    diff_in = (ours[..., :vocab] - expected).abs().max().item()
    assert diff_in < TOL, diff_in

    out = str(tmp_path / "out")
    export(str(tmp_path / "ck"), out, max_shard_bytes=40_000)  # several shards
    assert os.path.isfile(os.path.join(out, "model.safetensors.index.json"))
    loaded, info = __import__("transformers").AutoModelForCausalLM.from_pretrained(
        out, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    with torch.no_grad():
        diff_out = (loaded.eval()(ids).logits - ours[..., :vocab]).abs().max().item()
    assert diff_out < TOL, diff_out
    print(f"{name}: import {diff_in:.2e}, export {diff_out:.2e}")

    original, exported = _weights(source), _weights(out)
    assert original.keys() == exported.keys()
    for key in original:
        assert torch.equal(original[key], exported[key]), key
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["num_nextn_predict_layers"] == 1
    assert config["architectures"] == [type(hf_model).__name__]
    mtp = load_file(os.path.join(out, "mtp.safetensors"))
    for suffix in MTP_NAMES[kind]:
        assert PREFIX[kind] + suffix in mtp, suffix
    untied = not hf_model.config.tie_word_embeddings
    assert (PREFIX[kind] + "shared_head.head.weight" in mtp) == untied
    if init == "last-layer":
        last = PREFIX[kind].replace(".2.", ".1.")
        assert torch.equal(mtp[PREFIX[kind] + "self_attn.q_proj.weight"],
                           original[last + "self_attn.q_proj.weight"])

    # The export again, imported: its MTP module is taken from mtp.safetensors, bit-exact.
    import_hf(out, str(tmp_path / "ck2"), mtp_num_layers=1)
    export(str(tmp_path / "ck2"), str(tmp_path / "out2"))
    again = load_file(str(tmp_path / "out2" / "mtp.safetensors"))
    assert again.keys() == mtp.keys()
    for key in mtp:
        assert torch.equal(mtp[key], again[key]), key
    assert _weights(str(tmp_path / "out2")).keys() == original.keys()


def test_imported_checkpoint_needs_finetune(device, tmp_path):
    source = save_tiny("llama_mha_tied", tmp_path)
    result = import_hf(source, str(tmp_path / "ck"), mtp_num_layers=1)
    model, _, _ = load_for_generation(str(tmp_path / "ck"), device)
    cfg = result.cfg
    state = TrainState([model], None, None, cfg)
    with pytest.raises(CheckpointError, match="--finetune"):
        load_checkpoint(state, str(tmp_path / "ck"), checkpoint=CheckpointConfig())
    assert result.flags[:5] == ["--config", result.config_path, "--load",
                                str(tmp_path / "ck"), "--finetune"]


@pytest.mark.parametrize("model,flag", [
    (dict(normalization="LayerNorm", swiglu=True), "--swiglu"),
    (dict(normalization="RMSNorm", swiglu=False), "--swiglu"),
    (dict(normalization="LayerNorm", swiglu=False, disable_bias_linear=True),
     "--disable-bias-linear"),
    (dict(normalization="LayerNorm", swiglu=False, disable_bias_linear=False,
          num_query_groups=2), "--num-query-groups"),
    (dict(swiglu=True, position_embedding_type="learned_absolute"),
     "--position-embedding-type"),
])
def test_export_refuses_shapes_without_a_class(model, flag):
    with pytest.raises(HFError, match=flag):
        for_model(ModelConfig(**model))


@pytest.mark.parametrize("name,overrides,match", [
    ("gpt_neox", dict(use_parallel_residual=True), "use_parallel_residual"),
    ("gpt_neox", dict(rotary_pct=0.25), "rotary_pct"),
    ("llama_mha_tied", dict(hidden_act="gelu"), "hidden_act"),
    ("llama_mha_tied", dict(attention_bias=True), "mlp_bias"),
])
def test_import_refuses_unsupported_configs(name, overrides, match):
    import transformers

    kind, extra = VARIANTS[name]
    cls = transformers.LlamaConfig if kind == "llama" else transformers.GPTNeoXConfig
    with pytest.raises(HFError, match=match):
        model_values_from_hf(cls(**{**extra, **overrides}))


@pytest.mark.parametrize("argv", [["import", "--hf", "x", "--save", "y"],
                                  ["export", "--load", "x", "--out", "y"]])
def test_cli_without_the_hf_extra(argv, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import raises ImportError
    monkeypatch.setitem(sys.modules, "safetensors", None)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "pip install" in err and "mtp_megatron[hf]" in err and "Traceback" not in err


def test_cli_import_errors_name_the_directory(tmp_path, capsys):
    assert cli.main(["import", "--hf", str(tmp_path), "--save", str(tmp_path / "ck")]) == 2
    assert "no config.json" in capsys.readouterr().err


def test_a_repeated_mtp_layer_is_exported_as_one_module_per_depth(tmp_path):
    """--mtp-use-repeated-layer keeps one MTP layer; the HF layout has one per depth."""
    from mtp_megatron.config import build_config
    from mtp_megatron.hf.export import _one_layer_per_depth

    cfg = build_config(None, {"mtp_num_layers": 3, "mtp_use_repeated_layer": True,
                              "output_dir": str(tmp_path)}, 1)
    state = {"mtp.layers.0.eh_proj.weight": torch.ones(2),
             "mtp.layers.0.transformer_layer.mlp.linear_fc1.weight": torch.zeros(3),
             "decoder.final_layernorm.weight": torch.ones(1)}
    out = _one_layer_per_depth(dict(state), cfg)
    for k in (1, 2):
        assert out[f"mtp.layers.{k}.eh_proj.weight"] is state["mtp.layers.0.eh_proj.weight"]
        assert f"mtp.layers.{k}.transformer_layer.mlp.linear_fc1.weight" in out
    assert len(out) == 3 * 2 + 1
    plain = build_config(None, {"mtp_num_layers": 3, "output_dir": str(tmp_path)}, 1)
    assert _one_layer_per_depth(dict(state), plain) == state

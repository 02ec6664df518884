"""Import a tiny Llama, add MTP (D=1), train 20 iterations with TP=2 (torchrun), export.

The exported directory loads in transformers with the logits of our checkpoint; the MTP
module, rebuilt from ``mtp.safetensors`` out of transformers' own Llama modules by the
formula in docs/hf.md, gives our MTP logits; speculative decoding equals greedy.
"""

import random

import pytest
import torch

pytest.importorskip("transformers")

from safetensors.torch import load_file  # noqa: E402

from tests.functional.launcher import launch  # noqa: E402
from tests.hf_models import our_logits, save_tiny, sequences  # noqa: E402

pytestmark = pytest.mark.functional

TOL = 1e-4
TRAIN = ["--mock-data", "--seq-length", "32", "--micro-batch-size", "2",
         "--global-batch-size", "8", "--lr", "3e-3", "--lr-warmup-iters", "2",
         "--log-interval", "1", "--train-iters", "20", "--eval-iters", "0",
         "--tensor-model-parallel-size", "2"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(exported dir, trained checkpoint, metrics) shared by the tests below."""
    from mtp_megatron.hf.export import export
    from mtp_megatron.hf.importer import import_hf

    tmp = tmp_path_factory.mktemp("hf_train")
    source = save_tiny("llama_gqa_untied", tmp)
    result = import_hf(source, str(tmp / "imported"), mtp_num_layers=1)
    run = launch(result.flags + TRAIN + ["--save", str(tmp / "trained")],
                 output_dir=str(tmp / "run"), nproc=2)
    assert run.returncode == 0, run
    export(str(tmp / "trained"), str(tmp / "out"))
    return tmp / "out", str(tmp / "trained"), run.metrics()


@pytest.fixture(scope="module")
def ours(trained):
    from mtp_megatron.inference.loading import load_for_generation, single_rank

    with single_rank(seed=1) as device:
        model, cfg, tokenizer = load_for_generation(trained[1], device)
        yield model, cfg


def test_training_the_imported_model_lowers_the_losses(trained):
    rows = trained[2]
    assert [r["iteration"] for r in rows] == list(range(1, 21))
    assert rows[-1]["lm loss"] < rows[0]["lm loss"] - 0.3, (rows[0], rows[-1])
    assert rows[-1]["mtp_1 loss"] < rows[0]["mtp_1 loss"] - 0.3


def test_export_of_the_trained_model_matches_ours(trained, ours):
    import transformers

    model, _ = ours
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(trained[0])).eval()
    ids = sequences(hf.config.vocab_size, seed=3)
    with torch.no_grad():
        diff = (hf(ids).logits - our_logits(model, ids)[..., :hf.config.vocab_size]).abs().max()
    assert diff.item() < TOL, diff.item()


def test_mtp_module_from_its_documented_names(trained, ours):
    """h' = shared_head.norm(layer(eh_proj(cat(enorm(emb(t[i+1])), hnorm(h[i]))))), h the
    main model's output after its final norm; logits = lm_head (shared_head.head) of h'."""
    import transformers
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRMSNorm

    model, _ = ours
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(trained[0])).eval()
    config = hf.config
    mtp = load_file(str(trained[0] / "mtp.safetensors"))
    prefix = f"model.layers.{config.num_hidden_layers}."
    own = {k[len(prefix):]: v for k, v in mtp.items()}
    h = config.hidden_size
    enorm, hnorm, norm = (LlamaRMSNorm(h, config.rms_norm_eps) for _ in range(3))
    enorm.weight.data, hnorm.weight.data = own["enorm.weight"], own["hnorm.weight"]
    norm.weight.data = own["shared_head.norm.weight"]
    eh_proj = torch.nn.Linear(2 * h, h, bias=False)
    eh_proj.weight.data = own["eh_proj.weight"]
    layer = LlamaDecoderLayer(config, config.num_hidden_layers).eval()
    layer.load_state_dict({k: v for k, v in own.items() if k.split(".")[0] in
                           ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")})
    assert torch.equal(own["shared_head.head.weight"], hf.lm_head.weight)

    ids = sequences(config.vocab_size, seed=4)[:2]
    s = ids.size(1) - 1
    with torch.no_grad():
        hidden = hf.model(ids).last_hidden_state[:, :-1]
        x = eh_proj(torch.cat([enorm(hf.model.embed_tokens(ids[:, 1:])), hnorm(hidden)], -1))
        positions = torch.arange(s).unsqueeze(0)
        mask = torch.full((s, s), float("-inf")).triu(1)[None, None]
        out = layer(x, attention_mask=mask, position_ids=positions,
                    position_embeddings=hf.model.rotary_emb(x, positions))
        out = out[0] if isinstance(out, tuple) else out
        expected = hf.lm_head(norm(out))

        pos = torch.arange(ids.size(1)).expand_as(ids)
        rope = model.rotary_pos_emb(ids.size(1))
        main = model.decoder(hidden_states=model.embedding(input_ids=ids, position_ids=pos),
                             attention_mask=None, rotary_pos_emb=rope)
        depth1 = model.mtp(input_ids=ids, position_ids=pos, hidden_states=main,
                           attention_mask=None, rotary_pos_emb=rope,
                           embedding=model.embedding).chunk(2)[1]
        got, _ = model.output_layer(depth1)
    got = got.transpose(0, 1)[:, :-1, :config.vocab_size]
    assert (got - expected).abs().max().item() < TOL


def test_speculative_decoding_equals_greedy(ours):
    from mtp_megatron.inference import KVCachedRunner, generate

    model, cfg = ours
    runner = KVCachedRunner(model, cfg.model.vocab_size)
    rng = random.Random(0)
    for _ in range(6):
        prompt = [rng.randrange(cfg.model.vocab_size) for _ in range(rng.randint(1, 10))]
        greedy = generate(runner, prompt, max_new_tokens=12)
        spec = generate(runner, prompt, max_new_tokens=12, draft_depth=1)
        assert spec.tokens == greedy.tokens, prompt

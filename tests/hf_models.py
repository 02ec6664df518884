"""Tiny random transformers models built locally (no download) and logits helpers.

    hf_dir = save_tiny("llama_gqa_untied", tmp_path)      # LlamaForCausalLM dir
    ours = our_logits(model, ids)                         # [b, s, vocab] from our GPTModel
"""

from __future__ import annotations

import torch

VARIANTS = {
    # GQA (2 kv heads for 4), biases, untied, rope_theta != 10000, eps != 1e-5, a vocabulary
    # that our model pads (500 -> 512).
    "llama_gqa_untied": ("llama", dict(num_key_value_heads=2, attention_bias=True,
                                       mlp_bias=True, tie_word_embeddings=False,
                                       rms_norm_eps=1e-6, vocab_size=500,
                                       rope_parameters={"rope_type": "default",
                                                        "rope_theta": 500000.0})),
    # MHA, no biases, tied embeddings.
    "llama_mha_tied": ("llama", dict(num_key_value_heads=4, attention_bias=False,
                                     mlp_bias=False, tie_word_embeddings=True, vocab_size=384)),
    "gpt_neox": ("gpt_neox", dict(use_parallel_residual=False, rotary_pct=1.0,
                                  tie_word_embeddings=False, vocab_size=500)),
}


def build_tiny(name: str, seed: int = 0, **overrides):
    """A random tiny model; norms and biases perturbed so that mixing them up shows."""
    import transformers

    kind, extra = VARIANTS[name]
    common = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=64)
    torch.manual_seed(seed)
    if kind == "llama":
        cfg = transformers.LlamaConfig(intermediate_size=160, **common, **{**extra, **overrides})
        model = transformers.LlamaForCausalLM(cfg)
    else:
        cfg = transformers.GPTNeoXConfig(intermediate_size=256, **common,
                                         **{**extra, **overrides})
        model = transformers.GPTNeoXForCausalLM(cfg)
    with torch.no_grad():
        for key, param in model.named_parameters():
            if "norm" in key or key.endswith("bias"):
                param.add_(torch.randn_like(param) * 0.1)
    return model.eval()


def save_tiny(name: str, directory, **overrides) -> str:
    path = str(directory / name)
    build_tiny(name, **overrides).save_pretrained(path)
    return path


def our_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """Main-model logits [b, s, padded vocab] of our GPTModel (no labels, no MTP)."""
    positions = torch.arange(ids.size(1)).expand_as(ids)
    with torch.no_grad():
        embedded = model.embedding(input_ids=ids, position_ids=positions)
        rope = None if model.config.multi_latent_attention else model.rotary_pos_emb(ids.size(1))
        hidden = model.decoder(hidden_states=embedded, attention_mask=None, rotary_pos_emb=rope)
        weight = (model.shared_embedding_or_output_weight()
                  if model.share_embeddings_and_output_weights else None)
        logits, _ = model.output_layer(hidden, weight=weight)
    return logits.transpose(0, 1)


def sequences(vocab: int, seed: int = 0) -> torch.Tensor:
    """Four sequences of 24 tokens (incl. the highest ids)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (4, 24), generator=gen)
    ids[0, :3] = vocab - 1
    return ids


# -- MoE exports and imports (tests/functional/test_hf_moe.py, test_hf_deepseek.py) -------

def train_and_export(tmp, flags):
    """Train ``flags`` 6 steps with the launcher, save to ``tmp/ck``, export to ``tmp/out``;
    returns (export directory, checkpoint directory)."""
    from mtp_megatron.hf.export import export
    from tests.functional.launcher import launch

    run = launch(flags + ["--train-iters", "6", "--save", str(tmp / "ck")],
                 output_dir=str(tmp / "run"))
    assert run.returncode == 0, run
    export(str(tmp / "ck"), str(tmp / "out"))
    return tmp / "out", str(tmp / "ck")


def loaded(checkpoint: str):
    """(model, cfg) of ``checkpoint`` on one rank, for a module fixture to yield."""
    from mtp_megatron.inference.loading import load_for_generation, single_rank

    with single_rank(seed=1) as device:
        model, cfg, _ = load_for_generation(checkpoint, device)
        yield model, cfg


def hf_model(path, **changes):
    """transformers' model of an exported directory (``changes``: config overrides)."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(str(path), **changes)
    return transformers.AutoModelForCausalLM.from_pretrained(str(path), config=config).eval()


def hf_depth1_logits(hf, ids: torch.Tensor) -> torch.Tensor:
    """Depth-1 MTP logits [b, s-1, V] from transformers' own MTP loader (``MtpModel``,
    which raises on any missing weight) over the exported layer ``L``."""
    from transformers.modeling_layers import MtpModel

    # transformers finds MTP weights by the layer numbers of the published sizes; ours has
    # L layers: point its heuristic at layer L, the names are the same
    hf._keys_to_ignore_on_load_unexpected = [rf"model\.layers\.{hf.config.num_hidden_layers}.*"]
    mtp = MtpModel.from_pretrained(hf).eval()
    s = ids.size(1) - 1
    with torch.no_grad():
        hidden = hf.model(ids).last_hidden_state[:, :-1]
        positions = torch.arange(s).unsqueeze(0)
        mask = torch.full((s, s), float("-inf")).triu(1)[None, None]
        out = mtp.layers[0](mtp.embed_tokens(ids[:, 1:]), hidden,
                            position_embeddings=hf.model.rotary_emb(hidden, positions),
                            attention_mask=mask, position_ids=positions, past_key_values=None)
        return mtp._project_to_logits(out)


def our_depth1_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """Depth-1 MTP logits [b, s, padded vocab] of our GPTModel."""
    pos = torch.arange(ids.size(1)).expand_as(ids)
    rope = None if model.config.multi_latent_attention else model.rotary_pos_emb(ids.size(1))
    with torch.no_grad():
        main = model.decoder(hidden_states=model.embedding(input_ids=ids, position_ids=pos),
                             attention_mask=None, rotary_pos_emb=rope)
        depth1 = model.mtp(input_ids=ids, position_ids=pos, hidden_states=main,
                           attention_mask=None, rotary_pos_emb=rope,
                           embedding=model.embedding).chunk(2)[1]
        logits, _ = model.output_layer(depth1)
    return logits.transpose(0, 1)


def import_random(hf, tmp, name: str):
    """Perturb a random transformers MoE model (expert biases and norms, so they matter),
    save it to ``tmp/name`` and import it with one fresh MTP layer into ``tmp/ck``."""
    from mtp_megatron.hf.importer import import_hf

    with torch.no_grad():
        for buffer_name, buf in hf.named_buffers():
            if buffer_name.endswith("e_score_correction_bias"):
                buf.copy_(torch.randn_like(buf) * 0.05)
        for param_name, param in hf.named_parameters():
            if "norm" in param_name:
                param.add_(torch.randn_like(param) * 0.1)
    hf.save_pretrained(str(tmp / name))
    return import_hf(str(tmp / name), str(tmp / "ck"), mtp_num_layers=1)


def imported_logits(tmp, ids: torch.Tensor, vocab: int) -> torch.Tensor:
    """Our main-model logits of the imported checkpoint ``tmp/ck``."""
    from mtp_megatron.inference.loading import load_for_generation, single_rank

    with single_rank(seed=1) as device:
        model, _, _ = load_for_generation(str(tmp / "ck"), device)
        return our_logits(model, ids)[..., :vocab]


def trains_on(result, tmp, train_flags):
    """Train an imported checkpoint 8 steps; returns its metrics rows (loss must fall)."""
    from tests.functional.launcher import launch

    run = launch(result.flags + train_flags + ["--seq-length", "32", "--train-iters", "8",
                                               "--lr", "1e-2"], output_dir=str(tmp / "train"))
    assert run.returncode == 0, run
    rows = run.metrics()
    assert rows[-1]["lm loss"] < rows[0]["lm loss"]
    assert rows[-1]["mtp_1 loss"] < rows[0]["mtp_1 loss"]
    return rows

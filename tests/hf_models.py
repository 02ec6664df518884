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

"""Tiny CPU models for the decoding tests, built and trained in the test process.

* a random one (drafts rarely match);
* one trained for a few seconds on "count up" sequences (t, t+1, t+2, ...), where every
  MTP depth learns its offset, so drafts match and the bookkeeping has known answers.

    with single_rank(seed=1234):
        model = build_for_generation(tiny_config(), VOCAB, device)
        train_count_up(model)
"""

from __future__ import annotations

import random
from typing import List

import torch
from megatron.core.transformer.multi_token_prediction import MTPLossAutoScaler

from mtp_megatron.config import build_config
from mtp_megatron.runtime import mcore_compat

VOCAB = 256  # padded vocabulary of the tiny models
TEXT_VOCAB = 250  # ids the runner may emit
EOD = 249


def tiny_config(mtp_layers=2):
    return build_config({
        "model": {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
                  "seq_length": 32, "make_vocab_size_divisible_by": 128},
        "mtp": {"mtp_num_layers": mtp_layers, "mtp_loss_scaling_factor": 1.0},
    })


def count_up(generator, batch=16, length=33):
    starts = torch.randint(0, EOD, (batch, 1), generator=generator)
    return (starts + torch.arange(length)) % EOD


def train_count_up(model, steps=90):
    """A short plain-torch loop over the lm + MTP loss (megatron-core's forward)."""
    model.train()
    MTPLossAutoScaler.set_loss_scale(torch.tensor(1.0))
    opt = torch.optim.Adam(model.parameters(), lr=4e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        seq = count_up(gen)
        tokens, labels = seq[:, :-1], seq[:, 1:]
        positions = torch.arange(tokens.size(1)).expand_as(tokens)
        loss = model(tokens, positions, None, labels=labels,
                     loss_mask=torch.ones_like(labels, dtype=torch.float)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    mtp_losses = (mcore_compat.take_mtp_sums().loss / steps).tolist()
    mcore_compat.reset_mtp_tracker()
    return loss.item(), mtp_losses


def random_prompts(seed, count, max_len=12) -> List[List[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(EOD) for _ in range(rng.randint(1, max_len))] for _ in range(count)]


def full_logits(model, seq: List[int]) -> torch.Tensor:
    """The main model's logits [len(seq), padded vocab] without any cache."""
    with torch.no_grad():
        ids = torch.tensor([seq])
        positions = torch.arange(len(seq)).unsqueeze(0)
        hidden = model.decoder(hidden_states=model.embedding(ids, positions),
                               attention_mask=None, rotary_pos_emb=model.rotary_pos_emb(len(seq)))
        logits, _ = model.output_layer(hidden, weight=model.shared_embedding_or_output_weight())
    return logits[:, 0].float()


def reference_greedy(model, prompt, steps, vocab=TEXT_VOCAB):
    """Greedy decoding without any cache: a full forward of the sequence per token."""
    seq = list(prompt)
    for _ in range(steps):
        seq.append(int(full_logits(model, seq)[-1, :vocab].argmax()))
    return seq[len(prompt):]


def with_noisy_heads(model, build, sigma=0.05, seed=0):
    """A copy of ``model`` (from ``build()``) whose MTP weights get Gaussian noise: on the
    count-up model its drafts are then right often but not always (about 0.8 and 0.6
    acceptance at depths 1 and 2 for sigma 0.05)."""
    copy = build()
    copy.load_state_dict(model.state_dict())
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in copy.named_parameters():
            if name.startswith("mtp."):
                param.add_(sigma * torch.randn(param.shape, generator=gen))
    return copy.eval()

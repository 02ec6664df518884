"""KV-cached forwards of a megatron-core GPTModel and of each of its MTP depths, for a
batch of sequences of different lengths.

Generation drives the model's own modules piece by piece instead of calling
``GPTModel.forward`` (whose MTP post-processing needs labels in megatron-core 0.16.1):

    main stack:   embedding -> decoder (TransformerBlock, final norm included) -> output_layer
    MTP depth k:  MultiTokenPredictionLayer._proj_and_transformer_layer(
                      hidden of depth k-1, embedding(token k ahead)) -> output_layer

Each stack (the decoder, and each MTP depth's transformer layer) keeps its keys and
values in its own :class:`~mtp_megatron.inference.cache.RowCache` (a megatron-core
``StaticInferenceContext`` with per-row positions). A forward takes, per row, the new
tokens after that row's cached ones (rows may feed different counts: they are padded);
attention follows the rows' positions under an explicit mask, so each row computes
exactly what it would alone. Rolling a row back is forgetting its last positions.
Single rank (TP = PP = 1).

    runner = KVCachedRunner(model, vocab_size)
    runner.reset(batch_size=2, max_length=64)
    hidden = runner.main([[5, 6, 7], [9]])       # [3, 2, h]; row 1 uses hidden[:1, 1]
    runner.truncate(0, [2, 1])                    # row 0 forgets position 2
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from megatron.core.models.gpt.gpt_model import GPTModel

from mtp_megatron.inference.cache import UNUSED, RowCache
from mtp_megatron.runtime import mcore_compat


def check_batch_size(batch_size: int, multi_latent_attention: bool) -> None:
    """Rows decoded together: any number, but one with multi-latent attention
    (megatron-core's MLA applies RoPE by cache column, which a batch's rows do not share)."""
    if multi_latent_attention and batch_size > 1:
        raise ValueError(f"--batch-size {batch_size}: a --multi-latent-attention checkpoint "
                         "decodes one row at a time (--batch-size 1): megatron-core's MLA "
                         "applies RoPE by cache column, which a batch's rows do not share")


class KVCachedRunner:
    """Forwards over new positions of the main model and of the MTP depths, with caches."""

    def __init__(self, model: GPTModel, vocab_size: int):
        if not (model.pre_process and model.post_process):
            raise ValueError("generation needs the whole model on one rank (TP = PP = 1)")
        self.model = model.eval()
        self.vocab_size = vocab_size  # the tokenizer's; logits past it are padding
        self.num_mtp_layers = model.config.mtp_num_layers or 0 if model.mtp_process else 0
        self.device = next(model.parameters()).device
        self.max_length = 0
        self._rope_length = 0
        self._rope: Optional[torch.Tensor] = None
        self._caches: List[RowCache] = []

    def reset(self, max_length: int, batch_size: int = 1, max_columns: int = 0) -> None:
        """Empty caches for ``batch_size`` rows of up to ``max_length`` positions each
        (``max_columns``: cache columns, ``max_length`` by default; holes left by rows
        that advance unevenly need more, or compaction)."""
        self.max_length = max_length
        mla = self.model.config.multi_latent_attention
        check_batch_size(batch_size, mla)
        if self.model.position_embedding_type == "rope" and not mla \
                and self._rope_length < max_length:  # (MLA ropes its own, by column)
            self._rope = self.model.rotary_pos_emb(max_length)
            self._rope_length = max_length
        columns = max(max_columns, max_length)
        self._caches = [RowCache(batch_size, columns, self.device, self._rope)
                        for _ in range(1 + self.num_mtp_layers)]

    @property
    def batch_size(self) -> int:
        return self._caches[0].batch

    def cached(self, depth: int) -> List[int]:
        """Positions cached per row in ``depth``'s stack (0: the main stack)."""
        return self._caches[depth].lengths()

    def truncate(self, depth: int, lengths: Sequence[int]) -> None:
        """Keep the first ``lengths[r]`` positions of row ``r`` in ``depth``'s stack."""
        self._caches[depth].truncate(lengths)

    def keep_rows(self, rows: Sequence[int]) -> None:
        """Keep only ``rows`` of the batch in every stack (finished sequences leave)."""
        for cache in self._caches:
            cache.keep_rows(rows)

    def _padded(self, tokens: Sequence[Sequence[int]]) -> torch.Tensor:
        width = max(len(t) for t in tokens)
        rows = [list(t) + [0] * (width - len(t)) for t in tokens]
        return torch.tensor(rows, dtype=torch.long, device=self.device)

    def _embed(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """[w, batch, h] embeddings; padding gets position 0 (its output is never used)."""
        positions = torch.where(positions >= UNUSED, 0, positions)
        return self.model.embedding(input_ids=ids, position_ids=positions)

    def _check_room(self, cache: RowCache, counts: Sequence[int]) -> None:
        longest = max(n + c for n, c in zip(cache.lengths(), counts))
        if longest > self.max_length:
            raise ValueError(f"positions up to {longest} exceed the cache of "
                             f"{self.max_length}; reset() with a larger max_length")

    @torch.no_grad()
    def main(self, tokens: Sequence[Sequence[int]]) -> torch.Tensor:
        """Decoder hidden states [w, batch, h] of each row's new ``tokens`` (row ``r``'s
        are ``[:len(tokens[r]), r]``), appended after the row's cached positions."""
        cache = self._caches[0]
        counts = [len(t) for t in tokens]
        self._check_room(cache, counts)
        ids = self._padded(tokens)
        positions = cache.append(counts, ids.size(1))
        hidden = self.model.decoder(
            hidden_states=self._embed(ids, positions),
            attention_mask=cache.mask(positions),
            inference_context=cache.ctx,
            rotary_pos_emb=cache.rope(),
        )
        cache.advance(ids.size(1))
        return hidden

    @torch.no_grad()
    def mtp(self, depth: int, hidden: torch.Tensor,
            tokens: Sequence[Sequence[int]]) -> torch.Tensor:
        """Depth ``depth`` (1-based) over each row's new positions after its cached ones.

        ``hidden``: depth ``depth - 1`` hidden states at those positions [w, batch, h];
        ``tokens``: per row, the token ``depth`` places ahead of each position (what
        training's ``roll_tensor`` of the input ids gives). Returns depth ``depth``'s
        hidden states [w, batch, h].
        """
        cache = self._caches[depth]
        counts = [len(t) for t in tokens]
        self._check_room(cache, counts)
        ids = self._padded(tokens)
        positions = cache.append(counts, ids.size(1))
        layer = mcore_compat.mtp_layer_for_depth(self.model.mtp, depth)
        out = layer._proj_and_transformer_layer(
            hidden_states=hidden,
            decoder_input=self._embed(ids, torch.where(positions >= UNUSED, positions,
                                                       positions + depth)),
            attention_mask=cache.mask(positions),
            rotary_pos_emb=cache.rope(),
            inference_params=cache.ctx,
        )
        cache.advance(ids.size(1))
        return out

    @torch.no_grad()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Shared output head over [s, b, h] -> [s, b, vocab] (padding columns dropped)."""
        weight = None
        if self.model.share_embeddings_and_output_weights:
            weight = self.model.shared_embedding_or_output_weight()
        logits, _ = self.model.output_layer(hidden, weight=weight, runtime_gather_output=True)
        return logits[..., : self.vocab_size].float()

    def argmax(self, hidden: torch.Tensor) -> List[int]:
        """Greedy tokens of one row's hidden states [s, 1, h]."""
        return self.logits(hidden)[:, 0].argmax(dim=-1).tolist()

"""KV-cached forwards of a megatron-core GPTModel and of each of its MTP depths.

Generation drives the model's own modules piece by piece instead of calling
``GPTModel.forward`` (whose MTP post-processing needs labels in megatron-core 0.16.1):

    main stack:   embedding -> decoder (TransformerBlock, final norm included) -> output_layer
    MTP depth k:  MultiTokenPredictionLayer._proj_and_transformer_layer(
                      hidden of depth k-1, embedding(token k ahead)) -> output_layer

Each stack (the decoder, and each MTP depth's transformer layer) keeps its keys and
values in its own megatron-core ``StaticInferenceContext``. A forward of ``s`` new
positions starting at ``start`` writes cache rows ``[start, start + s)`` and attends to
``[0, start + s)`` under an explicit causal mask; rolling a stack back to ``length``
rows is setting its offset, the stale rows are overwritten by the next write.
Single rank (TP = PP = 1), batch size 1.
"""

from __future__ import annotations

from typing import List, Optional

import torch
from megatron.core.inference.contexts import StaticInferenceContext
from megatron.core.models.gpt.gpt_model import GPTModel

from mtp_megatron.runtime import mcore_compat


def causal_mask(start: int, length: int, device: torch.device) -> torch.Tensor:
    """[1, 1, length, start + length] boolean mask, True where a query must not look."""
    query = torch.arange(start, start + length, device=device).unsqueeze(1)
    key = torch.arange(start + length, device=device).unsqueeze(0)
    return (key > query).view(1, 1, length, start + length)


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
        self._rope: Optional[torch.Tensor] = None
        self._contexts: List[StaticInferenceContext] = []

    def reset(self, max_length: int) -> None:
        """Empty caches sized for ``max_length`` positions (main stack + every depth)."""
        if max_length != self.max_length or not self._contexts:
            self.max_length = max_length
            self._contexts = [StaticInferenceContext(1, max_length)
                              for _ in range(1 + self.num_mtp_layers)]
            self._rope = None
            if self.model.position_embedding_type == "rope" and \
                    not self.model.config.multi_latent_attention:  # (MLA ropes its own)
                self._rope = self.model.rotary_pos_emb(max_length)
        for ctx in self._contexts:
            ctx.reset()

    def cached(self, depth: int) -> int:
        """Rows in the cache of ``depth`` (0: the main stack)."""
        return self._contexts[depth].sequence_len_offset

    def truncate(self, depth: int, length: int) -> None:
        """Keep the first ``length`` cache rows of ``depth``."""
        ctx = self._contexts[depth]
        if length > ctx.sequence_len_offset:
            raise ValueError(f"cannot truncate depth {depth} from {ctx.sequence_len_offset} "
                             f"up to {length} rows")
        ctx.sequence_len_offset = length

    def _embed(self, tokens: List[int], start: int) -> torch.Tensor:
        ids = torch.tensor([tokens], dtype=torch.long, device=self.device)
        positions = torch.arange(start, start + len(tokens), device=self.device).unsqueeze(0)
        return self.model.embedding(input_ids=ids, position_ids=positions)  # [s, 1, h]

    def _check_room(self, start: int, length: int) -> None:
        if start + length > self.max_length:
            raise ValueError(f"positions up to {start + length} exceed the cache of "
                             f"{self.max_length}; reset() with a larger max_length")

    @torch.no_grad()
    def main(self, tokens: List[int]) -> torch.Tensor:
        """Decoder hidden states [s, 1, h] of ``tokens`` appended after the cached rows."""
        ctx = self._contexts[0]
        start = ctx.sequence_len_offset
        self._check_room(start, len(tokens))
        hidden = self.model.decoder(
            hidden_states=self._embed(tokens, start),
            attention_mask=causal_mask(start, len(tokens), self.device),
            inference_context=ctx,
            rotary_pos_emb=self._rope,
        )
        ctx.sequence_len_offset = start + len(tokens)
        return hidden

    @torch.no_grad()
    def mtp(self, depth: int, hidden: torch.Tensor, tokens: List[int]) -> torch.Tensor:
        """Depth ``depth`` (1-based) over new positions after its cached rows.

        ``hidden``: depth ``depth - 1`` hidden states at those positions [s, 1, h];
        ``tokens``: the token ``depth`` places ahead of each position (what training's
        ``roll_tensor`` of the input ids gives). Returns depth ``depth``'s hidden states.
        """
        ctx = self._contexts[depth]
        start = ctx.sequence_len_offset
        self._check_room(start, len(tokens))
        layer = mcore_compat.mtp_layer_for_depth(self.model.mtp, depth)
        out = layer._proj_and_transformer_layer(
            hidden_states=hidden,
            decoder_input=self._embed(tokens, start + depth),
            attention_mask=causal_mask(start, len(tokens), self.device),
            rotary_pos_emb=self._rope,
            inference_params=ctx,
        )
        ctx.sequence_len_offset = start + len(tokens)
        return out

    @torch.no_grad()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Shared output head over [s, 1, h] -> [s, vocab] (padding columns dropped)."""
        weight = None
        if self.model.share_embeddings_and_output_weights:
            weight = self.model.shared_embedding_or_output_weight()
        logits, _ = self.model.output_layer(hidden, weight=weight, runtime_gather_output=True)
        return logits[:, 0, : self.vocab_size].float()

    def argmax(self, hidden: torch.Tensor) -> List[int]:
        return self.logits(hidden).argmax(dim=-1).tolist()

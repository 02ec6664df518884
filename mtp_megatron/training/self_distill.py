"""The acceptance stage: train the MTP layers on what the main model itself predicts.

Speculative decoding keeps a draft only if it is what the main model would emit, so the
heads should learn the main model, not the data (FastMTP, arXiv 2509.18362). Continue
from a trained checkpoint with the main model frozen (``--freeze-main-model``, see
``model/builder.py::freeze_main_model``) and these targets (``--mtp-self-distill``)::

    torchrun --nproc-per-node 2 launch/pretrain_gpt_mtp.py --mtp-num-layers 2 \\
        --load runs/x/checkpoints --finetune --save runs/x-heads/checkpoints \\
        --freeze-main-model --mtp-self-distill greedy --train-iters 200 --lr 1e-3

Depth ``k`` at position ``j`` predicts the token ``k + 1`` ahead; the main model's own
prediction of that token (teacher-forced on the data prefix) is its output at position
``j + k``. ``greedy`` trains depth ``k`` with cross entropy on that argmax (what greedy
verification accepts); ``kl`` with ``KL(p_T || q)``, ``p_T`` the main model's softmax at
``--mtp-self-distill-temperature`` (what speculative sampling accepts in proportion to).
Each depth's loss is a masked mean over its positions, weighted ``factor / D`` as
megatron-core weighs its MTP losses (times the depth's ``--mtp-depth-weights``
multiplier, with the factor of the iteration when it is scheduled), and reaches the MTP
layers through megatron-core's ``MTPLossAutoScaler``; the MTP outputs megatron-core then scores
against the data are detached, so its own MTP loss is logged (``mtp_k loss``,
``mtp_k acceptance``: against the data) but trains nothing.

Installed as two forward hooks on the chunk that holds the MTP block (any TP/PP layout:
logits are gathered over TP), nothing in megatron-core is patched::

    distill = SelfDistill.install(model_chunks, mtp=cfg.mtp, vocab_size=258)
    ... training steps ...
    distill.flush()   # {"distill_1 loss": ..., "distill_1 agreement": ...}, every rank

``distill_k agreement`` is the fraction of positions where depth ``k``'s argmax is the
main model's argmax: the acceptance of draft ``k`` under greedy verification, given
the earlier tokens right.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.transformer.multi_token_prediction import MTPLossAutoScaler

from mtp_megatron.config import MTPConfig
from mtp_megatron.runtime import comm
from mtp_megatron.runtime.wrapped import innermost
from mtp_megatron.training.mtp_weighting import depth_multipliers


def depth_loss(student: torch.Tensor, teacher: torch.Tensor, loss_mask: torch.Tensor,
               depth: int, *, mode: str, temperature: float = 1.0, vocab_size: int
               ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Depth ``depth``'s self-distillation loss against the main model.

    ``student``: the depth's logits [s, b, V]; ``teacher``: the main model's [s, b, V]
    (no gradient); ``loss_mask`` [b, s] of the data (position ``j``'s token is scored).
    Returns (masked mean loss, positions where the argmaxes agree, positions scored).
    """
    seq = student.size(0)
    target = teacher[depth:, :, :vocab_size].float()  # the main model at j + depth
    mine = student[: seq - depth].float()
    mask = loss_mask[:, depth:].t().float()  # [s - depth, b]
    best = target.argmax(dim=-1)
    if mode == "greedy":
        loss = F.cross_entropy(mine.flatten(0, 1), best.flatten(), reduction="none")
    else:
        log_p = torch.log_softmax(target / temperature, dim=-1)
        log_q = torch.log_softmax(mine, dim=-1)[..., :vocab_size]
        loss = (log_p.exp() * (log_p - log_q)).sum(dim=-1).flatten()
    loss = (loss.view_as(mask) * mask).sum() / mask.sum().clamp(min=1)
    agree = ((mine[..., :vocab_size].argmax(dim=-1) == best).float() * mask).sum()
    return loss, agree.detach(), mask.sum()


class SelfDistill:
    """The hooks on one model chunk (the one with the MTP block) and their metrics."""

    def __init__(self, model, *, mtp: MTPConfig, vocab_size: int):
        self.model = model
        self.mode = mtp.mtp_self_distill
        self.temperature = mtp.mtp_self_distill_temperature
        self.depth = mtp.mtp_num_layers
        # D * w_k per depth (--mtp-depth-weights), like megatron-core's own terms get
        self.multipliers = depth_multipliers(mtp) or (1.0,) * self.depth
        self.vocab_size = vocab_size
        device = next(model.parameters()).device
        self.sums = torch.zeros(3, self.depth, device=device)  # loss, agreed, positions
        self.microbatches = 0
        self._loss_mask: Optional[torch.Tensor] = None
        model.register_forward_pre_hook(self._remember_mask, with_kwargs=True)
        model.mtp.register_forward_hook(self._distill)

    @classmethod
    def install(cls, chunks: List[torch.nn.Module], *, mtp: MTPConfig,
                vocab_size: int) -> Optional["SelfDistill"]:
        """Hooks on this rank's MTP chunk when ``--mtp-self-distill`` is set, else None
        (also None on ranks without the MTP block)."""
        if not mtp.mtp_self_distill:
            return None
        for chunk in chunks:
            gpt = innermost(chunk)
            if getattr(gpt, "mtp_process", False):
                return cls(gpt, mtp=mtp, vocab_size=vocab_size)
        return _NoMTP()

    def _remember_mask(self, module, args, kwargs):
        self._loss_mask = kwargs.get("loss_mask")

    def _output_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        weight = None
        if self.model.share_embeddings_and_output_weights:
            weight = self.model.shared_embedding_or_output_weight()
        logits, _ = self.model.output_layer(hidden, weight=weight, runtime_gather_output=True)
        return logits

    def _distill(self, module, args, output: torch.Tensor):
        """The MTP block's output ``[main; depth 1; ...; depth D]`` (stacked on the
        sequence dimension): attach the self-distillation loss, detach the depths."""
        if not (module.training and torch.is_grad_enabled()):
            return None
        chunks = torch.chunk(output, 1 + self.depth, dim=0)
        with torch.no_grad():
            teacher = self._output_logits(chunks[0])
        mask = self._loss_mask
        if mask is None:
            mask = torch.ones(teacher.shape[1], teacher.shape[0], device=teacher.device)
        total = 0.0
        # the model config's factor: the scheduled one of this iteration (MTPWeighting)
        weight = self.model.config.mtp_loss_scaling_factor / self.depth
        for k in range(1, self.depth + 1):
            loss, agreed, positions = depth_loss(
                self._output_logits(chunks[k]), teacher, mask, k, mode=self.mode,
                temperature=self.temperature, vocab_size=self.vocab_size)
            total = total + self.multipliers[k - 1] * loss
            self.sums[:, k - 1] += torch.stack([loss.detach(), agreed, positions])
        self.microbatches += 1
        detached = torch.cat([chunks[0]] + [c.detach() for c in chunks[1:]])
        return MTPLossAutoScaler.apply(detached, weight * total)

    def flush(self) -> Dict[str, float]:
        """The window's mean loss and agreement per depth, over data-parallel ranks; then
        reset. Every rank with the MTP block must call it at the same iterations."""
        group = parallel_state.get_data_parallel_group(with_context_parallel=True)
        packed = torch.cat([self.sums.flatten(),
                            torch.tensor([float(self.microbatches)], device=self.sums.device)])
        comm.all_reduce(packed, group=group)
        values = packed.tolist()
        loss, agreed, positions = (values[i * self.depth:(i + 1) * self.depth] for i in range(3))
        microbatches = values[-1]
        self.sums.zero_()
        self.microbatches = 0
        out = {}
        for k in range(self.depth):
            if microbatches:
                out[f"distill_{k + 1} loss"] = loss[k] / microbatches
                out[f"distill_{k + 1} agreement"] = agreed[k] / max(positions[k], 1.0)
        return out


class _NoMTP:
    """A rank without the MTP block (an earlier pipeline stage): nothing to report."""

    def flush(self) -> Dict[str, float]:
        return {}



"""GPT + Multi-Token Prediction in plain PyTorch, written from the DeepSeek-V3 report.

An independent check of megatron-core: nothing here imports megatron. It reads the
weights of a single-rank megatron-core ``GPTModel`` by their ``state_dict()`` names
and computes, for a batch ``tokens, labels, loss_mask`` (``[b, s]``)::

    main model     x = Emb(t); L x (x += Attn(RMSNorm x); x += MLP(RMSNorm x)); h0 = RMSNorm x
    lm             masked mean of CE(OutHead(h0_i), labels_i)
    depth k=1..D   h'_i = M_k [RMSNorm(h^{k-1}_i); RMSNorm(Emb(t_{i+k}))]      i < s - k
                   h^k  = RMSNorm_k(TRM_k(h'))        (one transformer layer, then a norm)
                   mtp_k = masked mean of CE(OutHead(h^k_i), labels_{i+k}), mask_{i+k}
    objective      lm + factor * sum_k w_k mtp_k      (w_k = 1 / D unless depth_weights)
                   (+ each MoE layer's balancing loss, tests/reference/moe.py)
    Attn           causal softmax attention, or multi-latent (tests/reference/mla.py)

DeepSeek-V3 (arXiv:2412.19437, section 2.2, eqs. 21-25) shrinks the sequence by one
position per depth; we do the same (positions ``i >= s - k`` have no target). Attention
is causal with RoPE (rotate-half, base 10000) at positions ``0..s-k-1``.

Two choices the report leaves open, fixed here the way megatron-core makes them (the
tests show the alternative gives different numbers):

* ``h^0`` is the main model's output after its final RMSNorm, and depth ``k+1`` reads
  ``h^k`` after depth ``k``'s final RMSNorm (the same tensor the shared head sees).
* The report writes ``[RMSNorm(h); RMSNorm(Emb)]``; megatron-core's ``eh_proj`` takes
  ``[Emb; h]``. That is only a permutation of ``M_k``'s columns: we split the weight.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from tests.reference.mla import MLAReference, mla_attention
from tests.reference.moe import MoEReference, moe_mlp

Weights = Dict[str, torch.Tensor]


@dataclass(frozen=True)
class ReferenceConfig:
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    mtp_num_layers: int = 0
    mtp_loss_scaling_factor: float = 0.1
    swiglu: bool = False
    tied_embeddings: bool = True
    eps: float = 1e-5
    rope_base: float = 10000.0
    chain_normed_hidden: bool = True  # see the module docstring
    # w_1..w_D summing to 1 (--mtp-depth-weights, normalised); () = uniform, 1 / D each
    depth_weights: Tuple[float, ...] = ()
    moe: Optional[MoEReference] = None  # MoE layers (tests/reference/moe.py)
    mla: Optional[MLAReference] = None  # multi-latent attention (tests/reference/mla.py)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def linear(x: torch.Tensor, w: Weights, name: str) -> torch.Tensor:
    return F.linear(x, w[f"{name}.weight"], w.get(f"{name}.bias"))


def rope(x: torch.Tensor, base: float) -> torch.Tensor:
    """Rotary embedding of ``x`` ``[b, heads, s, d]`` at positions ``0..s-1``."""
    seq, dim = x.shape[-2], x.shape[-1]
    inv_freq = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    angles = torch.outer(torch.arange(seq, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    first, second = x.chunk(2, dim=-1)
    rotated = torch.cat([-second, first], dim=-1)
    return x * angles.cos() + rotated * angles.sin()


def attention(x: torch.Tensor, w: Weights, name: str, cfg: ReferenceConfig) -> torch.Tensor:
    """Causal self-attention; megatron's fused QKV rows are grouped per query group:
    ``[q_1 .. q_{heads/groups}, k, v]`` for each group (MLA: tests/reference/mla.py)."""
    if cfg.mla is not None:
        return mla_attention(x, w, name, cfg.num_attention_heads, cfg.mla, cfg.eps)
    b, s, _ = x.shape
    groups, d = cfg.num_query_groups, cfg.head_dim
    per_group = cfg.num_attention_heads // groups
    qkv = linear(x, w, f"{name}.linear_qkv").view(b, s, groups, per_group + 2, d)
    q = qkv[:, :, :, :per_group].reshape(b, s, groups * per_group, d)
    k = qkv[:, :, :, per_group].repeat_interleave(per_group, dim=2)
    v = qkv[:, :, :, per_group + 1].repeat_interleave(per_group, dim=2)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [b, heads, s, d]
    q, k = rope(q, cfg.rope_base), rope(k, cfg.rope_base)
    scores = q @ k.transpose(-1, -2) / math.sqrt(d)
    causal = torch.ones(s, s, dtype=torch.bool).triu(1)
    probs = scores.masked_fill(causal, float("-inf")).softmax(dim=-1)
    out = (probs @ v).transpose(1, 2).reshape(b, s, -1)
    return linear(out, w, f"{name}.linear_proj")


def mlp(x: torch.Tensor, w: Weights, name: str, cfg: ReferenceConfig) -> torch.Tensor:
    h = linear(x, w, f"{name}.linear_fc1")
    if cfg.swiglu:
        gate, up = h.chunk(2, dim=-1)
        h = F.silu(gate) * up
    else:
        h = F.gelu(h)
    return linear(h, w, f"{name}.linear_fc2")


def transformer_layer(x: torch.Tensor, w: Weights, name: str, cfg: ReferenceConfig,
                      aux: Optional[List[torch.Tensor]] = None) -> torch.Tensor:
    """One layer; an MoE layer appends its balancing loss (with its coefficient) to ``aux``."""
    normed = rms_norm(x, w[f"{name}.input_layernorm.weight"], cfg.eps)
    x = x + attention(normed, w, f"{name}.self_attention", cfg)
    normed = rms_norm(x, w[f"{name}.pre_mlp_layernorm.weight"], cfg.eps)
    if cfg.moe is not None and cfg.moe.is_moe(name):
        out, balancing = moe_mlp(normed, w, f"{name}.mlp", cfg.moe)
        if balancing is not None and aux is not None:
            aux.append(cfg.moe.aux_coeff * balancing)
        return x + out
    return x + mlp(normed, w, f"{name}.mlp", cfg)


def depth_scale(cfg: ReferenceConfig, k: int) -> float:
    """The objective's coefficient of ``mtp_k`` (1-based): ``factor * w_k``, with
    ``w_k = 1 / D`` (written ``factor / D``, megatron-core's expression) when uniform."""
    if cfg.depth_weights:
        return cfg.mtp_loss_scaling_factor * cfg.depth_weights[k - 1]
    return cfg.mtp_loss_scaling_factor / max(cfg.mtp_num_layers, 1)


def masked_mean_ce(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor):
    """(per-token CE ``[b, s]``, masked sum, token count)."""
    ce = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none")
    ce = ce.view(labels.shape)
    mask = mask.float()
    return ce, (ce * mask).sum(), mask.sum()


def forward(w: Weights, cfg: ReferenceConfig, tokens: torch.Tensor, labels: torch.Tensor,
            loss_mask: torch.Tensor) -> Dict[str, object]:
    """Losses of one microbatch.

    Returns ``lm_tokens`` (per-token CE of the main head), ``lm`` and ``mtp`` (masked
    means), ``sums``/``counts`` (masked sums and token counts: lm first, then each
    depth) and ``objective = lm + factor / D * sum(mtp)``.
    """
    emb = w["embedding.word_embeddings.weight"]
    head = emb if cfg.tied_embeddings else w["output_layer.weight"]
    s = tokens.shape[1]

    x = F.embedding(tokens, emb)
    aux: List[torch.Tensor] = []  # MoE balancing losses, coefficients applied
    for layer in range(cfg.num_layers):
        x = transformer_layer(x, w, f"decoder.layers.{layer}", cfg, aux)
    hidden = rms_norm(x, w["decoder.final_layernorm.weight"], cfg.eps)
    lm_tokens, lm_sum, lm_count = masked_mean_ce(hidden @ head.t(), labels, loss_mask)

    sums, counts, mtp = [lm_sum], [lm_count], []
    ids = tokens
    for k in range(1, cfg.mtp_num_layers + 1):
        name = f"mtp.layers.{k - 1}"
        if cfg.moe is None:
            hidden = hidden[:, : s - k]                # h^{k-1}_i for i < s - k
            ahead = F.embedding(tokens[:, k:], emb)    # Emb(t_{i+k})
        else:  # MoE: route the rolled-off tail too, as megatron-core does (moe.py)
            ids = _roll(ids)
            ahead = F.embedding(ids, emb)
        h = cfg.hidden_size
        proj = w[f"{name}.eh_proj.weight"]             # megatron order: [Emb; h]
        m_k = torch.cat([proj[:, h:], proj[:, :h]], dim=1)   # DeepSeek order: [h; Emb]
        combined = torch.cat([rms_norm(hidden, w[f"{name}.hnorm.weight"], cfg.eps),
                              rms_norm(ahead, w[f"{name}.enorm.weight"], cfg.eps)], dim=-1)
        out = transformer_layer(combined @ m_k.t(), w, f"{name}.transformer_layer", cfg, aux)
        normed = rms_norm(out, w[f"{name}.final_layernorm.weight"], cfg.eps)
        _, depth_sum, depth_count = masked_mean_ce(normed[:, : s - k] @ head.t(),
                                                   labels[:, k:], loss_mask[:, k:])
        sums.append(depth_sum)
        counts.append(depth_count)
        mtp.append(depth_sum / depth_count)
        hidden = normed if cfg.chain_normed_hidden else out

    lm = lm_sum / lm_count
    objective = lm + sum(depth_scale(cfg, k) * m for k, m in enumerate(mtp, 1)) if mtp else lm
    if aux:
        objective = objective + sum(aux)
    return {"lm_tokens": lm_tokens, "lm": lm, "mtp": mtp, "sums": sums, "counts": counts,
            "objective": objective, "aux": aux}


def _roll(t: torch.Tensor) -> torch.Tensor:
    """One position left along the sequence, the freed last position 0 (megatron-core's
    ``roll_tensor``)."""
    out = torch.roll(t, -1, dims=-1)
    out[..., -1] = 0
    return out


def step_objective(w: Weights, cfg: ReferenceConfig, microbatches: List[Dict[str, torch.Tensor]],
                   per_token: bool = False, rescale_rolled: bool = False) -> torch.Tensor:
    """The objective of one optimizer step over a global batch cut into microbatches.

    Default: the mean over microbatches of each microbatch's objective. ``per_token``:
    every term's masked sum over the whole batch divided by the lm token count of the
    whole batch (megatron-core's ``--calculate-per-token-loss``, see docs/mtp-objective.md).
    ``rescale_rolled`` (with ``per_token``): each microbatch's depth-k sum is first scaled
    by (its lm tokens / its depth-k tokens), so a depth weighs as if it had as many
    tokens as the lm loss (megatron-core >= 0.17, NVIDIA/Megatron-LM#3159; 0.16 does not).
    """
    outs = [forward(w, cfg, mb["tokens"], mb["labels"], mb["loss_mask"]) for mb in microbatches]
    if not per_token:
        return sum(o["objective"] for o in outs) / len(outs)
    lm_count = sum(o["counts"][0] for o in outs)
    total = sum(o["sums"][0] for o in outs)
    for k in range(1, cfg.mtp_num_layers + 1):
        for o in outs:
            scale = o["counts"][0] / o["counts"][k].clamp(min=1) if rescale_rolled else 1.0
            total = total + depth_scale(cfg, k) * o["sums"][k] * scale
    return total / lm_count


def leaf_weights(state_dict: Weights) -> Weights:
    """fp32 copies that require grad, from a megatron-core ``state_dict()``."""
    return {k: v.detach().float().clone().requires_grad_(True)
            for k, v in state_dict.items() if isinstance(v, torch.Tensor)}


def gradients(w: Weights, objective: torch.Tensor) -> Dict[str, Optional[torch.Tensor]]:
    names = list(w)
    grads = torch.autograd.grad(objective, [w[n] for n in names], allow_unused=True)
    return dict(zip(names, grads))

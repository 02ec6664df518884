"""Multi-latent attention (DeepSeek-V2/V3) in plain PyTorch, written from the DeepSeek-V2
report (arXiv:2405.04434, section 2.1) and its YaRN extension; nothing here imports megatron.

Per token ``x`` and head ``i`` (``n`` heads)::

    c_q   = RMSNorm(W_DQ x)              (--q-lora-rank; without it q = W_Q x)
    q_i   = [q_nope_i; RoPE(q_pe_i)]      from W_UQ c_q, widths d_qk and d_pe
    [c_kv; k_pe] = W_DKV x               (kv_lora_rank + d_pe), c_kv = RMSNorm(c_kv)
    k_i   = [k_nope_i; RoPE(k_pe)]        k_nope_i, v_i from W_UKV c_kv; k_pe shared by heads
    o     = W_O [softmax(q_i k_j^T * scale) v_j]_i      causal

RoPE here is DeepSeek's: each ``pe`` vector's channels are de-interleaved (even ones,
then odd ones) before the rotate-half rotation. YaRN stretches the low frequencies by
``factor`` between the correction dimensions of ``beta_fast``/``beta_slow``, multiplies
cos/sin by ``m(factor, mscale) / m(factor, mscale_all_dim)`` and the softmax scale
``1/sqrt(d_qk + d_pe)`` by ``m(factor, mscale_all_dim)^2``, where
``m(s, a) = 0.1 a ln(s) + 1`` (1 for s <= 1). Weights are read by megatron-core's names
(``linear_q_down_proj``, ``q_layernorm``, ``linear_kv_up_proj``, ...).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F

Weights = Dict[str, torch.Tensor]


@dataclass(frozen=True)
class MLAReference:
    q_lora_rank: Optional[int]
    kv_lora_rank: int
    qk_head_dim: int
    pe_head_dim: int
    v_head_dim: int
    latent_norms: bool
    rope_base: float = 10000.0
    yarn: bool = True
    factor: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0
    original_max_positions: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0


def yarn_m(scale: float, a: float) -> float:
    return 1.0 if scale <= 1 else 0.1 * a * math.log(scale) + 1.0


def _correction_dim(rotations: float, cfg: MLAReference) -> float:
    """The channel pair whose wavelength fits ``rotations`` times in the original context."""
    dim = cfg.pe_head_dim
    return dim * math.log(cfg.original_max_positions / (rotations * 2 * math.pi)) / (
        2 * math.log(cfg.rope_base))


def rotary(cfg: MLAReference, seq: int) -> Tuple[torch.Tensor, float]:
    """Angles ``[seq, d_pe]`` (rotate-half layout) and the cos/sin multiplier."""
    dim = cfg.pe_head_dim
    inv_freq = 1.0 / cfg.rope_base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    scale = 1.0
    if cfg.yarn:
        low = max(math.floor(_correction_dim(cfg.beta_fast, cfg)), 0)
        high = min(math.ceil(_correction_dim(cfg.beta_slow, cfg)), dim - 1)
        ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low)
                / max(high - low, 0.001)).clamp(0, 1)
        inv_freq = inv_freq / cfg.factor * ramp + inv_freq * (1 - ramp)
        scale = yarn_m(cfg.factor, cfg.mscale) / yarn_m(cfg.factor, cfg.mscale_all_dim)
    angles = torch.outer(torch.arange(seq, dtype=torch.float32), inv_freq)
    return torch.cat([angles, angles], dim=-1), scale


def _rope(x: torch.Tensor, angles: torch.Tensor, scale: float) -> torch.Tensor:
    """DeepSeek RoPE of ``x`` ``[b, s, heads, d_pe]``: de-interleave, then rotate half."""
    x = torch.cat([x[..., 0::2], x[..., 1::2]], dim=-1)
    first, second = x.chunk(2, dim=-1)
    rotated = torch.cat([-second, first], dim=-1)
    cos, sin = (f(angles)[None, :, None, :] * scale for f in (torch.cos, torch.sin))
    return x * cos + rotated * sin


def _rms(x: torch.Tensor, w: Optional[torch.Tensor], eps: float) -> torch.Tensor:
    if w is None:
        return x
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _linear(x: torch.Tensor, w: Weights, name: str) -> torch.Tensor:
    return F.linear(x, w[f"{name}.weight"], w.get(f"{name}.bias"))


def mla_attention(x: torch.Tensor, w: Weights, name: str, heads: int, cfg: MLAReference,
                  eps: float) -> torch.Tensor:
    """Causal multi-latent self-attention of ``x`` ``[b, s, h]`` (``name``: the layer's
    ``self_attention``)."""
    b, s, _ = x.shape
    qk, pe, vd = cfg.qk_head_dim, cfg.pe_head_dim, cfg.v_head_dim
    norm = (lambda key: w[f"{name}.{key}.weight"]) if cfg.latent_norms else (lambda key: None)
    if cfg.q_lora_rank:
        latent = _rms(_linear(x, w, f"{name}.linear_q_down_proj"), norm("q_layernorm"), eps)
        q = _linear(latent, w, f"{name}.linear_q_up_proj")
    else:
        q = _linear(x, w, f"{name}.linear_q_proj")
    q_nope, q_pe = q.view(b, s, heads, qk + pe).split([qk, pe], dim=-1)
    c_kv, k_pe = _linear(x, w, f"{name}.linear_kv_down_proj").split(
        [cfg.kv_lora_rank, pe], dim=-1)
    kv = _linear(_rms(c_kv, norm("kv_layernorm"), eps), w, f"{name}.linear_kv_up_proj")
    k_nope, v = kv.view(b, s, heads, qk + vd).split([qk, vd], dim=-1)
    angles, scale = rotary(cfg, s)
    q = torch.cat([q_nope, _rope(q_pe, angles, scale)], dim=-1)
    k_pe = _rope(k_pe[:, :, None, :], angles, scale).expand(b, s, heads, pe)
    k = torch.cat([k_nope, k_pe], dim=-1)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [b, heads, s, d]
    softmax_scale = yarn_m(cfg.factor, cfg.mscale_all_dim) ** 2 / math.sqrt(qk + pe) \
        if cfg.yarn else 1.0 / math.sqrt(qk + pe)
    scores = q @ k.transpose(-1, -2) * softmax_scale
    causal = torch.ones(s, s, dtype=torch.bool).triu(1)
    probs = scores.masked_fill(causal, float("-inf")).softmax(dim=-1)
    out = (probs @ v).transpose(1, 2).reshape(b, s, heads * vd)
    return _linear(out, w, f"{name}.linear_proj")

"""Equal-FLOPs arithmetic: what an MTP run costs relative to the baseline.

The training FLOPs per token come from ``mtp_megatron.model.counting.flops_per_token``
(the same count the training log's TFLOP/s uses). An MTP run of ``N`` iterations costs
``N * ratio`` baseline iterations, ``ratio = F(D) / F(0)``; the equal-FLOPs baseline
trains ``round(N * ratio)`` iterations (its own schedule, warmup and decay scaled with
it) and sees that many more tokens.

    ratio = flop_ratio(per_token_flops(args, world_size=1), depth=1)   # e.g. 1.16
    equal_flops_iters(200, ratio)                                       # 232
"""

from __future__ import annotations

from typing import Dict, Sequence


def per_token_flops(launcher_args: Sequence[str], depths: Sequence[int],
                    world_size: int = 1) -> Dict[int, float]:
    """Training FLOPs per token of the launcher's model for depth 0 and each depth."""
    import dataclasses

    from mtp_megatron.config import load_config
    from mtp_megatron.data.datasets import prepare_data
    from mtp_megatron.model.builder import vocab_size_for
    from mtp_megatron.model.counting import flops_per_token

    cfg, _ = load_config(list(launcher_args), world_size)
    vocab = vocab_size_for(cfg, prepare_data(data=cfg.data, model=cfg.model).vocab_size)
    out = {0: flops_per_token(cfg, vocab, with_mtp=False)["total"]}
    for depth in depths:
        mtp = dataclasses.replace(cfg.mtp, mtp_num_layers=depth)
        out[depth] = flops_per_token(dataclasses.replace(cfg, mtp=mtp), vocab)["total"]
    return out


def flop_ratio(flops: Dict[int, float], depth: int) -> float:
    """Training FLOPs of a D=``depth`` run over the baseline's, per token."""
    return flops[depth] / flops[0]


def equal_flops_iters(train_iters: int, ratio: float) -> int:
    """Baseline iterations that cost what ``train_iters`` MTP iterations cost."""
    if ratio < 1.0:
        raise ValueError(f"an MTP run cannot cost less than the baseline (ratio {ratio})")
    return max(train_iters, round(train_iters * ratio))

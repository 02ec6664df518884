"""Step time of an MoE model vs a dense one with the same active parameters per token.

One rank, the package's ``Trainer.run_step()`` on mock data, both with MTP (D=1). The dense
model's MLP width is ``--ffn-hidden-size``; the MoE model replaces every MLP (the MTP
layer's too) by ``--experts`` routed experts of width ``--moe-ffn-hidden-size`` (top-k of
them per token) plus shared experts, sized so that a token passes the same MLP width:
``topk x moe_ffn + shared = ffn``. The router is sigmoid with aux-loss-free expert bias
and the alltoall dispatcher (the DeepSeek-V3 shape). Rounds alternate dense and MoE (a
busy machine slows both alike); the script prints, from this run only, the median step
times, their ratio, and the FLOP model's ratio (``model/counting.py``: active experts).

CPU, 2 cores (about 2 minutes):
    OMP_NUM_THREADS=2 python benchmarks/moe_vs_dense.py
GPU (bf16, Transformer Engine, grouped GEMM):
    python benchmarks/moe_vs_dense.py --bf16 --transformer-impl transformer_engine \\
        --grouped-gemm --hidden-size 2048 --ffn-hidden-size 8192 --moe-ffn-hidden-size 2048 \\
        --seq-length 2048 --steps 10
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Dict, List

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_throughput import _env, _sync  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--num-attention-heads", type=int, default=4)
    p.add_argument("--ffn-hidden-size", type=int, default=512)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--topk", type=int, default=2)
    p.add_argument("--moe-ffn-hidden-size", type=int, default=128)
    p.add_argument("--seq-length", type=int, default=128)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--num-microbatches", type=int, default=2)
    p.add_argument("--steps", type=int, default=4, help="timed steps per model and round")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--transformer-impl", default=None)
    p.add_argument("--grouped-gemm", action="store_true")
    p.add_argument("--json", help="write the results here")
    return p.parse_args(argv)


def run_config(args, moe: bool):
    from mtp_megatron.config import build_config

    cli = {
        "num_layers": args.num_layers, "hidden_size": args.hidden_size,
        "num_attention_heads": args.num_attention_heads,
        "ffn_hidden_size": args.ffn_hidden_size, "seq_length": args.seq_length,
        "vocab_size": args.vocab_size, "make_vocab_size_divisible_by": 128,
        "micro_batch_size": args.micro_batch_size,
        "global_batch_size": args.micro_batch_size * args.num_microbatches,
        "train_iters": 10**6, "lr_warmup_iters": 0, "mock_data": True, "eval_iters": 0,
        "log_interval": 10**6, "bf16": args.bf16, "mtp_num_layers": 1,
        "transformer_impl": args.transformer_impl,
        "output_dir": os.path.join("runs", "bench_moe_vs_dense"),
    }
    if moe:
        shared = args.ffn_hidden_size - args.topk * args.moe_ffn_hidden_size
        if shared < 0:
            raise SystemExit("--ffn-hidden-size must be at least --topk x --moe-ffn-hidden-size")
        cli.update(num_experts=args.experts, moe_router_topk=args.topk,
                   moe_ffn_hidden_size=args.moe_ffn_hidden_size,
                   moe_shared_expert_intermediate_size=shared or None,
                   moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
                   moe_router_load_balancing_type="none",
                   moe_token_dispatcher_type="alltoall", moe_grouped_gemm=args.grouped_gemm)
    return build_config(None, cli, 1)


def measure(args, moe: bool) -> Dict[str, object]:
    """Seconds of each timed step of one freshly built Trainer, and its FLOP model."""
    from mtp_megatron.model.counting import model_params
    from mtp_megatron.runtime.preflight import preflight
    from mtp_megatron.training.trainer import Trainer

    _env()
    cfg = run_config(args, moe)
    launch, impl = preflight(cfg)
    trainer = Trainer(cfg, launch, impl)
    try:
        for chunk in trainer.model:
            chunk.train()
        for _ in range(args.warmup):
            trainer.run_step()
        times: List[float] = []
        for _ in range(args.steps):
            _sync()
            start = time.perf_counter()
            trainer.run_step()
            _sync()
            times.append(time.perf_counter() - start)
        params = model_params(cfg, trainer.vocab_size)
        return {"times": times, "flops_per_token": trainer.metrics.flops_per_token, **params}
    finally:
        trainer.close()


def main(argv=None) -> int:
    args = parse_args(argv)
    import logging

    logging.basicConfig(level=logging.WARNING)
    runs: Dict[str, Dict[str, object]] = {}
    for _ in range(args.rounds):
        for name, moe in (("dense", False), ("moe", True)):
            got = measure(args, moe)
            run = runs.setdefault(name, dict(got, times=[]))
            run["times"] += got["times"]
    for run in runs.values():
        run["step_s"] = statistics.median(run["times"])
    dense, moe = runs["dense"], runs["moe"]
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    tokens = args.micro_batch_size * args.num_microbatches * args.seq_length
    print(f"device {device}, {tokens} tokens/step, h={args.hidden_size}, L={args.num_layers} "
          f"(+1 MTP layer), s={args.seq_length}; MoE: {args.experts} experts, top-{args.topk}"
          f" x {args.moe_ffn_hidden_size} + shared "
          f"{args.ffn_hidden_size - args.topk * args.moe_ffn_hidden_size} = dense ffn "
          f"{args.ffn_hidden_size}")
    print("| model | ms/step (median) | params total | active per token | FLOPs/token |")
    print("|---|---|---|---|---|")
    for name, run in runs.items():
        print(f"| {name} | {run['step_s'] * 1e3:.1f} | {run['total']:,} | {run['active']:,} | "
              f"{run['flops_per_token'] / 1e6:.1f} M |")
    print(f"MoE / dense: step time {moe['step_s'] / dense['step_s']:.2f}, FLOP model "
          f"{moe['flops_per_token'] / dense['flops_per_token']:.3f}, total parameters "
          f"{moe['total'] / dense['total']:.2f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": device, "args": vars(args), "runs": runs}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

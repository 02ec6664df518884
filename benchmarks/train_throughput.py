"""Training throughput: the package's step vs a bare megatron-core loop, and MTP overhead.

In one process (one rank), for each MTP depth D in ``--depths`` (default 0, 1, 2):

* **package**: ``Trainer(cfg).run_step()`` with ``--mock-data`` (data, forward-backward,
  NaN/exit agreement, optimizer, scheduler, loss bookkeeping: everything the launcher runs
  per step except the log line; an older checkout's ``train_step()``);
* **bare**: megatron-core alone on the same shapes, the shape of its
  ``run_simple_mcore_train_loop.py``: ``GPTModel`` (+ MTP block) in mcore DDP,
  ``get_megatron_optimizer``, ``get_forward_backward_func()``, pre-built random batches.

Both live in the same process groups and are timed step by step, alternating package and
bare (so a busy machine slows both alike), after warm-up; the script prints, from this
run only:

* ``package / bare`` step-time ratio per D (goal: <= 1.03 on GPU, <= 1.0 +- noise on CPU);
* the MTP step-time overhead ``t(D) / t(0)`` next to the FLOP model's
  ``flops_per_token(D) / flops_per_token(0)`` (``model/counting.py``);
* MFU on a GPU the metrics table knows (package TFLOP/s over its dense bf16 peak);
* peak memory: on GPU ``torch.cuda.max_memory_allocated`` per step; on CPU the bytes of
  activations saved for backward in one step (a ``saved_tensors_hooks`` count, unique
  storages), which is what MTP adds.

CPU, 2 cores (about 2-3 minutes):
    OMP_NUM_THREADS=2 python benchmarks/train_throughput.py
GPU (bf16, bigger shapes):
    python benchmarks/train_throughput.py --bf16 --hidden-size 2048 --num-layers 8 \\
        --num-attention-heads 16 --seq-length 2048 --micro-batch-size 2 --steps 20
It runs against whichever ``mtp_megatron`` is on ``PYTHONPATH`` (e.g. an older checkout,
to compare loops: ``PYTHONPATH=/path/to/old python benchmarks/train_throughput.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Callable, Dict, List

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--depths", default="0,1,2")
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--num-attention-heads", type=int, default=4)
    p.add_argument("--seq-length", type=int, default=256)
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--num-microbatches", type=int, default=2)
    p.add_argument("--steps", type=int, default=5, help="timed steps per loop and depth")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=1,
                   help="build and measure this many times per depth (median of all steps)")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--json", help="write the results here")
    return p.parse_args(argv)


def run_config(args, depth: int):
    from mtp_megatron.config import build_config

    cli = {
        "num_layers": args.num_layers, "hidden_size": args.hidden_size,
        "num_attention_heads": args.num_attention_heads, "seq_length": args.seq_length,
        "vocab_size": args.vocab_size, "make_vocab_size_divisible_by": 128,
        "micro_batch_size": args.micro_batch_size,
        "global_batch_size": args.micro_batch_size * args.num_microbatches,
        "train_iters": 10**6, "lr_warmup_iters": 0, "mock_data": True, "eval_iters": 0,
        "log_interval": 10**6, "bf16": args.bf16,
        "output_dir": os.path.join("runs", "bench_throughput"),
    }
    if depth:
        cli["mtp_num_layers"] = depth
    return build_config(None, cli, 1)


def _env() -> None:
    from mtp_megatron.runtime.launch_env import free_port

    os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())})


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _time(step: Callable[[], None], warmup: int, steps: int) -> List[float]:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        _sync()
        start = time.perf_counter()
        step()
        _sync()
        times.append(time.perf_counter() - start)
    return times


def _saved_bytes(step: Callable[[], None]) -> int:
    """Bytes of the tensors autograd saves for backward during one step (unique storages)."""
    seen: Dict[int, int] = {}

    def pack(t):
        try:
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
        except (RuntimeError, NotImplementedError):
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return sum(seen.values())


def _peak(step: Callable[[], None]) -> int:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        step()
        return torch.cuda.max_memory_allocated()
    return _saved_bytes(step)


def build_bare_step(args, depth: int, impl: str, device: torch.device) -> Callable[[], None]:
    """The same shapes through megatron-core only (run_simple_mcore_train_loop's shape),
    in the process groups the package's Trainer already made."""
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
        get_gpt_mtp_block_spec,
    )
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.transformer.transformer_config import TransformerConfig

    dtype = torch.bfloat16 if args.bf16 else torch.float32
    config = TransformerConfig(
        num_layers=args.num_layers, hidden_size=args.hidden_size,
        num_attention_heads=args.num_attention_heads, ffn_hidden_size=4 * args.hidden_size,
        normalization="RMSNorm", hidden_dropout=0.0, attention_dropout=0.0,
        bf16=args.bf16, params_dtype=dtype, pipeline_dtype=dtype, autocast_dtype=dtype,
        use_cpu_initialization=device.type == "cpu", mtp_num_layers=depth or None,
        mtp_loss_scaling_factor=0.1,
    )
    te = impl == "transformer_engine"
    spec = get_gpt_layer_with_transformer_engine_spec() if te else get_gpt_layer_local_spec(
        normalization="RMSNorm")
    mtp_spec = get_gpt_mtp_block_spec(config, spec, use_transformer_engine=te) if depth else None
    vocab = -(-args.vocab_size // 128) * 128
    model = GPTModel(config=config, transformer_layer_spec=spec, vocab_size=vocab,
                     max_sequence_length=args.seq_length, position_embedding_type="rope",
                     mtp_block_spec=mtp_spec).to(device)
    model = DistributedDataParallel(
        config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), model)
    config.no_sync_func = model.no_sync
    config.finalize_model_grads_func = finalize_model_grads
    optimizer = get_megatron_optimizer(OptimizerConfig(
        optimizer="adam", lr=1e-4, bf16=args.bf16, params_dtype=dtype, clip_grad=1.0), [model])
    b, s = args.micro_batch_size, args.seq_length
    batches = []
    for _ in range(args.num_microbatches):
        tokens = torch.randint(0, args.vocab_size, (b, s + 1))
        batches.append({"tokens": tokens[:, :-1].contiguous().to(device),
                        "labels": tokens[:, 1:].contiguous().to(device),
                        "position_ids": torch.arange(s).expand(b, s).contiguous().to(device),
                        "loss_mask": torch.ones(b, s, device=device)})

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        output = model(batch["tokens"], batch["position_ids"], None,
                       labels=batch["labels"], loss_mask=batch["loss_mask"])

        def loss_func(output_tensor):
            mask = batch["loss_mask"].reshape(-1)
            loss = torch.sum(output_tensor.float().reshape(-1) * mask)
            return loss, mask.sum().to(torch.int), {"lm loss": loss.detach()}

        return output, loss_func

    def step():
        model.zero_grad_buffer()
        optimizer.zero_grad()
        get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter(batches), model=[model],
            num_microbatches=len(batches), seq_length=s, micro_batch_size=b,
            forward_only=False)
        optimizer.step()

    model.train()
    return step


def measure(args, depth: int, steps: int):
    """Package and bare steps, alternating one by one (so machine load hits both alike):
    seconds per step for each, their peak-memory figures and FLOPs per token."""
    from mtp_megatron.runtime.preflight import preflight
    from mtp_megatron.training.trainer import Trainer

    _env()
    cfg = run_config(args, depth)
    launch, impl = preflight(cfg)
    trainer = Trainer(cfg, launch, impl)
    try:
        for chunk in trainer.model:
            chunk.train()
        package = getattr(trainer, "run_step", trainer.train_step)  # older loops: train_step
        bare = build_bare_step(args, depth, impl, trainer.device)
        for _ in range(args.warmup):
            package()
            bare()
        pkg_times, bare_times = [], []
        for _ in range(steps):
            pkg_times += _time(package, 0, 1)
            bare_times += _time(bare, 0, 1)
        peaks = _peak(package), _peak(bare)
        flops = trainer.metrics.flops_per_token
    finally:
        trainer.close()
    return pkg_times, bare_times, peaks, flops


def main(argv=None) -> int:
    args = parse_args(argv)
    import logging

    logging.basicConfig(level=logging.WARNING)
    depths = [int(d) for d in args.depths.split(",")]
    results = {}
    for depth in depths:
        pkg_times, bare_times = [], []
        for _ in range(args.rounds):
            p, b, (pkg_peak, bare_peak), flops = measure(args, depth, args.steps)
            pkg_times += p
            bare_times += b
        results[depth] = {
            "package_s": statistics.median(pkg_times), "bare_s": statistics.median(bare_times),
            "package_peak_bytes": pkg_peak, "bare_peak_bytes": bare_peak,
            "flops_per_token": flops,
        }
        r = results[depth]
        print(f"D={depth}: package {r['package_s'] * 1e3:.1f} ms/step, bare "
              f"{r['bare_s'] * 1e3:.1f} ms/step, ratio {r['package_s'] / r['bare_s']:.3f}",
              flush=True)
    base = results.get(0)
    tokens = args.micro_batch_size * args.num_microbatches * args.seq_length
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"\ndevice {device}, {tokens} tokens/step, h={args.hidden_size}, "
          f"L={args.num_layers}, s={args.seq_length}, V={args.vocab_size}")
    from mtp_megatron.training.metrics import peak_tflops_for

    peak = peak_tflops_for(device) if device != "cpu" else None  # dense bf16 datasheet peak
    print("| D | package ms/step | bare ms/step | package/bare | step time vs D=0 | "
          "FLOP model vs D=0 | peak mem vs D=0 | package TFLOP/s | MFU |")
    print("|---|---|---|---|---|---|---|---|---|")
    for depth, r in results.items():
        ratio = r["package_s"] / r["bare_s"]
        if base:
            r["time_overhead"] = r["package_s"] / base["package_s"]
            r["flop_overhead"] = r["flops_per_token"] / base["flops_per_token"]
            r["memory_overhead"] = r["package_peak_bytes"] / base["package_peak_bytes"]
        tflops = tokens * r["flops_per_token"] / r["package_s"] / 1e12
        r["package_tflops"] = tflops
        r["mfu"] = tflops / peak if peak else None
        r["ratio"] = ratio
        over = (f"{r['time_overhead']:.3f} | {r['flop_overhead']:.3f} | "
                f"{r['memory_overhead']:.3f}" if base else "- | - | -")
        print(f"| {depth} | {r['package_s'] * 1e3:.1f} | {r['bare_s'] * 1e3:.1f} | "
              f"{ratio:.3f} | {over} | {tflops:.4f} | "
              f"{'-' if r['mfu'] is None else format(r['mfu'], '.3f')} |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": device, "args": vars(args), "results": results}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

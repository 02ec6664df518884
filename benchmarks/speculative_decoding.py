"""Benchmark MTP self-speculative decoding against plain decoding, before and after the
acceptance stage, one process, ratios measured in the same run.

Trains a small D=2 model on the embedded corpus (the Python standard library,
byte-level) with the package's launcher, then the acceptance stage from it (main model
frozen, MTP layers trained on the main model's greedy tokens: ``--freeze-main-model
--mtp-self-distill greedy``). Then, in one process, on held-out prompts (validation
documents), three checkpoints:

* ``random-heads``: the trained main model with its MTP layers re-initialised (drafts
  are near random: what drafting costs when it never pays);
* ``before``: the trained checkpoint;
* ``after``: the checkpoint after the acceptance stage;

each decoded greedily with k = 0 (plain), 1, 2 and auto drafts, with sampling
(--temperature) plain and auto, and in batches (--batch-sizes) plain and auto, the
modes interleaved batch by batch. Prints one table (tokens/s, speedup over plain in the
same run by wall and by CPU time, main forwards per token, drafts and acceptance per
step, acceptance per position, greedy output identical) and writes JSON and a PNG.

CPU (2 cores, idle: about 8 minutes of training and 10 of decoding):
    python benchmarks/speculative_decoding.py --out-dir runs/bench_spec \\
        --json docs/speculative-decoding.json --png docs/speculative-decoding.png
Reuse checkpoints (no training):
    python benchmarks/speculative_decoding.py --load-before runs/bench_spec/d2/checkpoints \\
        --load-after runs/bench_spec/d2_stage/checkpoints
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
from typing import Dict, List, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# --ffn-hidden-size 512: the width docs/speculative-decoding.* were measured with (the
# launcher's SwiGLU default is now Megatron-LM's 320 at h=128).
MODEL_FLAGS = ["--hidden-size", "128", "--num-attention-heads", "4",
               "--ffn-hidden-size", "512", "--mtp-num-layers", "2",
               "--seq-length", "128", "--micro-batch-size", "8", "--global-batch-size", "8",
               "--eval-iters", "0", "--log-interval", "50"]


def launch(out_dir: str, flags: List[str], num_layers: int) -> str:
    """Train with the launcher (one CPU rank); returns the checkpoint directory."""
    save = os.path.join(out_dir, "checkpoints")
    cmd = [sys.executable, os.path.join(ROOT, "launch", "pretrain_gpt_mtp.py"), *MODEL_FLAGS,
           "--num-layers", str(num_layers), *flags, "--save", save, "--output-dir", out_dir]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    return save


def train_base(out_dir: str, iters: int, num_layers: int) -> str:
    return launch(os.path.join(out_dir, "d2"), ["--train-iters", str(iters), "--lr", "3e-3"],
                  num_layers)


def train_stage(out_dir: str, base: str, iters: int, mode: str, lr: float,
                num_layers: int) -> str:
    """The acceptance stage from ``base``: main model frozen, heads on its own tokens."""
    return launch(os.path.join(out_dir, "d2_stage"), [
        "--load", base, "--finetune", "--freeze-main-model", "--mtp-self-distill", mode,
        "--train-iters", str(iters), "--lr", str(lr), "--min-lr", str(lr / 10)], num_layers)


def randomize_heads(model, seed: int = 0) -> None:
    """Re-initialise the MTP layers' matrices (norms untouched): near-random drafts."""
    import torch

    gen = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        for param in model.mtp.parameters():
            if param.dim() > 1:
                param.copy_(0.02 * torch.randn(param.shape, generator=gen))


# (label, sampled, batch size, draft depths); depth 0 is the plain baseline of its row group
PLANS = [("greedy", False, 1, [0, 1, 2, "auto"]), ("sampling", True, 1, [0, 2, "auto"])]


def measure(load: str, prompts: List[str], args, random_heads: bool = False) -> Dict:
    import torch

    from mtp_megatron.data.tokenizers import encode
    from mtp_megatron.inference.loading import load_for_generation, text_vocab_size
    from mtp_megatron.inference.report import run_modes, speedup
    from mtp_megatron.inference.runner import KVCachedRunner
    from mtp_megatron.inference.sampling import Sampling

    model, cfg, tokenizer = load_for_generation(load, torch.device("cpu"))
    if random_heads:
        randomize_heads(model)
    runner = KVCachedRunner(model, text_vocab_size(cfg, tokenizer))
    ids = [[int(t) for t in encode(tokenizer, p)] for p in prompts]
    plans = PLANS + [("greedy", False, b, [0, "auto"]) for b in args.batch_sizes if b > 1]
    rows = []
    for label, sampled, batch, depths in plans:
        sampling = Sampling(temperature=args.temperature, seed=args.seed) if sampled \
            else Sampling()
        results = run_modes(runner, ids, depths, max_new_tokens=args.max_new_tokens,
                            eod=tokenizer.eod, batch_size=batch, sampling=sampling)
        base_stats, base_gens = results[0]
        for k, (stats, gens) in results.items():
            row = stats.summary()
            row.update(mode=label, batch_size=batch, k=k,
                       speedup=speedup(stats, base_stats) if k else 1.0,
                       speedup_cpu_time=speedup(stats, base_stats, cpu=True) if k else 1.0,
                       seconds={p: round(s, 3) for p, s in stats.seconds.items()})
            if not sampled:
                row["matches_greedy"] = all(a.tokens == b.tokens
                                            for a, b in zip(gens, base_gens))
            rows.append(row)
    return {"checkpoint": load, "random_heads": random_heads, "rows": rows}


def print_table(report: Dict) -> None:
    print(f"{'ckpt':<13}{'mode':<9}{'B':>3}{'k':>5}{'tok/s':>8}{'speedup':>8}{'cpu-x':>7}"
          f"{'fwd/tok':>8}{'drafts':>7}{'acc/st':>7}  {'acceptance':<14}same")
    for name, run in report["runs"].items():
        for row in run["rows"]:
            acc = ", ".join(f"{a:.2f}" if a is not None and a == a else "-"
                            for a in row["acceptance_per_position"]) or "-"
            print(f"{name:<13}{row['mode']:<9}{row['batch_size']:>3}{str(row['k']):>5}"
                  f"{row['tokens_per_second']:>8.1f}{row['speedup']:>8.3f}"
                  f"{row['speedup_cpu_time']:>7.3f}{row['main_forwards_per_token']:>8.3f}"
                  f"{row['mean_drafts_per_step']:>7.2f}{row['mean_accepted_per_step']:>7.2f}"
                  f"  {acc:<14}{row.get('matches_greedy', '')}")


def plot(report: Dict, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logging.warning("matplotlib is not installed: no PNG (pip install matplotlib)")
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for name, run in report["runs"].items():
        greedy = [r for r in run["rows"] if r["mode"] == "greedy" and r["batch_size"] == 1]
        deepest = next(r for r in greedy if r["k"] == 2)
        left.plot([1, 2], deepest["acceptance_per_position"], "o-", label=name)
        right.plot([str(r["k"]) for r in greedy], [r["speedup"] for r in greedy], "o-",
                   label=name)
    left.set(xlabel="draft position", ylabel="acceptance (given earlier drafts accepted)",
             ylim=(0, 1.05), xticks=[1, 2], title="Acceptance per position (k=2, greedy)")
    right.axhline(1.0, color="grey", lw=0.8)
    right.set(xlabel="drafts per step k (0 = plain greedy)", ylabel="tokens/s over plain",
              title="Speedup over greedy (same process, batch 1)")
    for ax in (left, right):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", default="runs/bench_spec")
    parser.add_argument("--num-layers", type=int, default=6,
                        help="Main-model depth (each MTP depth is one layer: the deeper the "
                             "main model, the cheaper a draft relative to a verify).")
    parser.add_argument("--train-iters", type=int, default=1500)
    parser.add_argument("--stage-iters", type=int, default=600)
    parser.add_argument("--stage-mode", choices=("greedy", "kl"), default="greedy")
    parser.add_argument("--stage-lr", type=float, default=1e-3)
    parser.add_argument("--load-before", help="A trained D=2 checkpoint (skips training).")
    parser.add_argument("--load-after", help="Its acceptance-stage checkpoint (skips the stage).")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--prompt-bytes", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="Write the report here.")
    parser.add_argument("--png", help="Write the acceptance/speedup plot here.")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING)
    before = args.load_before or train_base(args.out_dir, args.train_iters, args.num_layers)
    after = args.load_after or train_stage(args.out_dir, before, args.stage_iters,
                                           args.stage_mode, args.stage_lr, args.num_layers)

    from mtp_megatron.experiments.speculative import heldout_prompts
    from mtp_megatron.inference.loading import single_rank

    prompts = heldout_prompts(args.prompts, args.prompt_bytes, args.seed)
    report = {"command": " ".join([os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:]),
              "model_flags": " ".join(MODEL_FLAGS + ["--num-layers", str(args.num_layers)]),
              "train_iters": args.train_iters,
              "stage_iters": args.stage_iters, "stage_mode": args.stage_mode,
              "prompts": len(prompts), "max_new_tokens": args.max_new_tokens,
              "temperature": args.temperature, "load_average_start": os.getloadavg(),
              "runs": {}}
    with single_rank():
        report["runs"]["random-heads"] = measure(before, prompts, args, random_heads=True)
        report["runs"]["before"] = measure(before, prompts, args)
        report["runs"]["after"] = measure(after, prompts, args)
    report["load_average_end"] = os.getloadavg()
    print_table(report)
    if args.json:
        from mtp_megatron.inference.report import report_json

        with open(args.json, "w") as fh:
            fh.write(report_json(report) + "\n")  # strict JSON: NaN -> null
        print(f"wrote {args.json}")
    if args.png:
        plot(report, args.png)
    return 0


if __name__ == "__main__":
    sys.exit(main())

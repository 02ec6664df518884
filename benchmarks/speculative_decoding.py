"""Benchmark MTP self-speculative decoding against greedy decoding, D = 1 and D = 2.

Trains one small model per MTP depth on the embedded corpus (the Python standard
library, byte-level) with the package's launcher, then, in one process, decodes the
same prompts greedily and with every draft depth k <= D, interleaved prompt by prompt,
and prints a table (acceptance per draft position, forwards per token, tokens/s,
speedup). Writes the numbers as JSON and, with matplotlib installed, a PNG.

CPU (2 cores: about 10 minutes per model when the machine is otherwise idle):
    python benchmarks/speculative_decoding.py --train-iters 300 --out-dir runs/bench_spec \\
        --json docs/speculative-decoding.json --png docs/speculative-decoding.png
Reuse checkpoints (no training):
    python benchmarks/speculative_decoding.py --load-d1 runs/bench_spec/d1/checkpoints \\
        --load-d2 runs/bench_spec/d2/checkpoints
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
from typing import Dict, List

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# --ffn-hidden-size 512: the width docs/speculative-decoding.* were measured with (the
# launcher's SwiGLU default is now Megatron-LM's 320 at h=128).
MODEL_FLAGS = ["--num-layers", "6", "--hidden-size", "128", "--num-attention-heads", "4",
               "--ffn-hidden-size", "512",
               "--seq-length", "128", "--micro-batch-size", "8", "--global-batch-size", "8",
               "--lr", "3e-3", "--eval-iters", "0", "--log-interval", "25"]


def train(depth: int, out_dir: str, iters: int) -> str:
    """Train with the launcher (one CPU rank) and return the checkpoint directory."""
    save = os.path.join(out_dir, f"d{depth}", "checkpoints")
    cmd = [sys.executable, os.path.join(ROOT, "launch", "pretrain_gpt_mtp.py"), *MODEL_FLAGS,
           "--mtp-num-layers", str(depth), "--train-iters", str(iters), "--save", save,
           "--output-dir", os.path.join(out_dir, f"d{depth}")]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    return save


def corpus_prompts(count: int, length: int, seed: int) -> List[str]:
    """``count`` snippets of ``length`` bytes starting at a line of a stdlib file."""
    from mtp_megatron.data.corpus import corpus_snippets, stdlib_files

    return corpus_snippets(sorted(stdlib_files()), count, length, seed)


def measure(load: str, prompts: List[str], max_new_tokens: int) -> Dict:
    import torch

    from mtp_megatron.data.tokenizers import encode
    from mtp_megatron.inference.loading import load_for_generation, text_vocab_size
    from mtp_megatron.inference.report import run_modes, speedup
    from mtp_megatron.inference.runner import KVCachedRunner

    model, cfg, tokenizer = load_for_generation(load, torch.device("cpu"))
    depth = cfg.mtp.mtp_num_layers
    runner = KVCachedRunner(model, text_vocab_size(cfg, tokenizer))
    ids = [[int(t) for t in encode(tokenizer, p)] for p in prompts]
    results = run_modes(runner, ids, list(range(depth + 1)),
                        max_new_tokens=max_new_tokens, eod=tokenizer.eod)
    greedy_stats, greedy_gens = results[0]
    rows = {}
    for k, (stats, gens) in results.items():
        row = stats.summary()
        row["speedup"] = speedup(stats, greedy_stats) if k else 1.0
        row["speedup_cpu_time"] = speedup(stats, greedy_stats, cpu=True) if k else 1.0
        row["matches_greedy"] = all(a.tokens == b.tokens for a, b in zip(gens, greedy_gens))
        row["seconds"] = {p: round(s, 3) for p, s in stats.seconds.items()}
        rows[f"k{k}"] = row
    return {"mtp_num_layers": depth, "checkpoint": load, "modes": rows}


def print_table(report: Dict) -> None:
    head = (f"{'D':>2} {'k':>2} {'tok/s':>8} {'speedup':>8} {'fwd/tok':>8} {'acc/step':>9} "
            f"{'acceptance per position':<26}{'draft%':>7}{'verify%':>8}{'cpu-x':>7}  same")
    print(head)
    for run in report["runs"]:
        for key, row in run["modes"].items():
            acc = ", ".join(f"{a:.3f}" for a in row["acceptance_per_position"]) or "-"
            shares = row["time_shares"]
            print(f"{run['mtp_num_layers']:>2} {key[1:]:>2} {row['tokens_per_second']:>8.1f} "
                  f"{row['speedup']:>8.3f} {row['main_forwards_per_token']:>8.3f} "
                  f"{row['mean_accepted_per_step']:>9.3f} {acc:<26}"
                  f"{100 * shares['draft']:>7.1f}{100 * shares['verify']:>8.1f}"
                  f"{row['speedup_cpu_time']:>7.3f}  "
                  f"{row['matches_greedy']}")


def plot(report: Dict, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logging.warning("matplotlib is not installed: no PNG (pip install matplotlib)")
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for run in report["runs"]:
        d = run["mtp_num_layers"]
        top = run["modes"][f"k{d}"]
        positions = list(range(1, d + 1))
        left.plot(positions, top["acceptance_per_position"], "o-", label=f"D={d}, k={d}")
        ks = sorted(int(k[1:]) for k in run["modes"])
        right.plot(ks, [run["modes"][f"k{k}"]["speedup"] for k in ks], "o-", label=f"D={d}")
    left.set(xlabel="draft position", ylabel="acceptance (given earlier drafts accepted)",
             ylim=(0, 1.05), xticks=[1, 2], title="Acceptance per draft position")
    right.axhline(1.0, color="grey", lw=0.8)
    right.set(xlabel="draft depth k (0 = greedy)", ylabel="tokens/s relative to greedy",
              xticks=[0, 1, 2], title="Speedup over greedy (same process)")
    for ax in (left, right):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", default="runs/bench_spec")
    parser.add_argument("--train-iters", type=int, default=300)
    parser.add_argument("--load-d1", help="Checkpoint of a D=1 run (skips its training).")
    parser.add_argument("--load-d2", help="Checkpoint of a D=2 run (skips its training).")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--prompt-bytes", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="Write the report here.")
    parser.add_argument("--png", help="Write the acceptance/speedup plot here.")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    loads = {1: args.load_d1, 2: args.load_d2}
    for depth in (1, 2):
        loads[depth] = loads[depth] or train(depth, args.out_dir, args.train_iters)

    from mtp_megatron.inference.loading import single_rank

    prompts = corpus_prompts(args.prompts, args.prompt_bytes, args.seed)
    report = {"command": " ".join([os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:]),
              "model_flags": " ".join(MODEL_FLAGS), "train_iters": args.train_iters,
              "prompts": len(prompts), "max_new_tokens": args.max_new_tokens,
              "load_average": os.getloadavg(), "runs": []}
    with single_rank():
        for depth in (1, 2):
            report["runs"].append(measure(loads[depth], prompts, args.max_new_tokens))
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

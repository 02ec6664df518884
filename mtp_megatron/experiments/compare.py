"""What MTP buys, measured like for like: baseline vs MTP runs, equal tokens and FLOPs.

Defaults (a small Llama-shaped model on the embedded corpus; ~20-30 min on 2 CPU cores):
    python -m mtp_megatron.experiments.compare            # or: make compare
Depth weights and factor schedules (D=3: uniform vs exponential vs linear; constant 0.3 vs
a step to 0.1 vs a warmup; see experiments/spec.py for the schedule syntax):
    python -m mtp_megatron.experiments.compare --mtp-num-layers 3 --mtp-loss-scaling-factor 0.3 \
        --mtp-depth-weights uniform exponential linear \
        --mtp-factor-schedules constant step:0.1@100 warmup:100 --no-equal-flops
Any depths, factors, seeds and launcher flags (after '--', e.g. a TP/PP layout):
    python -m mtp_megatron.experiments.compare --mtp-num-layers 1 2 3 \\
        --mtp-loss-scaling-factor 0.1 0.3 --seeds 3 --nproc-per-node 4 --out-dir runs/cmp \\
        -- --num-layers 4 --hidden-size 128 --tensor-model-parallel-size 2
GPU-size (see examples/compare_gpu.yaml):
    python -m mtp_megatron.experiments.compare --config examples/compare_gpu.yaml

Per seed it trains, with the normal launcher under torchrun: the baseline (no MTP), each
MTP variant (same iterations: equal tokens), and per depth a baseline trained for the
MTP run's training FLOPs (equal FLOPs). Then it reads each run's metrics.jsonl, decodes
held-out prompts with every MTP checkpoint (greedy vs self-speculative) and writes
``<out-dir>/results.json``, ``results.md``, ``valid_loss.png`` and ``acceptance.png``.
Finished runs are not retrained: run it again to resume or to re-report.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shlex
import sys
import time
from typing import Dict, List, Optional, Sequence

from mtp_megatron.config import ConfigError
from mtp_megatron.experiments import collect, flops, plots, report, runner, speculative
from mtp_megatron.experiments.spec import ExperimentSpec, load_spec, plan_runs

logger = logging.getLogger("mtp_megatron")


def shared_launcher_args(spec: ExperimentSpec) -> List[str]:
    head = ["--config", spec.launcher_config] if spec.launcher_config else []
    return head + list(spec.launcher_args)


def plan(spec: ExperimentSpec):
    """(runs, FLOP ratio per depth): the equal-FLOPs arithmetic happens here."""
    per_token = flops.per_token_flops(shared_launcher_args(spec), spec.depths,
                                      world_size=spec.nproc_per_node)
    ratios = {d: flops.flop_ratio(per_token, d) for d in spec.depths}
    iters = {d: flops.equal_flops_iters(spec.train_iters, r) for d, r in ratios.items()}
    runs = plan_runs(spec, iters)
    check_runs(spec, runs)
    return runs, ratios


def check_runs(spec: ExperimentSpec, runs) -> None:
    """Every run's launcher flags form a valid config (e.g. a factor schedule that does
    not fit --train-iters): the ConfigError comes before anything trains."""
    from mtp_megatron.config import load_config

    for run in runs:
        if run.depth:
            load_config(run.launcher_args(spec), spec.nproc_per_node)


def _prompts(spec: ExperimentSpec, prompt_file: Optional[str]) -> Optional[List[str]]:
    if prompt_file:
        return speculative.read_prompt_file(prompt_file)
    shared = shared_launcher_args(spec)
    if spec.launcher_config or any(a.split("=")[0] in ("--data-path", "--mock-data")
                                   for a in shared):
        logger.warning("not the embedded corpus: give --prompt-file for speculative decoding")
        return None
    return speculative.heldout_prompts(spec.prompts, spec.prompt_bytes)


def decode_all(spec: ExperimentSpec, results: List[Dict], prompts: List[str]) -> None:
    import torch

    from mtp_megatron.inference.loading import single_rank

    if spec.threads:
        torch.set_num_threads(spec.threads)
    with single_rank():
        for result in results:
            if result["depth"]:
                run_dir = os.path.join(spec.out_dir, "runs", result["name"])
                result["speculative"] = speculative.ensure_decoded(
                    run_dir, prompts, spec.max_new_tokens)


def environment() -> Dict:
    import platform

    import torch

    from mtp_megatron.runtime import mcore_compat

    env = {"python": platform.python_version(), "torch": torch.__version__,
           "megatron_core": mcore_compat.installed_version(),
           "cpu_count": os.cpu_count(), "cuda": torch.cuda.is_available(),
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")}
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
    return env


def run_experiment(spec: ExperimentSpec, *, command: str, prompt_file: Optional[str] = None,
                   train: bool = True) -> Dict:
    """Train what is missing, collect, decode, and write the report; returns results.json."""
    start = time.time()
    runs, ratios = plan(spec)
    logger.info("%d runs; training FLOPs per token vs baseline: %s", len(runs),
                ", ".join(f"D={d}: {r:.4f}" for d, r in ratios.items()))
    dones = {}
    for run in runs:
        if train:
            dones[run.name] = runner.ensure_trained(run, spec)
        else:
            dones[run.name] = runner.read_done(run.directory(spec.out_dir)) or {}
    results = [collect.collect_run(run, run.directory(spec.out_dir)) for run in runs]
    for result in results:
        result["train_wall_seconds"] = dones[result["name"]].get("wall_seconds")
    prompts = _prompts(spec, prompt_file) if spec.speculative else None
    if prompts:
        decode_all(spec, results, prompts)
    summary = report.summarize(results, ratios)
    doc = report.build_results(
        dataclasses.asdict(spec), summary, results, flop_ratios={0: 1.0, **ratios},
        command=command, wall_seconds=time.time() - start, load_average=list(os.getloadavg()),
        environment=environment())
    doc["train_wall_seconds"] = round(sum(r["train_wall_seconds"] or 0 for r in results), 1)
    write_outputs(doc, spec.out_dir)
    return doc


def write_outputs(doc: Dict, out_dir: str) -> Dict[str, str]:
    os.makedirs(out_dir, exist_ok=True)
    paths = {"json": os.path.join(out_dir, "results.json"),
             "markdown": os.path.join(out_dir, "results.md")}
    with open(paths["json"], "w") as fh:
        json.dump(doc, fh, indent=2)
    pngs = plots.write_plots(doc, out_dir)
    with open(paths["markdown"], "w") as fh:
        fh.write(report.markdown(doc, pngs))
    for png in pngs:
        paths[os.path.basename(png)] = png
    return paths


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stdout,
                        format="[%(asctime)s compare] %(message)s", datefmt="%H:%M:%S")
    for noisy in ("megatron", "torch"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        spec, args = load_spec(argv)
        doc = run_experiment(
            spec, command="python -m mtp_megatron.experiments.compare " + shlex.join(argv),
            prompt_file=args.prompt_file, train=not args.report_only)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    with open(os.path.join(spec.out_dir, "results.md")) as fh:
        print(fh.read())
    logger.info("wrote %s (wall %.0f s)", os.path.join(spec.out_dir, "results.json"),
                doc["wall_seconds"])
    return 0


if __name__ == "__main__":
    sys.exit(main())

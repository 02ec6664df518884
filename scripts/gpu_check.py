"""One GPU validation run that writes one markdown report (``make gpu-check``).

    python scripts/gpu_check.py --out runs/gpu-check            # on a GPU node / container
    python scripts/gpu_check.py --only tests,examples --steps 20

Steps (each is recorded with its status and time; the report is rewritten after each,
so a run cut short still leaves what it measured):

1. ``env``: torch, CUDA, GPUs, megatron-core and Transformer Engine versions (TE checked
   against the ``te`` extra's range in setup.py).
2. ``tests``: ``pytest -m gpu tests`` (tests/gpu, tests/functional/test_gpu_*.py, ...).
3. ``examples``: every ``examples/*.yaml`` built and trained for a few iterations with
   ``torchrun`` (skipped when it needs more GPUs than there are).
4. ``fp8``: bf16 vs FP8 (``--fp8-format hybrid``, recipes delayed and tensorwise) with MTP
   D=1 and D=2 for ``--steps`` steps from the same seed; loss curves compared.
5. ``parallel``: TP2 (+ sequence parallel) and PP2 when there are >= 2 GPUs.
6. ``mission``: the README's mission command, as a user runs it.
7. ``resume``: bf16 + distributed optimizer, save at 10, stop, resume to 20, against a
   straight run.
8. ``async``: ``--async-save`` commits in the background; a run resumes from it.
9. ``benchmark``: ``benchmarks/train_throughput.py`` when present (package/bare ratio, MFU,
   MTP overhead; ``--benchmark-args`` for GPU shapes).

``scripts/device_smoke.sh`` runs env, mission, resume, async and benchmark on a lent GPU
machine without megatron-core installed (from a carried wheel).

Nothing here runs in ``make test``.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import subprocess
import sys
import time
from typing import Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCHER = os.path.join(ROOT, "launch", "pretrain_gpt_mtp.py")
STEPS = ("env", "tests", "examples", "fp8", "parallel", "mission", "resume", "async",
         "benchmark")
# A model big enough for FP8 to be exercised meaningfully, small enough for minutes.
CURVE_MODEL = ["--num-layers", "8", "--hidden-size", "1024", "--num-attention-heads", "16",
               "--ffn-hidden-size", "4096", "--seq-length", "1024", "--micro-batch-size", "4",
               "--global-batch-size", "32", "--lr", "3e-4", "--min-lr", "3e-5",
               "--lr-warmup-iters", "10", "--mock-data", "--bf16", "--log-interval", "1",
               "--eval-iters", "0", "--seed", "1234", "--transformer-impl", "transformer_engine"]
# bf16 vs FP8: mean of the last 10 logged losses within this relative gap.
CURVE_TAIL_REL_TOL = 0.02


class Report:
    def __init__(self, out: str):
        self.out, self.sections, self.rows = out, [], []
        os.makedirs(out, exist_ok=True)

    def step(self, name: str, status: str, seconds: float, note: str = "") -> None:
        self.rows.append((name, status, seconds, note))
        self.write()

    def section(self, title: str, body: str) -> None:
        self.sections.append(f"## {title}\n\n{body.rstrip()}\n")
        self.write()

    def write(self) -> None:
        lines = ["# GPU check", "", f"Written {time.strftime('%Y-%m-%d %H:%M:%S')} by "
                 "`scripts/gpu_check.py`.", "", "| step | status | seconds | note |",
                 "|---|---|---|---|"]
        lines += [f"| {n} | {s} | {t:.0f} | {note} |" for n, s, t, note in self.rows]
        text = "\n".join(lines) + "\n\n" + "\n".join(self.sections)
        with open(os.path.join(self.out, "report.md"), "w") as fh:
            fh.write(text)


def _gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _run(cmd: List[str], log: str, timeout: float, env: Optional[Dict[str, str]] = None):
    """Run ``cmd`` from the repo root, output to ``log``; returns (returncode, seconds)."""
    start = time.time()
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    full_env.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    with open(log, "w") as fh:
        try:
            rc = subprocess.run(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT,
                                env=full_env, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = 124
    return rc, time.time() - start


def _train(args: List[str], out: str, nproc: int, timeout: float = 1800):
    os.makedirs(out, exist_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           "--nproc-per-node", str(nproc), LAUNCHER, *args, "--output-dir", out]
    rc, seconds = _run(cmd, os.path.join(out, "train.log"), timeout)
    path = os.path.join(out, "metrics.jsonl")
    rows = [json.loads(line) for line in open(path)] if os.path.exists(path) else []
    return rc, seconds, [r for r in rows if r.get("split") is None]


def _tail(path: str, lines: int = 15) -> str:
    if not os.path.exists(path):
        return "(no log)"
    return "```\n" + "".join(open(path).readlines()[-lines:]) + "```"


def check_env(report: Report, args) -> None:
    import torch

    start = time.time()
    info = {"python": sys.version.split()[0], "torch": torch.__version__,
            "cuda": torch.version.cuda, "gpus": _gpu_count()}
    if info["gpus"]:
        info["gpu"] = torch.cuda.get_device_name(0)
        info["capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
    for dist_name in ("megatron-core", "transformer_engine", "transformer-engine"):
        try:
            from importlib.metadata import version

            info[dist_name] = version(dist_name)
        except Exception:  # not installed under this name
            pass
    te = info.get("transformer_engine") or info.get("transformer-engine")
    pin = _te_extra_range()
    note = "no Transformer Engine: FP8 steps skip, layers use --transformer-impl local"
    if te:
        from packaging.specifiers import SpecifierSet

        inside = SpecifierSet(pin, prereleases=True).contains(te.split("+")[0])
        note = f"TE {te} {'inside' if inside else 'OUTSIDE'} the te extra's range {pin or 'any'}"
    report.section("Environment", "\n".join(f"- {k}: {v}" for k, v in info.items())
                   + f"\n- {note}")
    report.step("env", "ok" if info["gpus"] else "NO GPU", time.time() - start, note)


def _te_extra_range() -> str:
    """The version range of setup.py's `te` extra as it applies on this Python."""
    import ast
    import platform

    from packaging.requirements import Requirement

    tree = ast.parse(open(os.path.join(ROOT, "setup.py")).read())
    extras = next(ast.literal_eval(kw.value) for n in ast.walk(tree) if isinstance(n, ast.Call)
                  for kw in n.keywords if kw.arg == "extras_require")
    env = {"python_version": ".".join(platform.python_version_tuple()[:2])}
    reqs = [r for r in map(Requirement, extras["te"]) if r.marker is None or r.marker.evaluate(env)]
    return str(reqs[0].specifier) if reqs else ""


def check_tests(report: Report, args) -> None:
    log = os.path.join(args.out, "pytest.log")
    rc, seconds = _run([sys.executable, "-m", "pytest", "-m", "gpu", "tests", "-v", "-rs",
                        f"--junitxml={os.path.join(args.out, 'pytest.xml')}"], log, 5400)
    summary = next((line.strip("= \n") for line in reversed(open(log).readlines())
                    if re.search(r"\d+ (passed|failed|skipped|error)", line)), "no summary")
    report.section("GPU-marked tests", f"`pytest -m gpu tests`: **{summary}**\n\n"
                   + _tail(log, 40))
    report.step("tests", "ok" if rc == 0 else f"FAILED (rc {rc})", seconds, summary)


def check_examples(report: Report, args) -> None:
    import yaml

    gpus, rows, failed, start = _gpu_count(), [], 0, time.time()
    for path in sorted(glob.glob(os.path.join(ROOT, "examples", "*.yaml"))):
        name = os.path.splitext(os.path.basename(path))[0]
        par = (yaml.safe_load(open(path)) or {}).get("parallel", {})
        need = 1
        for key in ("tensor_model_parallel_size", "pipeline_model_parallel_size",
                    "context_parallel_size"):
            need *= par.get(key, 1)
        if need > gpus:
            rows.append(f"| {name} | skipped: needs {need} GPUs | | |")
            continue
        out = os.path.join(args.out, "examples", name)
        rc, seconds, steps = _train(["--config", path, "--train-iters", "3", "--log-interval", "1",
                                     "--eval-iters", "1", "--save", os.path.join(out, "ck")],
                                    out, nproc=need)
        failed += rc != 0
        loss = f"{steps[-1]['lm loss']:.3f}" if steps else "-"
        rows.append(f"| {name} | {'ok' if rc == 0 else f'FAILED rc {rc}'} | {loss} | "
                    f"{seconds:.0f} |")
    report.section("Examples (3 iterations each)",
                   "| example | status | last lm loss | seconds |\n|---|---|---|---|\n"
                   + "\n".join(rows))
    report.step("examples", "ok" if not failed else f"{failed} FAILED", time.time() - start)


def _te_fp8_ok() -> str:
    """'' when FP8 can run here, else why not."""
    import torch

    from mtp_megatron.runtime.accel import fp8_recipe_support, te_available

    if not te_available():
        return "Transformer Engine not installed"
    cap = torch.cuda.get_device_capability()
    if cap < (8, 9):
        return f"compute capability {cap[0]}.{cap[1]} < 8.9"
    missing = [r for r in ("delayed", "tensorwise") if not fp8_recipe_support(r, cap)[0]]
    return f"recipes not supported here: {missing}" if missing else ""


def check_fp8(report: Report, args) -> None:
    start = time.time()
    why = _te_fp8_ok()
    if why:
        report.section("bf16 vs FP8", f"skipped: {why}")
        report.step("fp8", "skipped", time.time() - start, why)
        return
    variants = {"bf16": [], "fp8-delayed": ["--fp8-format", "hybrid", "--fp8-recipe", "delayed"],
                "fp8-tensorwise": ["--fp8-format", "hybrid", "--fp8-recipe", "tensorwise"]}
    table, bad = [], 0
    for depth in (1, 2):
        curves = {}
        for name, extra in variants.items():
            out = os.path.join(args.out, "fp8", f"mtp{depth}_{name}")
            rc, seconds, rows = _train(CURVE_MODEL + extra + [
                "--mtp-num-layers", str(depth), "--train-iters", str(args.steps)], out, nproc=1)
            curves[name] = (rc, seconds, rows)
        base = curves["bf16"][2]
        for name, (rc, seconds, rows) in curves.items():
            keys = ["lm loss"] + [f"mtp_{k} loss" for k in range(1, depth + 1)]
            cells = []
            for key in keys:
                if rc != 0 or len(rows) < 10 or len(base) < 10:
                    cells.append("-")
                    continue
                tail = sum(r[key] for r in rows[-10:]) / 10
                ref = sum(r[key] for r in base[-10:]) / 10
                gap = abs(tail - ref) / ref
                worst = max(abs(a[key] - b[key]) for a, b in zip(rows, base))
                cells.append(f"{rows[0][key]:.3f} → {tail:.3f} (tail gap {gap:.2%}, "
                             f"max step gap {worst:.3f})")
                bad += gap > CURVE_TAIL_REL_TOL
            bad += rc != 0
            step_s = seconds / max(1, len(rows))
            table.append(f"| D={depth} | {name} | {'ok' if rc == 0 else f'rc {rc}'} | "
                         f"{step_s:.2f} | " + " | ".join(cells) + " |")
    report.section(
        f"bf16 vs FP8, {args.steps} steps, same seed",
        "Loss: first → mean of the last 10 steps; tail gap vs bf16 must be "
        f"≤ {CURVE_TAIL_REL_TOL:.0%}.\n\n| MTP | run | status | s/step (incl. startup) | "
        "lm loss | mtp_1 loss | mtp_2 loss |\n|---|---|---|---|---|---|---|\n" + "\n".join(table))
    report.step("fp8", "ok" if not bad else f"{bad} over tolerance/failed", time.time() - start)


def check_parallel(report: Report, args) -> None:
    start, gpus = time.time(), _gpu_count()
    if gpus < 2:
        report.step("parallel", "skipped", 0, f"{gpus} GPU(s)")
        return
    layouts = {"tp2_sp_mtp2": ["--tensor-model-parallel-size", "2", "--sequence-parallel"],
               "pp2_mtp2": ["--pipeline-model-parallel-size", "2"]}
    from mtp_megatron.runtime.accel import te_available

    model = CURVE_MODEL if te_available() else [
        "local" if a == "transformer_engine" else a for a in CURVE_MODEL]
    rows, bad = [], 0
    for name, extra in layouts.items():
        out = os.path.join(args.out, "parallel", name)
        rc, seconds, steps = _train(model + extra + ["--mtp-num-layers", "2",
                                                           "--train-iters", "20"], out, nproc=2)
        bad += rc != 0 or len(steps) < 2 or steps[-1]["lm loss"] >= steps[0]["lm loss"]
        loss = f"{steps[0]['lm loss']:.3f} → {steps[-1]['lm loss']:.3f}" if steps else "-"
        rows.append(f"| {name} | {'ok' if rc == 0 else f'rc {rc}'} | {loss} | {seconds:.0f} |")
    report.section("TP2 / PP2 (20 steps, 2 GPUs)",
                   "| layout | status | lm loss | seconds |\n|---|---|---|---|\n" + "\n".join(rows))
    report.step("parallel", "ok" if not bad else f"{bad} FAILED", time.time() - start)


# The mission command's model, shortened for the resume and async checks.
SMOKE = ["--mtp-num-layers", "1", "--train-iters", "20", "--log-interval", "1",
         "--eval-iters", "0", "--mock-data"]


def check_mission(report: Report, args) -> None:
    """The README's mission command as a user runs it (its defaults: 200 iterations)."""
    out = os.path.join(args.out, "mission")
    rc, seconds, steps = _train(["--mtp-num-layers", "1"], out, nproc=1)
    ok = rc == 0 and len(steps) >= 2 and steps[-1]["lm loss"] < steps[0]["lm loss"]
    loss = f"{steps[0]['lm loss']:.3f} → {steps[-1]['lm loss']:.3f}" if steps else "-"
    report.section("Mission command (`torchrun launch/pretrain_gpt_mtp.py --mtp-num-layers 1`)",
                   f"lm loss {loss}\n\n" + _tail(os.path.join(out, "train.log"), 6))
    report.step("mission", "ok" if ok else f"FAILED (rc {rc})", seconds, f"lm loss {loss}")


def _losses(rows, first: int) -> List[float]:
    return [r["lm loss"] for r in rows if r["iteration"] > first]


def check_resume(report: Report, args) -> None:
    """bf16 + distributed optimizer: straight 20 steps vs 10, save, stop, resume to 20."""
    start = time.time()
    base = SMOKE + ["--bf16", "--use-distributed-optimizer", "--save-interval", "10"]
    straight_dir, split_dir = (os.path.join(args.out, "resume", n) for n in ("straight", "split"))
    rc1, _, straight = _train(base + ["--save", os.path.join(straight_dir, "ck")],
                              straight_dir, nproc=1)
    rc2, _, _ = _train(base + ["--save", os.path.join(split_dir, "ck"), "--exit-interval", "10"],
                       split_dir, nproc=1)
    rc3, _, resumed = _train(base + ["--save", os.path.join(split_dir, "ck")],
                             split_dir + "-resumed", nproc=1)
    a, b = _losses(straight, 10), _losses(resumed, 10)
    gap = max((abs(x - y) for x, y in zip(a, b)), default=float("nan"))
    ok = (rc1, rc2, rc3) == (0, 0, 0) and len(a) == len(b) == 10 and gap <= 1e-2
    note = f"iterations 11-20, max |straight - resumed| lm loss {gap:.2e}"
    report.section("bf16 + distributed optimizer: save at 10, resume to 20",
                   f"{note} (bit-exact on CPU; GPU kernels may reorder sums)\n\n"
                   + _tail(os.path.join(split_dir + "-resumed", "train.log"), 6))
    report.step("resume", "ok" if ok else f"FAILED (rc {rc1},{rc2},{rc3})", time.time() - start,
                note)


def check_async(report: Report, args) -> None:
    """--async-save: the checkpoints commit in the background and a run resumes from them."""
    start = time.time()
    out = os.path.join(args.out, "async")
    ck = os.path.join(out, "ck")
    rc1, _, _ = _train(SMOKE + ["--async-save", "--save", ck, "--save-interval", "5"], out,
                       nproc=1)
    tracker = os.path.join(ck, "latest_checkpointed_iteration.txt")
    latest = open(tracker).read().strip() if os.path.exists(tracker) else "none"
    rc2, _, resumed = _train(SMOKE + ["--save", ck, "--train-iters", "22"], out + "-resumed",
                             nproc=1)
    first = resumed[0]["iteration"] if resumed else None
    ok = (rc1, rc2) == (0, 0) and latest == "20" and first == 21
    note = f"tracker {latest}, resumed at iteration {first}"
    report.section("Async save", note + "\n\n" + _tail(os.path.join(out, "train.log"), 6))
    report.step("async", "ok" if ok else f"FAILED (rc {rc1},{rc2})", time.time() - start, note)


def check_benchmark(report: Report, args) -> None:
    script = os.path.join(ROOT, "benchmarks", "train_throughput.py")
    if not os.path.exists(script):
        report.step("benchmark", "skipped", 0, "benchmarks/train_throughput.py not present")
        return
    log = os.path.join(args.out, "benchmark.log")
    rc, seconds = _run([sys.executable, script, *args.benchmark_args.split()], log, 3600)
    report.section("Throughput benchmark (`benchmarks/train_throughput.py`)", _tail(log, 40))
    report.step("benchmark", "ok" if rc == 0 else f"FAILED (rc {rc})", seconds)


CHECKS = {"env": check_env, "tests": check_tests, "examples": check_examples,
          "fp8": check_fp8, "parallel": check_parallel, "mission": check_mission,
          "resume": check_resume, "async": check_async, "benchmark": check_benchmark}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.path.join(ROOT, "runs", "gpu-check"))
    parser.add_argument("--only", default=",".join(STEPS),
                        help=f"comma-separated subset of {','.join(STEPS)}")
    parser.add_argument("--steps", type=int, default=100, help="bf16 vs FP8 curve length")
    parser.add_argument("--benchmark-args", default="",
                        help="extra flags for benchmarks/train_throughput.py (GPU shapes)")
    args = parser.parse_args(argv)
    args.out = os.path.abspath(args.out)
    report = Report(args.out)
    for name in args.only.split(","):
        if name not in CHECKS:
            parser.error(f"--only: unknown step {name!r}; choose from {', '.join(STEPS)}")
        try:
            CHECKS[name](report, args)
        except Exception as exc:  # one broken step must not hide the others
            report.step(name, "ERROR", 0, f"{type(exc).__name__}: {exc}"[:200])
    print(f"report: {os.path.join(args.out, 'report.md')}")
    failed = [r for r in report.rows if r[1] not in ("ok", "skipped")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

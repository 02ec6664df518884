"""What a baseline-vs-MTP experiment trains: the spec (flags or YAML) and its runs.

Every run of one seed shares the model, data, schedule shape and ``--seed``; they
differ only in the MTP objective (``--mtp-num-layers``, ``--mtp-loss-scaling-factor``,
``--mtp-depth-weights``, the factor schedule) and, for the equal-FLOPs baselines,
``--train-iters``. The MTP variants are every depth with the first factor, depth
weights and schedule, plus the remaining factors and schedules at the first depth and
the remaining depth weights at the deepest depth; ``full_grid`` trains every
combination instead.

Factor schedules (``--mtp-factor-schedules``) are written ``constant``, ``warmup:N``,
``step:F@N``, ``linear:F@N``, ``cosine:F@N`` (decay to F, ending at iteration N) or a
warmup and a decay joined by ``+`` (``warmup:20+cosine:0.1@200``).

    spec = load_spec(["--seeds", "2", "--train-iters", "100"])
    runs = plan_runs(spec, {1: 1.12, 2: 1.25})   # FLOP ratios from experiments.flops
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import yaml

from mtp_megatron.config import ConfigError
from mtp_megatron.config.mtp import DEPTH_WEIGHT_SCHEMES, MTPConfig

# A small Llama-shaped model (the launcher's defaults: SwiGLU, RMSNorm, RoPE, no biases)
# on the embedded corpus; one run is ~1 minute on 2 idle CPU cores. The MLP width is
# pinned to 512 (the launcher's default is now Megatron-LM's 320 for h=128), the width
# docs/results.md was measured with.
DEFAULT_LAUNCHER_ARGS: Tuple[str, ...] = (
    "--num-layers", "4", "--hidden-size", "128", "--num-attention-heads", "4",
    "--ffn-hidden-size", "512",
    "--seq-length", "128", "--micro-batch-size", "16", "--global-batch-size", "16",
    "--lr", "3e-3", "--min-lr", "3e-4",
)
# Flags the experiment sets per run; passing them through would break the comparison.
OWNED_FLAGS = ("--mtp-num-layers", "--mtp-loss-scaling-factor", "--mtp-depth-weights",
               "--mtp-loss-scaling-factor-warmup-iters", "--mtp-loss-scaling-factor-final",
               "--mtp-loss-scaling-factor-decay-style", "--mtp-loss-scaling-factor-decay-iters",
               "--train-iters", "--seed",
               "--output-dir", "--save", "--load", "--eval-interval", "--eval-iters",
               "--log-interval", "--lr-decay-iters", "--config")
SCHEDULES_FLAG = "--mtp-factor-schedules"
_SCHEDULE_ALLOWED = ("constant, warmup:N, step:F@N, linear:F@N, cosine:F@N, or a warmup and "
                     "a decay joined by '+' (warmup:20+cosine:0.1@200)")
# The same settings in a launcher YAML (section -> keys; None: the whole section).
OWNED_YAML = {"mtp": None, "checkpoint": ("save", "load"),
              "logging": ("output_dir", "log_interval"),
              "training": ("train_iters", "seed", "lr_decay_iters"),
              "data": ("eval_interval", "eval_iters")}


@dataclass(frozen=True)
class ExperimentSpec:
    """The experiment's settings (``python -m mtp_megatron.experiments.compare --help``)."""

    out_dir: str = "runs/compare"
    depths: Tuple[int, ...] = (1, 2)
    factors: Tuple[float, ...] = (0.1, 0.3)
    depth_weights: Tuple[str, ...] = ("uniform",)
    factor_schedules: Tuple[str, ...] = ("constant",)
    full_grid: bool = False
    seeds: int = 2
    base_seed: int = 1234
    train_iters: int = 200
    eval_interval: int = 50
    eval_iters: int = 8
    log_interval: int = 10
    nproc_per_node: int = 1
    threads: Optional[int] = None  # OMP_NUM_THREADS of every rank (None: torch's default)
    launcher_config: Optional[str] = None  # a launcher YAML (model, parallel, data, ...)
    launcher_args: Tuple[str, ...] = DEFAULT_LAUNCHER_ARGS
    equal_flops: bool = True
    speculative: bool = True
    prompts: int = 8
    prompt_bytes: int = 64
    max_new_tokens: int = 64

    def __post_init__(self):
        for name in ("depths", "factors", "depth_weights", "factor_schedules", "launcher_args"):
            value = getattr(self, name)
            if isinstance(value, str):
                value = value.split()
            object.__setattr__(self, name, tuple(value))
        object.__setattr__(self, "depths", tuple(int(d) for d in self.depths))
        object.__setattr__(self, "factors", tuple(float(f) for f in self.factors))
        if not self.depths or min(self.depths) < 1:
            raise ConfigError("--mtp-num-layers", list(self.depths), "one or more depths >= 1")
        if len(set(self.depths)) != len(self.depths):
            raise ConfigError("--mtp-num-layers", list(self.depths), "distinct depths")
        if not self.factors or min(self.factors) <= 0:
            raise ConfigError("--mtp-loss-scaling-factor", list(self.factors),
                              "one or more factors > 0")
        self._check_objectives()
        for name, low in (("seeds", 1), ("train_iters", 1), ("eval_interval", 1),
                          ("eval_iters", 1), ("log_interval", 1), ("nproc_per_node", 1),
                          ("prompts", 1), ("prompt_bytes", 1), ("max_new_tokens", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or value < low:
                raise ConfigError("--" + name.replace("_", "-"), value, f"an integer >= {low}")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise ConfigError("--threads", self.threads, "an integer >= 1 (or unset)")
        if self.launcher_config:
            check_launcher_yaml(self.launcher_config)
        for arg in self.launcher_args:
            flag = arg.split("=")[0]
            if flag in OWNED_FLAGS:
                raise ConfigError(flag, arg, "set by the experiment, not in the launcher flags",
                                  "use the experiment's own option (see --help)")

    def _check_objectives(self) -> None:
        for flag, values in (("--mtp-depth-weights", self.depth_weights),
                             (SCHEDULES_FLAG, self.factor_schedules)):
            if not values or len(set(values)) != len(values):
                raise ConfigError(flag, list(values), "one or more distinct values")
        for schedule in self.factor_schedules:
            schedule_flags(schedule)
        for depth, _, weights, _ in self.variants():  # each list fits its depth
            MTPConfig(mtp_num_layers=depth, mtp_depth_weights=weights)

    @property
    def seed_list(self) -> List[int]:
        return [self.base_seed + i for i in range(self.seeds)]

    def variants(self) -> List[Tuple[int, float, str, str]]:
        """The MTP (depth, factor, depth weights, factor schedule) to train."""
        weights, schedules = self.depth_weights, self.factor_schedules
        if self.full_grid:
            return [(d, f, w, s) for d in self.depths for f in self.factors
                    for w in weights for s in schedules]
        first = (self.depths[0], self.factors[0])
        out = [(d, self.factors[0], weights[0], schedules[0]) for d in self.depths]
        out += [(first[0], f, weights[0], schedules[0]) for f in self.factors[1:]]
        out += [(max(self.depths), first[1], w, schedules[0]) for w in weights[1:]]
        return out + [(*first, weights[0], s) for s in schedules[1:]]


@dataclass(frozen=True)
class RunSpec:
    """One training run: ``depth`` 0 is a baseline; ``flops_depth`` marks an
    equal-FLOPs baseline (trained as long as a D=``flops_depth`` run costs)."""

    seed: int
    depth: int
    factor: Optional[float]
    train_iters: int
    flops_depth: Optional[int] = None
    depth_weights: str = "uniform"
    schedule: str = "constant"

    @property
    def variant(self) -> str:
        """The name shared by every seed of this run."""
        if self.depth == 0:
            if self.flops_depth is None:
                return "baseline"
            return f"baseline_eqflops_d{self.flops_depth}"
        name = f"mtp_d{self.depth}_f{self.factor:g}"
        if self.depth_weights != "uniform":
            weights = self.depth_weights
            name += "_" + (weights if weights in DEPTH_WEIGHT_SCHEMES
                           else "w" + weights.replace(",", "-"))
        if self.schedule != "constant":
            name += "_" + self.schedule.replace(":", "").replace("@", "at").replace("+", "_")
        return name

    @property
    def name(self) -> str:
        return f"seed{self.seed}/{self.variant}"

    def directory(self, out_dir: str) -> str:
        return os.path.join(out_dir, "runs", self.name)

    def launcher_args(self, spec: ExperimentSpec, out_dir: Optional[str] = None) -> List[str]:
        """The launcher flags of this run (after the spec's shared ones)."""
        run_dir = self.directory(out_dir or spec.out_dir)
        args = list(spec.launcher_args)
        if spec.launcher_config:
            args = ["--config", spec.launcher_config] + args
        args += ["--seed", str(self.seed), "--train-iters", str(self.train_iters),
                 "--eval-interval", str(spec.eval_interval), "--eval-iters", str(spec.eval_iters),
                 "--log-interval", str(spec.log_interval), "--output-dir", run_dir]
        if self.depth:
            args += ["--mtp-num-layers", str(self.depth),
                     "--mtp-loss-scaling-factor", repr(self.factor)]
            if self.depth_weights != "uniform":
                args += ["--mtp-depth-weights", self.depth_weights]
            args += schedule_flags(self.schedule)
            if spec.speculative:
                args += ["--save", os.path.join(run_dir, "checkpoints")]
        return args


def plan_runs(spec: ExperimentSpec, baseline_iters: Dict[int, int]) -> List[RunSpec]:
    """Every run, seed by seed: the baseline, the MTP variants, the equal-FLOPs baselines.

    ``baseline_iters[D]``: the iterations of a baseline that costs what a D-depth run of
    ``spec.train_iters`` costs (``experiments.flops.equal_flops_iters``).
    """
    runs = []
    for seed in spec.seed_list:
        runs.append(RunSpec(seed, 0, None, spec.train_iters))
        runs += [RunSpec(seed, d, f, spec.train_iters, depth_weights=w, schedule=s)
                 for d, f, w, s in spec.variants()]
        if spec.equal_flops:
            runs += [RunSpec(seed, 0, None, baseline_iters[d], flops_depth=d)
                     for d in sorted(set(spec.depths))]
    return runs


def schedule_flags(text: str) -> List[str]:
    """The launcher flags of a factor schedule (module docstring); ConfigError naming
    --mtp-factor-schedules if it is not one."""
    if text == "constant":
        return []
    flags: Dict[str, str] = {}
    for part in text.split("+"):
        kind, _, value = part.partition(":")
        try:
            if kind == "warmup" and "warmup" not in flags:
                flags["warmup"] = str(int(value))
            elif kind in ("step", "linear", "cosine") and "style" not in flags:
                final, _, end = value.partition("@")
                flags.update(style=kind, final=repr(float(final)), end=str(int(end)))
            else:
                raise ValueError(part)
        except ValueError:
            raise ConfigError(SCHEDULES_FLAG, text, _SCHEDULE_ALLOWED) from None
    out = []
    if "warmup" in flags:
        out += ["--mtp-loss-scaling-factor-warmup-iters", flags["warmup"]]
    if "style" in flags:
        out += ["--mtp-loss-scaling-factor-final", flags["final"],
                "--mtp-loss-scaling-factor-decay-style", flags["style"],
                "--mtp-loss-scaling-factor-decay-iters", flags["end"]]
    return out


def check_launcher_yaml(path: str) -> None:
    """A launcher YAML shared by every run must leave the experiment's settings alone
    (a YAML ``mtp`` section would give the baseline MTP layers)."""
    if not os.path.isfile(path):
        raise ConfigError("launcher_config", path, "an existing launcher YAML file")
    with open(path) as fh:
        body = yaml.safe_load(fh) or {}
    for section, keys in OWNED_YAML.items():
        found = sorted(body.get(section) or {}) if keys is None else \
            sorted(k for k in (body.get(section) or {}) if k in keys)
        if found:
            raise ConfigError("launcher_config", path,
                              f"no {section}: {', '.join(found)} (the experiment sets it per run)",
                              "remove it from the YAML; use the experiment's options")


# -- flags and YAML ----------------------------------------------------------------------
_HELP = {
    "out_dir": "Directory of the runs, results.json, results.md and the PNGs.",
    "depths": "MTP depths to train (--mtp-num-layers of each MTP run).",
    "factors": "MTP loss weights: every depth gets the first; the others are swept at the "
               "first depth (or every depth with --full-grid).",
    "depth_weights": "--mtp-depth-weights of the MTP runs: the first for every run, the "
                     "others at the deepest depth (uniform, linear, exponential, W1,W2,...).",
    "factor_schedules": "Factor schedules: the first for every run, the others at the first "
                        "depth: " + _SCHEDULE_ALLOWED + ".",
    "full_grid": "Train every (depth, factor) pair.",
    "seeds": "Seeds per run (mean +- std over them).",
    "base_seed": "The first seed (seeds are base, base+1, ...).",
    "train_iters": "Iterations of the baseline and MTP runs (equal tokens).",
    "eval_interval": "Validate every N iterations (the loss curves).",
    "eval_iters": "Global batches per validation.",
    "log_interval": "Training log interval (step time is averaged per interval).",
    "nproc_per_node": "torchrun --nproc-per-node of every run (any TP/PP/DP layout).",
    "threads": "OMP_NUM_THREADS of every rank and of the decoding (default: torch's); 1 "
               "keeps step times steady on a CPU shared with other work.",
    "launcher_config": "A launcher YAML (model, parallel, data, ...) shared by every run.",
    "equal_flops": "Also train baselines for the MTP runs' training FLOPs.",
    "speculative": "Save MTP checkpoints and measure self-speculative decoding.",
    "prompts": "Held-out prompts for speculative decoding.",
    "prompt_bytes": "Bytes per held-out prompt (embedded corpus).",
    "max_new_tokens": "Tokens generated per prompt.",
}
_FLAGS = {"depths": "--mtp-num-layers", "factors": "--mtp-loss-scaling-factor",
          "depth_weights": "--mtp-depth-weights", "factor_schedules": SCHEDULES_FLAG}


def flag_name(name: str) -> str:
    return _FLAGS.get(name, "--" + name.replace("_", "-"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m mtp_megatron.experiments.compare", allow_abbrev=False,
        description="Train a baseline and MTP runs like for like and report what MTP buys. "
                    "Launcher flags (model, data, parallel layout) go after '--'.",
    )
    parser.add_argument("--config", help="An experiment YAML (keys: the options below, "
                                          "with underscores; launcher_args: a list).")
    parser.add_argument("--prompt-file", help="Held-out prompts, one per line (default: snippets "
                                              "of the embedded corpus's validation files).")
    parser.add_argument("--report-only", action="store_true",
                        help="Write the report from the finished runs; train nothing.")
    for f in dataclasses.fields(ExperimentSpec):
        if f.name == "launcher_args":
            continue
        kwargs = {"dest": f.name, "default": argparse.SUPPRESS, "help": _HELP[f.name]}
        if f.name in ("depths", "factors", "depth_weights", "factor_schedules"):
            kwargs.update(nargs="+", type={"depths": int, "factors": float}.get(f.name, str))
        elif f.type in ("bool",):
            kwargs.update(action=argparse.BooleanOptionalAction)
        elif f.type in ("int", "Optional[int]"):
            kwargs.update(type=int)
        parser.add_argument(flag_name(f.name), **kwargs)
    return parser


def read_spec_yaml(path: str) -> Dict:
    if not os.path.isfile(path):
        raise ConfigError("--config", path, "an existing experiment YAML file")
    with open(path) as fh:
        body = yaml.safe_load(fh) or {}
    known = {f.name for f in dataclasses.fields(ExperimentSpec)}
    unknown = sorted(set(body) - known)
    if unknown:
        raise ConfigError("--config", path, f"only the keys {', '.join(sorted(known))}",
                          f"remove {', '.join(unknown)}")
    return body


def load_spec(argv: Sequence[str]) -> Tuple[ExperimentSpec, argparse.Namespace]:
    """Defaults < YAML < flags; launcher flags after ``--`` replace the default model."""
    argv = list(argv)
    passthrough = None
    if "--" in argv:
        cut = argv.index("--")
        argv, passthrough = argv[:cut], argv[cut + 1:]
    args = build_parser().parse_args(argv)
    values = read_spec_yaml(args.config) if args.config else {}
    names = {f.name for f in dataclasses.fields(ExperimentSpec)}
    values.update({k: v for k, v in vars(args).items() if k in names})
    if passthrough is not None:
        values["launcher_args"] = passthrough
    elif values.get("launcher_config") and "launcher_args" not in values:
        values["launcher_args"] = ()  # the YAML's model, not the small default one
    return ExperimentSpec(**values), args

"""The baseline-vs-MTP experiment's logic on synthetic metrics (no training).

A fake launcher writes the metrics.jsonl a run would write, so the orchestration,
resumability, the like-for-like loss selection, the JSON document and the PNGs are
checked in about a second. tests/functional/test_compare.py runs it for real, once.
"""

from __future__ import annotations

import json
import math
import os

import pytest

from mtp_megatron.config import ConfigError
from mtp_megatron.experiments import collect, compare, flops, report, runner
from mtp_megatron.experiments.spec import ExperimentSpec, RunSpec, load_spec, plan_runs
from mtp_megatron.training.writers import read_rows, read_run

FLOPS = {0: 100.0, 1: 130.0, 2: 160.0}  # per token: D=1 costs 1.3x, D=2 1.6x
TOKENS_PER_STEP = 1000


def _arg(command, flag, default=None):
    return command[command.index(flag) + 1] if flag in command else default


def synthetic_loss(iteration, depth, factor, seed):
    """Valid lm loss of the fake runs: MTP slightly better per token; seed noise."""
    return 3.0 - 0.002 * iteration - 0.01 * depth * (1 + factor) + 0.001 * (seed % 7)


class FakeLauncher:
    """Stands in for torchrun: writes metrics.jsonl like the trainer and evaluator do."""

    def __init__(self):
        self.launches = []

    def __call__(self, command, log_path, threads=None):
        self.launches.append(command)
        iters = int(_arg(command, "--train-iters"))
        every = int(_arg(command, "--eval-interval"))
        depth = int(_arg(command, "--mtp-num-layers", 0))
        factor = float(_arg(command, "--mtp-loss-scaling-factor", 0))
        seed = int(_arg(command, "--seed"))
        out = _arg(command, "--output-dir")
        flops_per_token = FLOPS[depth]
        ms = 10.0 * flops_per_token / 100.0 * (1.05 if depth else 1.0)
        with open(os.path.join(out, "metrics.jsonl"), "a") as fh:
            for it in range(10, iters + 1, 10):
                row = {"iteration": it, "lm loss": 9.0, "lr": 1e-3, "grad norm": 1.0,
                       "tokens/s": TOKENS_PER_STEP / (ms / 1000), "ms/iter": ms,
                       "TFLOP/s": TOKENS_PER_STEP / (ms / 1000) * flops_per_token / 1e12,
                       "skipped": 0, "max RSS MiB": 400.0 + 10 * depth}
                for k in range(1, depth + 1):
                    row[f"mtp_{k} loss"] = 9.5
                fh.write(json.dumps(row) + "\n")
            for it in sorted(set(range(every, iters + 1, every)) | {iters}):
                loss = synthetic_loss(it, depth, factor, seed)
                row = {"iteration": it, "split": "valid", "lm loss": loss,
                       "lm PPL": math.exp(loss), "lm accuracy": 0.3}
                for k in range(1, depth + 1):
                    row[f"mtp_{k} loss"] = loss + 0.3 * k
                    row[f"mtp_{k} acceptance"] = 0.3 - 0.05 * k
                    if k > 1:
                        row[f"chained_{k} acceptance"] = 0.1
                fh.write(json.dumps(row) + "\n")
        return 0


@pytest.fixture
def fake(monkeypatch):
    launcher = FakeLauncher()
    monkeypatch.setattr(runner, "launch", launcher)
    monkeypatch.setattr(flops, "per_token_flops", lambda args, depths, world_size=1: FLOPS)
    return launcher


def small_spec(tmp_path, **kw):
    values = dict(out_dir=str(tmp_path / "cmp"), seeds=2, train_iters=100, eval_interval=50,
                  speculative=False)
    values.update(kw)
    return ExperimentSpec(**values)


# -- equal FLOPs ------------------------------------------------------------------------
def test_equal_flops_arithmetic():
    assert flops.flop_ratio(FLOPS, 1) == pytest.approx(1.3)
    assert flops.equal_flops_iters(200, 1.3) == 260
    assert flops.equal_flops_iters(200, 1.6133) == 323
    with pytest.raises(ValueError):
        flops.equal_flops_iters(200, 0.9)
    spec = ExperimentSpec(seeds=1, train_iters=200, depths=(1, 2), factors=(0.1,))
    runs = plan_runs(spec, {1: 260, 2: 323})
    assert [(r.variant, r.train_iters) for r in runs] == [
        ("baseline", 200), ("mtp_d1_f0.1", 200), ("mtp_d2_f0.1", 200),
        ("baseline_eqflops_d1", 260), ("baseline_eqflops_d2", 323)]


def test_per_token_flops_matches_the_trainers_count():
    """The planned ratio is counting.flops_per_token's, for the launcher's own config."""
    from mtp_megatron.config import load_config
    from mtp_megatron.model.counting import flops_per_token

    args = ["--mock-data", "--vocab-size", "512", "--num-layers", "2", "--hidden-size", "64",
            "--num-attention-heads", "4", "--seq-length", "64"]
    got = flops.per_token_flops(args, [1, 2])
    cfg, _ = load_config(args + ["--mtp-num-layers", "2"], 1)
    assert got[2] == flops_per_token(cfg, 512)["total"]
    assert got[0] == flops_per_token(cfg, 512, with_mtp=False)["total"]
    # one MTP depth = one decoder layer + eh_proj (2h x h) + one more output head
    h, v, layer = 64, 512, (got[0] / 3 - 2 * 64 * 512) / 2
    assert got[1] - got[0] == pytest.approx(3 * (layer + 2 * 2 * h * h + 2 * h * v))


# -- like for like ------------------------------------------------------------------------
def test_compares_main_head_validation_loss_never_the_objective(tmp_path):
    """Valid lm 2.0 vs baseline 2.1: -0.1. The objective (2.0 + 0.3 * 3.0 = 2.9) would
    give +0.8 and the training lm loss (1.5) -0.6: both must not be reported."""
    rows = {
        "baseline": [{"iteration": 10, "lm loss": 1.7, "tokens/s": 1e3, "ms/iter": 1e3,
                      "TFLOP/s": 1e-9},
                     {"iteration": 10, "split": "valid", "lm loss": 2.1}],
        "mtp": [{"iteration": 10, "lm loss": 1.5, "mtp_1 loss": 3.0, "tokens/s": 1e3,
                 "ms/iter": 1e3, "TFLOP/s": 1e-9},
                {"iteration": 10, "split": "valid", "lm loss": 2.0, "mtp_1 loss": 3.0,
                 "mtp_1 acceptance": 0.4}],
    }
    results = []
    for name, run in (("baseline", RunSpec(1, 0, None, 10)), ("mtp", RunSpec(1, 1, 0.3, 10))):
        d = tmp_path / name
        d.mkdir()
        (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[name]))
        results.append(collect.collect_run(run, str(d)))
    mtp = results[1]
    assert mtp["valid_lm_loss"] == 2.0
    assert mtp["train_objective"] == pytest.approx(1.5 + 0.3 * 3.0)
    assert mtp["valid_mtp_loss"] == [3.0] and mtp["acceptance"] == [0.4]
    delta = report.summarize(results, {1: 1.3})["variants"]["mtp_d1_f0.3"]["delta_equal_tokens"]
    assert delta["mean"] == pytest.approx(-0.1)


# -- orchestration, resumability, JSON, PNGs ---------------------------------------------
def test_experiment_resumes_without_retraining(tmp_path, fake):
    spec = small_spec(tmp_path)
    compare.run_experiment(spec, command="test")
    # per seed: baseline, D1 f0.1, D2 f0.1, D1 f0.3, equal-FLOPs baselines for D1 and D2
    assert len(fake.launches) == 12
    metrics = [os.path.join(r.directory(spec.out_dir), "metrics.jsonl")
               for r in plan_runs(spec, {1: 130, 2: 160})]
    mtimes = [os.path.getmtime(p) for p in metrics]
    compare.run_experiment(spec, command="test")
    assert len(fake.launches) == 12, "a finished run was trained again"
    assert [os.path.getmtime(p) for p in metrics] == mtimes
    # an unfinished run (no DONE.json) is wiped and retrained; a third seed adds six runs
    os.remove(os.path.join(os.path.dirname(metrics[0]), runner.DONE))
    compare.run_experiment(small_spec(tmp_path, seeds=3), command="test")
    assert len(fake.launches) == 12 + 1 + 6
    train_rows, _ = read_run(metrics[0])
    assert len(train_rows) == 10, "the retrained run's metrics.jsonl kept the old rows"


def test_results_json_schema_and_pngs(tmp_path, fake):
    spec = small_spec(tmp_path)
    doc = compare.run_experiment(spec, command="python -m mtp_megatron.experiments.compare")
    with open(os.path.join(spec.out_dir, "results.json")) as fh:
        on_disk = json.load(fh)
    assert on_disk["schema_version"] == report.SCHEMA_VERSION == doc["schema_version"]
    for key in ("command", "wall_seconds", "load_average", "environment", "spec",
                "flop_ratios", "variants", "runs", "train_wall_seconds"):
        assert key in on_disk, key
    assert on_disk["flop_ratios"] == {"0": 1.0, "1": 1.3, "2": 1.6}
    assert len(on_disk["load_average"]) == 3
    variants = on_disk["variants"]
    assert set(variants) == {"baseline", "mtp_d1_f0.1", "mtp_d2_f0.1", "mtp_d1_f0.3",
                             "baseline_eqflops_d1", "baseline_eqflops_d2"}
    d2 = variants["mtp_d2_f0.1"]
    assert d2["seeds"] == [1234, 1235]
    assert variants["baseline_eqflops_d2"]["train_iters"]["mean"] == 160
    # paired by seed: the seed noise cancels, the std is zero
    assert d2["delta_equal_tokens"]["mean"] == pytest.approx(-0.022)
    assert d2["delta_equal_tokens"]["std"] == pytest.approx(0.0, abs=1e-12)
    assert d2["delta_equal_flops"]["mean"] == pytest.approx(-0.022 + 0.002 * 60)
    assert d2["step_time_ratio"]["mean"] == pytest.approx(1.6 * 1.05)
    assert d2["tokens_per_s_ratio"]["mean"] == pytest.approx(1 / (1.6 * 1.05))
    assert d2["flop_ratio"] == pytest.approx(1.6)
    assert [s["mean"] for s in d2["acceptance"]] == pytest.approx([0.25, 0.2])
    assert [s["mean"] for s in d2["chained_acceptance"]] == pytest.approx([0.25, 0.1])
    assert d2["peak_rss_mib"]["mean"] == 420.0
    loss = variants["baseline"]["valid_lm_loss"]
    assert loss["n"] == 2 and loss["std"] == pytest.approx(0.001 / math.sqrt(2))
    for png in ("valid_loss.png", "acceptance.png"):
        with open(os.path.join(spec.out_dir, png), "rb") as fh:
            assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    md = open(os.path.join(spec.out_dir, "results.md")).read()
    assert "| mtp_d2_f0.1 | 2 | 0.1 |" in md and "![valid_loss.png]" in md


def test_spec_flags_yaml_and_errors(tmp_path):
    spec, _ = load_spec(["--mtp-num-layers", "1", "3", "--mtp-loss-scaling-factor", "0.2",
                         "--seeds", "3", "--no-equal-flops", "--threads", "1", "--",
                         "--num-layers", "2"])
    assert spec.depths == (1, 3) and spec.factors == (0.2,) and spec.seeds == 3
    assert spec.threads == 1
    assert not spec.equal_flops and spec.launcher_args == ("--num-layers", "2")
    assert ExperimentSpec(factors=(0.1, 0.3), depths=(1, 2), full_grid=True).variants() == [
        (d, f, "uniform", "constant") for d, f in ((1, 0.1), (1, 0.3), (2, 0.1), (2, 0.3))]
    path = tmp_path / "exp.yaml"
    path.write_text("seeds: 1\nlauncher_config: examples/compare_gpu_model.yaml\n")
    spec, _ = load_spec(["--config", str(path), "--train-iters", "7"])
    assert (spec.seeds, spec.train_iters, spec.launcher_args) == (1, 7, ())
    spec, _ = load_spec(["--config", "examples/experiments/compare_gpu.yaml"])
    assert spec.nproc_per_node == 8 and spec.launcher_args == ()
    # a launcher YAML with an mtp section would give the baseline MTP layers
    path.write_text("launcher_config: examples/tiny_cpu_mtp2.yaml\n")
    with pytest.raises(ConfigError, match="mtp: mtp_loss_scaling_factor, mtp_num_layers"):
        load_spec(["--config", str(path)])
    path.write_text("seed: 1\n")
    with pytest.raises(ConfigError, match="seed"):
        load_spec(["--config", str(path)])
    with pytest.raises(ConfigError, match="--mtp-num-layers"):
        load_spec(["--", "--mtp-num-layers", "2"])
    with pytest.raises(ConfigError, match="--mtp-loss-scaling-factor"):
        ExperimentSpec(factors=(0.0,))


def test_trainer_metrics_record_peak_memory(tmp_path):
    """metrics.jsonl rows carry the process's peak RSS (the cost table's memory column)."""
    from mtp_megatron.training.metrics import MetricsLogger, StepMetrics
    from mtp_megatron.training.writers import JsonlSink, MetricsWriter

    writer = MetricsWriter([JsonlSink(str(tmp_path / "metrics.jsonl"))])
    log = MetricsLogger(log_interval=1, train_iters=1, tokens_per_step=10, flops_per_token=1.0,
                        is_logging_rank=True, writer=writer)
    log.record(StepMetrics(1, 2.0, [2.5], 1e-3, 1.0, 0.1))
    line = log.log()
    log.close()
    (row,) = read_rows(str(tmp_path))
    assert row["max RSS MiB"] > 10 and "max RSS" not in line


# -- depth weights and factor schedules ---------------------------------------------------
def test_sweeps_of_depth_weights_and_factor_schedules(tmp_path):
    spec, _ = load_spec(["--mtp-num-layers", "3", "--mtp-loss-scaling-factor", "0.3",
                         "--mtp-depth-weights", "uniform", "exponential", "2,1,1",
                         "--mtp-factor-schedules", "constant", "step:0.1@100",
                         "warmup:20+cosine:0.05@150", "--seeds", "1", "--no-equal-flops"])
    runs = plan_runs(spec, {})
    assert [r.variant for r in runs] == [
        "baseline", "mtp_d3_f0.3", "mtp_d3_f0.3_exponential", "mtp_d3_f0.3_w2-1-1",
        "mtp_d3_f0.3_step0.1at100", "mtp_d3_f0.3_warmup20_cosine0.05at150"]
    args = {r.variant: r.launcher_args(spec) for r in runs}
    assert "--mtp-depth-weights" not in args["mtp_d3_f0.3"]
    assert _arg(args["mtp_d3_f0.3_w2-1-1"], "--mtp-depth-weights") == "2,1,1"
    step = args["mtp_d3_f0.3_step0.1at100"]
    assert [_arg(step, "--mtp-loss-scaling-factor-" + f) for f in (
        "final", "decay-style", "decay-iters", "warmup-iters")] == ["0.1", "step", "100", None]
    both = args["mtp_d3_f0.3_warmup20_cosine0.05at150"]
    assert [_arg(both, "--mtp-loss-scaling-factor-" + f) for f in (
        "final", "decay-style", "decay-iters", "warmup-iters")] == ["0.05", "cosine", "150", "20"]
    compare.check_runs(spec, runs)  # every run's flags are a valid launcher config
    # weights are swept at the deepest depth, schedules at the first
    spec = ExperimentSpec(depths=(1, 2), factors=(0.1,), depth_weights=("uniform", "linear"),
                          factor_schedules=("constant", "warmup:10"))
    assert spec.variants() == [(1, 0.1, "uniform", "constant"), (2, 0.1, "uniform", "constant"),
                               (2, 0.1, "linear", "constant"), (1, 0.1, "uniform", "warmup:10")]


@pytest.mark.parametrize("values,flag", [
    ({"factor_schedules": ("step:0.1",)}, "--mtp-factor-schedules"),
    ({"factor_schedules": ("warmup:5+warmup:6",)}, "--mtp-factor-schedules"),
    ({"factor_schedules": ("exp:0.1@5",)}, "--mtp-factor-schedules"),
    ({"depth_weights": ("1,2",), "depths": (3,)}, "--mtp-depth-weights"),
    ({"depth_weights": ("uniform", "uniform")}, "--mtp-depth-weights"),
])
def test_bad_sweeps_name_the_option(values, flag):
    with pytest.raises(ConfigError, match=f"^{flag}="):
        ExperimentSpec(**values)


def test_a_schedule_that_does_not_fit_the_run_fails_before_training(tmp_path, fake):
    spec = small_spec(tmp_path, depths=(1,), factors=(0.3,), equal_flops=False,
                      factor_schedules=("constant", "warmup:500"))
    with pytest.raises(ConfigError, match="--mtp-loss-scaling-factor-warmup-iters=500"):
        compare.run_experiment(spec, command="test")
    assert fake.launches == []


def test_the_objective_of_a_weighted_scheduled_run():
    """train_objective uses the depth weights and the row's own (scheduled) factor."""
    row = {"lm loss": 2.0, "mtp_1 loss": 3.0, "mtp_2 loss": 4.0}
    assert collect.train_objective(row, 0.3) == pytest.approx(2.0 + 0.3 * 3.5)
    assert collect.train_objective(row, 0.3, "3,1") == pytest.approx(2.0 + 0.3 * 3.25)
    row["mtp_factor"] = 0.1
    assert collect.train_objective(row, 0.3, "linear") == pytest.approx(
        2.0 + 0.1 * (2 * 3.0 + 4.0) / 3)

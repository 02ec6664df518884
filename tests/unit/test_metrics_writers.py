"""The metrics pipeline: one writer and its sinks for training and validation, the log
line's elapsed time and ETA, and progress messages for slow phases (pure Python)."""

import json
import sys
import time
import types

import pytest

from mtp_megatron.config import LoggingConfig
from mtp_megatron.training.metrics import MetricsLogger, StepMetrics
from mtp_megatron.training.progress import phase
from mtp_megatron.training.writers import MetricsWriter


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


class Recorder:
    def __init__(self):
        self.rows, self.closed = [], False

    def write(self, row, split):
        self.rows.append((split, dict(row)))

    def close(self):
        self.closed = True


def _step(it, seconds=0.5):
    return StepMetrics(iteration=it, lm_loss=3.0, mtp_losses=[4.0], lr=1e-3, grad_norm=1.0,
                       seconds=seconds)


def _record(log, step):
    """What the trainer does: record every step, close the window when it is due."""
    log.record(step)
    return log.log() if log.due(step.iteration) else None


def test_log_line_has_elapsed_and_an_eta_from_the_recent_pace():
    clock, sink = FakeClock(), Recorder()
    log = MetricsLogger(log_interval=10, train_iters=100, tokens_per_step=256,
                        flops_per_token=1e6, is_logging_rank=True,
                        writer=MetricsWriter([sink]), clock=clock)
    for it in range(1, 11):
        clock.now += 3.0 if it == 1 else 1.0  # a slow first step
        line = _record(log, _step(it))
    assert line.startswith("iteration 10/100 | elapsed 0:00:12 | ETA 0:01:48 | lm loss")
    for it in range(11, 21):
        clock.now += 0.5
        line = _record(log, _step(it))
    assert "elapsed 0:00:17 | ETA 0:00:40 |" in line  # 80 left at the last 10's 0.5 s
    assert [row["tokens"] for _, row in sink.rows] == [2560, 5120]
    log.close()
    assert sink.closed


def test_eta_after_a_resume_counts_from_the_resumed_iteration():
    clock = FakeClock()
    log = MetricsLogger(log_interval=5, train_iters=100, tokens_per_step=1,
                        flops_per_token=1.0, is_logging_rank=True, clock=clock)
    for it in range(51, 56):
        clock.now += 2.0
        line = _record(log, _step(it))
    assert "elapsed 0:00:10 | ETA 0:01:30" in line  # 45 left x 2 s


def _fake_tensorboard(monkeypatch):
    scalars = []

    class SummaryWriter:
        def __init__(self, log_dir):
            self.log_dir = log_dir

        def add_scalar(self, tag, value, step):
            scalars.append((tag, value, step))

        def flush(self):
            pass

        def close(self):
            pass

    module = types.ModuleType("torch.utils.tensorboard")
    module.SummaryWriter = SummaryWriter
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", module)
    return scalars


def _fake_wandb(monkeypatch):
    calls = {"init": [], "log": [], "finished": False}

    class Run:
        def log(self, values, step):
            calls["log"].append((step, values))

        def finish(self):
            calls["finished"] = True

    module = types.ModuleType("wandb")
    module.init = lambda **kwargs: calls["init"].append(kwargs) or Run()
    monkeypatch.setitem(sys.modules, "wandb", module)
    return calls


def test_training_and_validation_reach_every_sink_with_the_same_scalars(tmp_path, monkeypatch):
    tb, wb = _fake_tensorboard(monkeypatch), _fake_wandb(monkeypatch)
    logs = LoggingConfig(output_dir=str(tmp_path / "run"), tensorboard_dir=str(tmp_path / "tb"),
                         wandb_project="proj")
    writer = MetricsWriter.for_run(logs, enabled=True, config={"mtp": {"mtp_num_layers": 1}})
    writer.write({"iteration": 10, "tokens": 640, "lm loss": 3.0, "mtp_1 loss": 4.0,
                  "grad norm": None, "skipped": 0})
    writer.write({"iteration": 10, "tokens": 640, "lm loss": 3.5, "mtp_1 acceptance": 0.25},
                 split="valid")
    writer.close()

    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert rows[0]["lm loss"] == 3.0 and "split" not in rows[0]
    assert rows[1] == {"iteration": 10, "split": "valid", "tokens": 640, "lm loss": 3.5,
                       "mtp_1 acceptance": 0.25}
    expected = {"lm loss": 3.0, "mtp_1 loss": 4.0, "skipped": 0.0,
                "lm loss validation": 3.5, "mtp_1 acceptance validation": 0.25}
    assert {tag: value for tag, value, step in tb} == expected
    assert {step for _, _, step in tb} == {10}
    logged = {k: v for _, values in wb["log"] for k, v in values.items() if k != "tokens"}
    assert logged == expected  # wandb gets what tensorboard gets
    assert wb["init"] == [{"project": "proj", "name": "run", "dir": str(tmp_path / "run" / "wandb"),
                           "config": {"mtp": {"mtp_num_layers": 1}}}]
    assert wb["finished"]


def test_only_the_logging_rank_writes(tmp_path):
    logs = LoggingConfig(output_dir=str(tmp_path / "run"))
    writer = MetricsWriter.for_run(logs, enabled=False)
    writer.write({"iteration": 1, "lm loss": 1.0})
    assert writer.sinks == [] and not (tmp_path / "run").exists()


def test_wandb_names_need_a_project():
    from mtp_megatron.config import ConfigError

    with pytest.raises(ConfigError, match="--wandb-exp-name.*only with --wandb-project"):
        LoggingConfig(wandb_exp_name="x")


def test_a_slow_phase_shows_a_heartbeat_and_its_duration():
    lines = []
    with phase("building datasets", log=lines.append, every=0.05):
        time.sleep(0.18)
    assert lines[0] == "building datasets ..."
    assert any(line.startswith("building datasets: still running (") for line in lines[1:-1])
    assert lines[-1].startswith("building datasets: done in 0.")
    with phase("first iteration (1)", log=lines.append, every=60):
        pass
    assert lines[-2:] == ["first iteration (1) ...", lines[-1]]  # no heartbeat when quick



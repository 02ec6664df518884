"""MTP depth weights and the factor schedule: config rules, values, the megatron-core hook.

Pure Python except the last tests, which import megatron-core (no process group): the
stand-in for ``MTPLossAutoScaler`` is put in the module megatron-core uses, multiplies
each depth's term, and is gone afterwards. Gradients against the reference are in
test_mtp_depth_weights.py (spawned ranks).
"""

from __future__ import annotations

import math

import pytest

from mtp_megatron.config import ConfigError, build_config, load_config
from mtp_megatron.training.mtp_weighting import FactorSchedule, depth_multipliers

MTP3 = {"mtp_num_layers": 3, "train_iters": 100}


def _cfg(**values):
    return build_config({}, dict(MTP3, **values), 1)


def _error(**values) -> str:
    with pytest.raises(ConfigError) as err:
        _cfg(**values)
    return str(err.value)


# -- depth weights ------------------------------------------------------------------------

@pytest.mark.parametrize("text,expected", [
    ("uniform", (1 / 3, 1 / 3, 1 / 3)),
    ("linear", (3 / 6, 2 / 6, 1 / 6)),
    ("exponential", (1 / 1.75, 0.5 / 1.75, 0.25 / 1.75)),
    ("2,1,3", (2 / 6, 1 / 6, 3 / 6)),
    (" 0.5, 0.25 ,0.25", (0.5, 0.25, 0.25)),
])
def test_weights_are_normalised_to_sum_to_one(text, expected):
    weights = _cfg(mtp_depth_weights=text).mtp.depth_weights()
    assert weights == pytest.approx(expected, rel=1e-15)
    assert math.fsum(weights) == pytest.approx(1.0, rel=1e-15)


def test_uniform_and_equal_weights_change_nothing():
    """No multiplier at all (megatron-core's own factor / D, bit for bit), for uniform and
    for any list of equal numbers; D * w_k otherwise."""
    for text in ("uniform", "1,1,1", "0.2,0.2,0.2"):
        assert depth_multipliers(_cfg(mtp_depth_weights=text).mtp) is None
    assert depth_multipliers(_cfg().mtp) is None
    assert depth_multipliers(_cfg(mtp_depth_weights="linear").mtp) == pytest.approx(
        (1.5, 1.0, 0.5), rel=1e-15)
    assert depth_multipliers(build_config({}, {}, 1).mtp) is None  # no MTP


def test_the_design_documents_table_maps_to_factor_and_weights():
    """docs/mtp-objective.md: lambda_1 is the next-token head's, lambda_2..4 are the depths'
    coefficients = factor * w_k."""
    table = {  # scheme: (lambda_2..4, factor, --mtp-depth-weights)
        "uniform": ((1, 1, 1), 3.0, "uniform"),
        "linear decay": ((0.75, 0.5, 0.25), 1.5, "linear"),
        "exponential": ((0.5, 0.25, 0.125), 0.875, "exponential"),
        "primary + aux": ((0.1, 0.1, 0.1), 0.3, "uniform"),
    }
    for name, (lambdas, factor, text) in table.items():
        mtp = _cfg(mtp_loss_scaling_factor=factor, mtp_depth_weights=text).mtp
        coefficients = [factor * w for w in mtp.depth_weights()]
        assert coefficients == pytest.approx(lambdas, rel=1e-12), name


def test_weights_from_the_command_line_and_a_yaml_list(tmp_path):
    cfg, _ = load_config(["--mtp-num-layers", "2", "--mtp-depth-weights", "3,1"])
    assert cfg.mtp.depth_weights() == (0.75, 0.25)
    path = tmp_path / "w.yaml"
    path.write_text("mtp:\n  mtp_num_layers: 2\n  mtp_depth_weights: [3, 1]\n")
    cfg, _ = load_config(["--config", str(path)])
    assert cfg.mtp.mtp_depth_weights == "3,1" and cfg.mtp.depth_weights() == (0.75, 0.25)


@pytest.mark.parametrize("text,words", [
    ("1,0,1", ["--mtp-depth-weights='1,0,1'", "0.0", "positive"]),
    ("1,-2,1", ["-2.0", "positive"]),
    ("1,nan,1", ["nan", "finite"]),
    ("1,inf,1", ["inf", "finite"]),
    ("1,2", ["3 numbers", "--mtp-num-layers=3", "2 given"]),
    ("1,2,3,4", ["3 numbers", "4 given"]),
    ("geometric", ["uniform, linear, exponential"]),
    ("1;2;3", ["uniform, linear, exponential"]),
])
def test_bad_weights_name_the_flag_and_what_is_allowed(text, words):
    message = _error(mtp_depth_weights=text)
    assert message.startswith("--mtp-depth-weights=")
    for word in words:
        assert word in message


@pytest.mark.parametrize("flag,values", [
    ("--mtp-depth-weights", {"mtp_depth_weights": "linear"}),
    ("--mtp-loss-scaling-factor-warmup-iters", {"mtp_loss_scaling_factor_warmup_iters": 5}),
    ("--mtp-loss-scaling-factor-final", {"mtp_loss_scaling_factor_final": 0.0,
                                         "mtp_loss_scaling_factor_decay_style": "step"}),
    ("--mtp-loss-scaling-factor-decay-style", {"mtp_loss_scaling_factor_decay_style": "cosine"}),
])
def test_weighting_flags_without_mtp_are_errors(flag, values):
    with pytest.raises(ConfigError, match=f"^{flag}=.*only with --mtp-num-layers"):
        build_config({}, values, 1)


# -- the factor schedule's rules ----------------------------------------------------------

def test_schedule_errors_name_the_flag():
    assert _error(mtp_loss_scaling_factor_warmup_iters=101).startswith(
        "--mtp-loss-scaling-factor-warmup-iters=101")
    assert "at most --train-iters=100" in _error(mtp_loss_scaling_factor_warmup_iters=101)
    message = _error(mtp_loss_scaling_factor_warmup_iters=50,
                     mtp_loss_scaling_factor_decay_style="step",
                     mtp_loss_scaling_factor_decay_iters=50)
    assert message.startswith("--mtp-loss-scaling-factor-decay-iters=50")
    assert "more than --mtp-loss-scaling-factor-warmup-iters=50" in message
    message = _error(mtp_loss_scaling_factor_warmup_iters=100,
                     mtp_loss_scaling_factor_decay_style="linear")  # default end: 100
    assert "its default is --train-iters=100" in message
    assert "never reached" in _error(mtp_loss_scaling_factor_final=0.05)
    assert "nothing decays" in _error(mtp_loss_scaling_factor_decay_iters=10)
    assert _error(mtp_loss_scaling_factor_final=math.inf,
                  mtp_loss_scaling_factor_decay_style="step").startswith(
        "--mtp-loss-scaling-factor-final=inf")
    assert _error(mtp_loss_scaling_factor_final=-0.1,
                  mtp_loss_scaling_factor_decay_style="step").startswith(
        "--mtp-loss-scaling-factor-final=-0.1")
    assert _error(mtp_loss_scaling_factor_warmup_iters=-1).startswith(
        "--mtp-loss-scaling-factor-warmup-iters=-1")
    assert "one of constant, step, linear, cosine" in _error(
        mtp_loss_scaling_factor_decay_style="exponential")


def test_a_decay_to_the_same_value_warns(caplog):
    with caplog.at_level("WARNING"):
        _cfg(mtp_loss_scaling_factor_decay_style="step")
    assert "the factor does not change" in caplog.text


def _schedule(**values) -> FactorSchedule:
    return FactorSchedule.of(_cfg(mtp_loss_scaling_factor=0.3, **values))


def test_constant_is_the_factor_at_every_iteration():
    schedule = _schedule()
    assert [schedule.at(i) for i in (1, 2, 50, 100)] == [0.3] * 4


def test_warmup_ramps_from_zero_like_the_learning_rate():
    """Iteration i trains with peak * (i - 1) / W up to i = W + 1 (the LR scheduler's
    count of completed steps), then the peak."""
    schedule = _schedule(mtp_loss_scaling_factor_warmup_iters=4)
    assert [schedule.at(i) for i in range(1, 8)] == pytest.approx(
        [0.0, 0.075, 0.15, 0.225, 0.3, 0.3, 0.3], abs=1e-15)
    assert schedule.at(5) == 0.3  # exactly the peak where the ramp ends


def test_step_switches_to_the_final_value_after_decay_iters():
    """DeepSeek-V3's 0.3 -> 0.1: iterations 1..N train with 0.3, N+1.. with 0.1."""
    schedule = _schedule(mtp_loss_scaling_factor_final=0.1,
                         mtp_loss_scaling_factor_decay_style="step",
                         mtp_loss_scaling_factor_decay_iters=60)
    assert [schedule.at(i) for i in (1, 59, 60, 61, 100)] == [0.3, 0.3, 0.3, 0.1, 0.1]


def test_linear_decay_between_warmup_and_decay_iters():
    schedule = _schedule(mtp_loss_scaling_factor_warmup_iters=10,
                         mtp_loss_scaling_factor_final=0.1,
                         mtp_loss_scaling_factor_decay_style="linear",
                         mtp_loss_scaling_factor_decay_iters=50)
    values = {i: schedule.at(i) for i in (1, 6, 11, 21, 31, 41, 51, 52, 100)}
    assert values == pytest.approx({1: 0.0, 6: 0.15, 11: 0.3, 21: 0.25, 31: 0.2, 41: 0.15,
                                    51: 0.1, 52: 0.1, 100: 0.1}, abs=1e-15)


def test_cosine_decay_follows_half_a_cosine():
    schedule = _schedule(mtp_loss_scaling_factor_final=0.1,
                         mtp_loss_scaling_factor_decay_style="cosine")  # ends at --train-iters
    assert schedule.at(1) == 0.3
    assert schedule.at(26) == pytest.approx(0.1 + 0.2 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert schedule.at(51) == pytest.approx(0.2, abs=1e-15)
    assert schedule.at(76) == pytest.approx(0.1 + 0.2 * 0.5 * (1 + math.cos(3 * math.pi / 4)))
    assert schedule.at(101) == 0.1


def test_a_schedule_can_also_ramp_up():
    """The final value may exceed the factor (a forward curriculum: little MTP first)."""
    schedule = _schedule(mtp_loss_scaling_factor_final=0.5,
                         mtp_loss_scaling_factor_decay_style="linear",
                         mtp_loss_scaling_factor_decay_iters=10)
    assert [schedule.at(i) for i in (1, 6, 11)] == pytest.approx([0.3, 0.4, 0.5], abs=1e-15)


# -- the hook inside megatron-core --------------------------------------------------------

def test_the_stand_in_sits_where_megatron_core_attaches_the_depth_terms():
    """The module named by mcore_compat really calls MTPLossAutoScaler.apply once per
    depth (read from its source), and the stand-in is removed on exit."""
    import importlib
    import inspect

    from mtp_megatron.runtime import mcore_compat
    from mtp_megatron.training.mtp_weighting import depth_weights_applied

    module = importlib.import_module(mcore_compat.mtp_depth_term_module())
    source = inspect.getsource(module)
    assert "for mtp_layer_number in range(" in source
    assert source.count("MTPLossAutoScaler.apply(") == 2  # per-token and default modes
    original = module.MTPLossAutoScaler
    with depth_weights_applied((1.5, 1.0, 0.5)) as scaler:
        assert module.MTPLossAutoScaler is scaler
    assert module.MTPLossAutoScaler is original
    with depth_weights_applied(None) as nothing:
        assert nothing is None and module.MTPLossAutoScaler is original


def test_the_stand_in_multiplies_each_depths_gradient():
    import importlib

    import torch

    from mtp_megatron.runtime import mcore_compat
    from mtp_megatron.training.mtp_weighting import depth_weights_applied

    module = importlib.import_module(mcore_compat.mtp_depth_term_module())
    module.MTPLossAutoScaler.set_loss_scale(torch.tensor(0.5))
    hidden = torch.ones(2, requires_grad=True)
    terms = [torch.tensor(float(k), requires_grad=True) for k in (1, 2, 3)]
    with depth_weights_applied((1.5, 1.0, 0.5)):
        out = hidden
        for term in terms:
            out = module.MTPLossAutoScaler.apply(out, term)
    out.sum().backward()
    assert [t.grad.item() for t in terms] == [0.75, 0.5, 0.25]  # scale 0.5 x multiplier
    assert hidden.grad.tolist() == [1.0, 1.0]

    with pytest.raises(RuntimeError, match="more than 2 MTP depth terms"):
        with depth_weights_applied((1.0, 2.0)):
            for term in terms:
                module.MTPLossAutoScaler.apply(hidden, term)
    with pytest.raises(RuntimeError, match="attached 1 of 2"):
        with depth_weights_applied((1.0, 2.0)):
            module.MTPLossAutoScaler.apply(hidden, terms[0])
    assert not hasattr(module.MTPLossAutoScaler, "multipliers")  # restored after errors


def test_the_factor_is_on_the_log_line_and_in_metrics_jsonl(tmp_path):
    import json

    from mtp_megatron.training.losses import WindowLosses
    from mtp_megatron.training.metrics import MetricsLogger, StepMetrics
    from mtp_megatron.training.writers import JsonlSink, MetricsWriter

    path = tmp_path / "metrics.jsonl"
    log = MetricsLogger(log_interval=2, train_iters=4, tokens_per_step=10, flops_per_token=1.0,
                        is_logging_rank=True, writer=MetricsWriter([JsonlSink(str(path))]))
    for it, factor in ((1, 0.0), (2, 0.075), (3, None), (4, None)):
        log.record(StepMetrics(it, None, None, 1e-3, 1.0, 0.1, mtp_factor=factor))
        if it % 2 == 0:
            line = log.log(WindowLosses(2, [2.0, 2.0], [2.5] if factor else None))
            assert ("mtp_factor 0.075 |" in line) == (factor is not None)
    log.close()
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    assert rows[0]["mtp_factor"] == 0.075 and "mtp_factor" not in rows[1]  # the last step's

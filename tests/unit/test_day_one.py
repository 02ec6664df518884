"""Issue 15, as a new user meets it: ``--eval-iters 0`` on a small dataset trains (it hung
forever), and ``generate --json`` prints strict JSON (it printed ``NaN``)."""

import json

import pytest

from mtp_megatron import generate
from mtp_megatron.data.preprocess import preprocess
from mtp_megatron.inference.report import report_json
from mtp_megatron.inference.stats import DecodeStats
from tests.functional.launcher import TINY, launch


@pytest.mark.functional
def test_eval_iters_0_trains_when_the_validation_split_is_empty(tmp_path):
    # 10 documents with the default --split 98,2,0: the validation split has none. The
    # timeout turns the old endless loop in megatron-core's GPTDataset into a failure.
    src = tmp_path / "d.jsonl"
    src.write_text("".join(json.dumps({"text": f"def f{i}(x):\n    return x * {i}\n" * 3}) + "\n"
                           for i in range(10)))
    prefix = str(tmp_path / "d")
    preprocess([str(src)], prefix, progress=False)
    run = launch(TINY + ["--data-path", prefix, "--eval-iters", "0", "--train-iters", "2"],
                 output_dir=str(tmp_path / "run"), torchrun=False, timeout=120)
    assert run.returncode == 0, run
    assert "iteration 2/2" in run.stdout and "validation" not in run.stdout
    assert run.metrics("valid") == []


def _strict(text):
    def reject(name):
        raise ValueError(f"not JSON: {name}")

    return json.loads(text, parse_constant=reject)


def _report_with_an_unreached_position():
    stats = DecodeStats(draft_depth=2)
    stats.generated, stats.steps = 4, 2
    stats.record_step(num_drafts=2, num_accepted=0)  # position 2 never compared
    stats.record_step(num_drafts=2, num_accepted=0)
    return {"mode": "mtp-speculative", "outputs": [], "speculative_k2": stats.summary(),
            "speedup": None, "matches_greedy": True}


def test_report_json_writes_null_for_a_position_never_reached():
    report = _report_with_an_unreached_position()
    data = _strict(report_json(report))
    assert data["speculative_k2"]["acceptance_per_position"] == [0.0, None]
    assert data["speculative_k2"]["acceptance_unconditional"] == [0.0, 0.0]
    assert data["speedup"] is None


def test_generate_json_output_is_strict_json(monkeypatch, capsys):
    monkeypatch.setattr(generate, "run", lambda args: _report_with_an_unreached_position())
    assert generate.main(["--load", "unused", "--prompt", "x", "--json"]) == 0
    data = _strict(capsys.readouterr().out)
    assert data["speculative_k2"]["acceptance_per_position"][1] is None
    assert generate.main(["--load", "unused", "--prompt", "x"]) == 0  # the table too
    assert "speculative_k2" in capsys.readouterr().out


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_report_json_never_writes_non_finite_numbers(value):
    assert _strict(report_json({"a": [1.5, value], "b": {"c": value}})) == \
        {"a": [1.5, None], "b": {"c": None}}

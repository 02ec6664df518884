"""python -m mtp_megatron.plot: a PNG from synthetic metrics.jsonl files, runs overlaid."""

import json

import pytest

from mtp_megatron import plot


def _run_dir(path, depth, *, tokens=True):
    path.mkdir()
    rows = []
    for it in (10, 20, 30):
        row = {"iteration": it, "lm loss": 5.0 - it / 10}
        row.update({f"mtp_{k} loss": 6.0 - it / 10 + k for k in range(1, depth + 1)})
        if tokens:
            row["tokens"] = it * 2048
        rows.append(row)
        valid = {"iteration": it, "split": "valid", "lm loss": 5.2 - it / 10}
        valid.update({f"mtp_{k} acceptance": 0.1 * it / 10 / k for k in range(1, depth + 1)})
        rows.append(valid)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if not tokens:  # an older run: tokens from its config.yaml
        (path / "config.yaml").write_text("model: {seq_length: 64}\ntraining: "
                                          "{global_batch_size: 8}\n")
    return str(path)


def test_writes_a_png_with_runs_overlaid(tmp_path):
    pytest.importorskip("matplotlib")
    a = _run_dir(tmp_path / "mtp1", 1)
    b = _run_dir(tmp_path / "mtp2", 2, tokens=False)
    out = tmp_path / "compare.png"
    assert plot.main([a, b, "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    runs = [plot.read_run(a), plot.read_run(b)]
    assert runs[1].train[0]["tokens"] == 10 * 8 * 64
    assert [(title, keys) for title, _, keys in plot.panels(runs)] == [
        ("lm loss", ["lm loss"]), ("mtp_1 loss", ["mtp_1 loss"]), ("mtp_2 loss", ["mtp_2 loss"]),
        ("validation loss", ["lm loss"]),
        ("validation acceptance", ["mtp_1 acceptance", "mtp_2 acceptance"])]


def test_a_directory_without_metrics_is_a_clear_error(tmp_path, capsys):
    assert plot.main([str(tmp_path)]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err


def test_without_matplotlib_the_message_names_the_extra(tmp_path, monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails
    assert plot.main([_run_dir(tmp_path / "r", 1)]) == 2
    assert "pip install -e .[plot]" in capsys.readouterr().err

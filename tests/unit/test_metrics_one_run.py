"""metrics.jsonl describes one run (issue 19 item 5; pure Python).

It was only ever appended to: after a crash and a resume the redone iterations appeared
twice (32 rows for 24 iterations), and a fresh run in the same --output-dir was
concatenated to the old one, so ``plot`` drew one curve through both.
"""

import json

from mtp_megatron.training.writers import JsonlSink, MetricsWriter, read_rows, start_run_file


def _write(path, rows, torn=False):
    text = "".join(json.dumps(r) + "\n" for r in rows)
    path.write_text(text + ('{"iteration": 9, "lm lo' if torn else ""))


def _train(it):
    return {"iteration": it, "tokens": it * 10, "lm loss": 5.0 - it / 10}


def test_a_resume_drops_the_rows_past_its_iteration_and_rewrites_them_once(tmp_path):
    path = tmp_path / "metrics.jsonl"
    # iterations 1-8 logged, validation at 4 and 8, killed mid-write, checkpoint at 4
    rows = [_train(i) for i in range(1, 9)]
    rows.insert(4, {"iteration": 4, "split": "valid", "lm loss": 4.0})
    rows.append({"iteration": 8, "split": "valid", "lm loss": 3.0})
    _write(path, rows, torn=True)
    note = start_run_file(str(path), 4)
    assert "dropped 6 rows past iteration 4" in note and str(path) in note
    writer = MetricsWriter([JsonlSink(str(path))])
    for it in range(5, 9):
        writer.write(_train(it))
    writer.close()
    got = read_rows(str(path))
    train = [r["iteration"] for r in got if "split" not in r]
    assert train == list(range(1, 9))
    assert [r["iteration"] for r in got if r.get("split") == "valid"] == [4]
    assert not (tmp_path / "metrics.1.jsonl").exists()


def test_a_resume_with_nothing_past_it_leaves_the_file_alone(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _write(path, [_train(i) for i in range(1, 5)])
    before = path.read_text()
    assert start_run_file(str(path), 4) is None
    assert path.read_text() == before


def test_a_fresh_run_in_a_used_directory_starts_a_new_file(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    _write(path, [_train(i) for i in range(1, 201)])
    sink = JsonlSink(str(path), start_iteration=0)
    sink.write(_train(1), "train")
    sink.close()
    assert [r["iteration"] for r in read_rows(str(path))] == [1]
    assert len(read_rows(str(tmp_path / "metrics.1.jsonl"))) == 200
    assert "moved to" in caplog.text and "metrics.1.jsonl" in caplog.text
    JsonlSink(str(path), start_iteration=0).close()  # a third run: the second file moves too
    assert (tmp_path / "metrics.2.jsonl").exists()
    assert not path.exists() or path.read_text() == ""


def test_for_run_passes_where_the_run_starts(tmp_path):
    from types import SimpleNamespace

    logs = SimpleNamespace(output_dir=str(tmp_path), tensorboard_dir=None, wandb_project=None)
    _write(tmp_path / "metrics.jsonl", [_train(i) for i in range(1, 7)])
    MetricsWriter.for_run(logs, enabled=True, start_iteration=3).close()
    assert [r["iteration"] for r in read_rows(str(tmp_path / "metrics.jsonl"))] == [1, 2, 3]
    MetricsWriter.for_run(logs, enabled=False, start_iteration=0).close()  # other ranks
    assert (tmp_path / "metrics.jsonl").exists()

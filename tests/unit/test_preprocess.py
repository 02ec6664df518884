"""Preprocessing: round trip through megatron-core's IndexedDataset, bad input, --strict."""

import json
import os

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from mtp_megatron.config import ConfigError, build_config
from mtp_megatron.data.preprocess import PreprocessError, main, preprocess
from mtp_megatron.data.tokenizers import BYTE_EOD, build_tokenizer

DOCS = ["hello world", "café — naïve ünïcödé ✓", "line one\nline two\n", "x\x00y\x01z"]


def _write_jsonl(path, lines):
    with open(path, "wb") as fh:
        for line in lines:
            fh.write(line if isinstance(line, bytes) else line.encode() + b"\n")


def _read(prefix):
    ds = IndexedDataset(prefix)
    return [ds[i].tolist() for i in range(len(ds))]


def test_round_trip_equals_tokenizer_output(tmp_path):
    src = tmp_path / "docs.jsonl"
    _write_jsonl(src, [json.dumps({"text": t}) for t in DOCS])
    summary = preprocess([str(src)], str(tmp_path / "out"), progress=False)
    tok = build_tokenizer("byte-level")
    expected = [tok.tokenize(t) + [tok.eod] for t in DOCS]
    assert _read(str(tmp_path / "out")) == expected
    assert tok.eod == BYTE_EOD == 256 and tok.vocab_size == 258
    assert summary.documents == 4 and summary.skipped == 0
    assert summary.tokens == sum(len(e) for e in expected)
    assert summary.bytes == sum(len(json.dumps({"text": t}).encode()) + 1 for t in DOCS)
    meta = json.loads((tmp_path / "out.meta.json").read_text())
    assert meta["tokenizer_type"] == "byte-level" and meta["max_token_id"] == 256
    assert np.dtype(IndexedDataset(str(tmp_path / "out")).index.dtype) == np.uint16


def test_text_files_and_directories_are_documents(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "b.txt").write_text("second")
    (tmp_path / "d" / "sub" / "c.txt").write_text("third")
    (tmp_path / "d" / "skip.md").write_text("not matched")
    (tmp_path / "a.txt").write_text("first")
    preprocess([str(tmp_path / "a.txt"), str(tmp_path / "d")], str(tmp_path / "o"),
               pattern="*.txt", progress=False)
    texts = [bytes(d[:-1]).decode() for d in _read(str(tmp_path / "o"))]
    assert texts == ["first", "second", "third"]  # sorted walk, pattern applied


def _bad_input(tmp_path):
    src = tmp_path / "bad.jsonl"
    _write_jsonl(src, [
        json.dumps({"text": "good one"}),          # 1
        "{not json",                                # 2 invalid JSON
        json.dumps({"body": "x"}),                  # 3 missing key
        b'{"text": "caf\xff"}\n',                   # 4 non-UTF-8
        json.dumps({"text": "   "}),                # 5 empty
        json.dumps({"text": "good two"}),           # 6
    ])
    return src


def test_bad_lines_are_skipped_counted_and_reported(tmp_path, caplog):
    src = _bad_input(tmp_path)
    with caplog.at_level("WARNING"):
        summary = preprocess([str(src)], str(tmp_path / "o"), progress=False)
    assert [bytes(d[:-1]).decode() for d in _read(str(tmp_path / "o"))] == ["good one", "good two"]
    assert summary.skipped == 4
    assert summary.skipped_by_reason == {"invalid JSON": 1, "missing key 'text'": 1,
                                         "non-UTF-8 bytes": 1, "empty document": 1}
    for line in (2, 3, 4, 5):
        assert f"{src}:{line}:" in caplog.text


def test_non_utf8_in_a_text_file_names_the_line(tmp_path, caplog):
    (tmp_path / "t.txt").write_bytes(b"ok\nok\nbad \xfe here\n")
    (tmp_path / "u.txt").write_text("fine")
    with caplog.at_level("WARNING"):
        summary = preprocess([str(tmp_path)], str(tmp_path / "o"), progress=False)
    assert summary.documents == 1 and summary.skipped == 1
    assert f"{tmp_path / 't.txt'}:3: non-UTF-8" in caplog.text


def test_strict_fails_and_leaves_existing_output_untouched(tmp_path):
    good = tmp_path / "good.jsonl"
    _write_jsonl(good, [json.dumps({"text": "keep me"})])
    prefix = str(tmp_path / "o")
    preprocess([str(good)], prefix, progress=False)
    before = {s: open(prefix + s, "rb").read() for s in (".bin", ".idx")}
    with pytest.raises(PreprocessError, match=r"bad.jsonl:2: invalid JSON"):
        preprocess([str(_bad_input(tmp_path))], prefix, strict=True, progress=False)
    assert {s: open(prefix + s, "rb").read() for s in (".bin", ".idx")} == before
    assert sorted(os.listdir(tmp_path)) == ["bad.jsonl", "good.jsonl", "o.bin", "o.idx",
                                            "o.meta.json"]  # no temporaries left


def test_cli_summary_and_exit_codes(tmp_path, capsys):
    src = _bad_input(tmp_path)
    assert main(["--input", str(src), "--output-prefix", str(tmp_path / "o"),
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    summary = json.loads(out.strip().splitlines()[-1])["summary"]
    assert (summary["documents"], summary["skipped"]) == (2, 4)
    assert "documents 2 | tokens 18" in out
    assert main(["--input", str(src), "--output-prefix", str(tmp_path / "s"), "--strict",
                 "--no-progress"]) == 1
    assert "--strict" in capsys.readouterr().err
    assert main(["--input", str(tmp_path / "missing"), "--output-prefix", "x",
                 "--no-progress"]) == 1


@pytest.mark.multirank  # a pool of worker processes
def test_parallel_workers_write_the_same_dataset(tmp_path):
    src = tmp_path / "many.jsonl"
    _write_jsonl(src, [json.dumps({"text": f"document {i} " * (i % 7 + 1)}) for i in range(200)])
    preprocess([str(src)], str(tmp_path / "one"), progress=False)
    preprocess([str(src)], str(tmp_path / "two"), workers=2, progress=False)
    assert open(tmp_path / "one.bin", "rb").read() == open(tmp_path / "two.bin", "rb").read()
    assert open(tmp_path / "one.idx", "rb").read() == open(tmp_path / "two.idx", "rb").read()


def test_tokenizers_never_download(tmp_path):
    with pytest.raises(ConfigError, match="--tokenizer-model"):
        build_tokenizer("huggingface", "gpt2")
    with pytest.raises(ConfigError, match="--tokenizer-model"):
        build_tokenizer("sentencepiece", str(tmp_path / "none.model"))


@pytest.mark.parametrize("data, flag", [
    ({"data_path": ["a", "0.5"]}, "--data-path"),
    ({"data_path": ["0", "a"]}, "--data-path"),
    ({"data_path": ["a"], "mock_data": True}, "--mock-data"),
    ({"split": "0,1,0"}, "--split"),
    ({"split": "98,x"}, "--split"),
    ({"tokenizer_type": "sentencepiece"}, "--tokenizer-model"),
    ({"tokenizer_model": "t.json"}, "--tokenizer-model"),
    ({"eval_iters": -1}, "--eval-iters"),
])
def test_data_config_errors_name_the_flag(data, flag):
    with pytest.raises(ConfigError) as err:
        build_config({"data": data})
    assert err.value.flag == flag


def test_data_path_blend_from_yaml_string_or_list():
    assert build_config({"data": {"data_path": "0.3 a 0.7 b"}}).data.data_path == \
        ("0.3", "a", "0.7", "b")
    assert build_config({"data": {"data_path": ["a", "b"]}}).data.data_path == ("a", "b")


def test_a_lone_surrogate_is_a_bad_record(tmp_path, caplog, capsys):
    # Valid JSON whose string cannot be encoded as UTF-8: it aborted the whole run.
    src = tmp_path / "s.jsonl"
    _write_jsonl(src, [json.dumps({"text": "good"}), r'{"text": "lone \ud800 surrogate"}',
                       json.dumps({"text": "also good"})])
    with caplog.at_level("WARNING"):
        summary = preprocess([str(src)], str(tmp_path / "o"), progress=False)
    assert [bytes(d[:-1]).decode() for d in _read(str(tmp_path / "o"))] == ["good", "also good"]
    assert summary.skipped_by_reason == {"lone surrogate": 1}
    assert f"{src}:2: lone surrogate (U+D800 at character 5)" in caplog.text
    assert main(["--input", str(src), "--output-prefix", str(tmp_path / "s"), "--strict",
                 "--no-progress"]) == 1
    assert f"{src}:2: lone surrogate" in capsys.readouterr().err


@pytest.mark.parametrize("strict", [True, False])
def test_a_failed_run_creates_no_directory(tmp_path, strict):
    src = tmp_path / "all_bad.jsonl"
    _write_jsonl(src, ["{not json", json.dumps({"text": " "})])  # strict or not: it fails
    prefix = tmp_path / "new" / "deeper" / "o"
    with pytest.raises(PreprocessError):
        preprocess([str(src)], str(prefix), strict=strict, progress=False)
    assert sorted(os.listdir(tmp_path)) == ["all_bad.jsonl"]
    preprocess([str(_bad_input(tmp_path))], str(prefix), progress=False)  # a good run does
    assert sorted(os.listdir(prefix.parent)) == ["o.bin", "o.idx", "o.meta.json"]


def _hf_tokenizer_dir(tmp_path, eos):
    """A tiny local Hugging Face tokenizer: tokenizer.json (+ tokenizer_config.json)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "</s>": 1, "def": 2, "main": 3, "(": 4, ")": 5}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "<unk>"}
    if eos:
        config["eos_token"] = "</s>"
    (tmp_path / "tokenizer_config.json").write_text(__import__("json").dumps(config))
    return tmp_path / "tokenizer.json"


def test_a_local_huggingface_tokenizer_is_read_and_needs_an_eos(tmp_path):
    """docs/data.md's huggingface example: the file (or its directory) with a
    tokenizer_config.json that names the end-of-sequence token, used as EOD."""
    pytest.importorskip("transformers")
    (tmp_path / "ok").mkdir()
    (tmp_path / "no_eos").mkdir()
    tokenizer = build_tokenizer("huggingface", str(_hf_tokenizer_dir(tmp_path / "ok", True)))
    assert tokenizer.eod == 1 and list(tokenizer.tokenize("def main ( )")) == [2, 3, 4, 5]
    with pytest.raises(ConfigError, match="an end-of-sequence token"):
        build_tokenizer("huggingface", str(_hf_tokenizer_dir(tmp_path / "no_eos", False)))

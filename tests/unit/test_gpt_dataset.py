"""GPTDataset samples from our preprocessed data, the data checks, the embedded corpus."""

import contextlib
import dataclasses
import json
import os
import signal

import pytest
import torch

from mtp_megatron.config import ConfigError, build_config
from mtp_megatron.data.corpus import ensure_stdlib_corpus, stdlib_files
from mtp_megatron.data.datasets import build_datasets, prepare_data
from mtp_megatron.data.iterator import GlobalBatchSampler
from mtp_megatron.data.preprocess import preprocess

SEQ = 32


def _corpus(tmp_path, name="c", docs=40):
    src = tmp_path / f"{name}.jsonl"
    with open(src, "w") as fh:
        for i in range(docs):
            fh.write(json.dumps({"text": f"def f{i}(x):\n    return x * {i} + {i % 7}\n"}) + "\n")
    prefix = str(tmp_path / name)
    preprocess([str(src)], prefix, progress=False)
    return prefix


def _cfg(tmp_path, **data):
    data.setdefault("data_cache_path", str(tmp_path / "cache"))
    return build_config({
        "model": {"num_layers": 2, "hidden_size": 64, "seq_length": SEQ},
        "training": {"micro_batch_size": 2, "global_batch_size": 4, "train_iters": 5},
        "data": {"split": "80,20,0", "eval_iters": 2, **data},
    })


def _build(cfg, seed=None):
    plan = prepare_data(data=cfg.data, model=cfg.model)
    return plan, build_datasets(plan, data=cfg.data, model=cfg.model, training=cfg.training,
                                seed=seed, built_on_rank=lambda: True)


def test_samples_shapes_labels_and_determinism(tmp_path):
    cfg = _cfg(tmp_path, data_path=[_corpus(tmp_path)])
    plan, data = _build(cfg)
    assert plan.vocab_size == 258
    assert len(data.train) >= 5 * 4 and len(data.valid) >= 2 * 4
    sample = data.train[3]
    assert set(sample) == {"tokens", "labels", "loss_mask", "position_ids"}
    for key in sample:
        assert sample[key].shape == (SEQ,)
    assert torch.equal(sample["tokens"][1:], sample["labels"][:-1])  # labels = next token
    assert torch.equal(sample["position_ids"], torch.arange(SEQ))
    assert sample["loss_mask"].sum() == SEQ
    assert int(sample["tokens"].max()) <= 256  # bytes and EOD
    text = bytes(t for t in sample["tokens"].tolist() if t < 256).decode()
    assert "x * " in text and "\n" in text
    _, again = _build(cfg)  # a second build (index cache hit) gives the same samples
    for i in (0, 7, 19):
        assert torch.equal(data.train[i]["tokens"], again.train[i]["tokens"])
    assert torch.equal(data.valid[0]["tokens"], again.valid[0]["tokens"])
    _, other = _build(cfg, seed=99)
    assert not all(torch.equal(data.train[i]["tokens"], other.train[i]["tokens"])
                   for i in range(8))


def test_blend_with_weights(tmp_path):
    a, b = _corpus(tmp_path, "a"), _corpus(tmp_path, "b", docs=30)
    # (no cache dir: megatron-core's BlendedDataset cache needs a process group)
    plan, data = _build(_cfg(tmp_path, data_path=["0.3", a, "0.7", b], data_cache_path=None))
    assert plan.blend == ([a, b], [0.3, 0.7])
    assert len(data.train) >= 20 and data.train[0]["tokens"].shape == (SEQ,)


def test_missing_files_name_the_flag(tmp_path):
    prefix = _corpus(tmp_path)
    os.remove(prefix + ".idx")
    with pytest.raises(ConfigError, match=r"--data-path.*\.idx is missing or unreadable"):
        prepare_data(data=_cfg(tmp_path, data_path=[prefix]).data, model=_cfg(tmp_path).model)


def test_truncated_bin_is_caught(tmp_path):
    prefix = _corpus(tmp_path)
    with open(prefix + ".bin", "r+b") as fh:
        fh.truncate(100)
    cfg = _cfg(tmp_path, data_path=[prefix])
    with pytest.raises(ConfigError, match="the index describes"):
        prepare_data(data=cfg.data, model=cfg.model)


def test_vocab_size_smaller_than_the_tokenizer(tmp_path):
    cfg = build_config({"model": {"vocab_size": 200}, "data": {"data_path": ["x"]}})
    with pytest.raises(ConfigError) as err:
        prepare_data(data=cfg.data, model=cfg.model)
    assert err.value.flag == "--vocab-size" and "258" in str(err.value)


def test_data_from_another_tokenizer_is_caught(tmp_path):
    prefix = _corpus(tmp_path)
    meta = json.loads(open(prefix + ".meta.json").read())
    meta.update(tokenizer_type="huggingface", max_token_id=50000)
    json.dump(meta, open(prefix + ".meta.json", "w"))
    cfg = _cfg(tmp_path, data_path=[prefix])
    with pytest.raises(ConfigError, match="huggingface, the tokenizer"):
        prepare_data(data=cfg.data, model=cfg.model)


def test_sequence_longer_than_the_data(tmp_path):
    prefix = _corpus(tmp_path, docs=10)  # ~300 tokens, 2 validation documents
    cfg = build_config({"model": {"seq_length": 256}, "data": {"data_path": [prefix],
                                                                "split": "80,20,0"}})
    with pytest.raises(ConfigError, match=r"\+ 1 tokens.*at most 65: the validation split"):
        prepare_data(data=cfg.data, model=cfg.model)
    cfg = build_config({"model": {"seq_length": 4096}, "data": {"data_path": [prefix]}})
    with pytest.raises(ConfigError, match="train split"):
        prepare_data(data=cfg.data, model=cfg.model)


def test_embedded_corpus_is_built_once_and_reused(tmp_path):
    files = stdlib_files()
    assert len(files) > 300
    assert not any(os.sep + "site-packages" + os.sep in f or os.sep + "test" + os.sep in f
                   for f in files)
    assert files == stdlib_files()  # a fixed order
    prefix = ensure_stdlib_corpus(str(tmp_path))
    stamp = os.stat(prefix + ".bin").st_mtime_ns
    assert ensure_stdlib_corpus(str(tmp_path)) == prefix
    assert os.stat(prefix + ".bin").st_mtime_ns == stamp
    meta = json.loads(open(prefix + ".meta.json").read())
    assert meta["documents"] > 300 and meta["tokens"] > 2_000_000
    cfg = build_config({"data": {"data_cache_path": str(tmp_path)}})
    plan = prepare_data(data=cfg.data, model=cfg.model)
    assert plan.blend == ([prefix], None) and "standard library" in plan.description


def _consumed_dataset_ids(dataset, steps, *, gbs=8, mbs=2, dp=2):
    """dataset_id of every sample the sampler hands out over ``steps`` steps (all DP ranks)."""
    samplers = [GlobalBatchSampler(dataset, micro_batch_size=mbs, global_batch_size=gbs,
                                   dp_rank=r, dp_size=dp) for r in range(dp)]
    ids = []
    for _ in range(steps):
        for sampler in samplers:
            for batch in sampler.next_step():
                assert batch["tokens"].shape == (mbs, SEQ)  # the model's fields still stack
                assert batch["dataset_id"].shape == (mbs,)
                ids += batch["dataset_id"].tolist()
    return torch.bincount(torch.tensor(ids), minlength=3).tolist()


def test_weighted_blend_of_three_batches_in_the_weights_ratio(tmp_path):
    """Regression: BlendedDataset's numpy ``dataset_id`` made torch.stack raise TypeError."""
    prefixes = [_corpus(tmp_path, name, docs=60) for name in "abc"]
    weights = [0.5, 0.3, 0.2]
    blend = [str(x) for pair in zip(weights, prefixes) for x in pair]
    cfg = _cfg(tmp_path, data_path=blend, data_cache_path=None)
    cfg = dataclasses.replace(cfg, training=dataclasses.replace(
        cfg.training, global_batch_size=8, train_iters=25))
    _, data = _build(cfg)
    counts = _consumed_dataset_ids(data.train, steps=25)  # 200 samples
    # megatron-core's blend index is greedy (error-minimising): every prefix of it is
    # within one sample of the weights.
    assert counts == [100, 60, 40], counts


def test_unweighted_blend_mixes_in_proportion_to_dataset_sizes(tmp_path):
    """``--data-path A B``: megatron-core weighs each by its number of samples (one epoch)."""
    a, b = _corpus(tmp_path, "a", docs=120), _corpus(tmp_path, "b", docs=40)
    cfg = _cfg(tmp_path, data_path=[a, b], data_cache_path=None)
    _, data = _build(cfg)
    sizes = [len(d) for d in data.train.datasets]
    assert sizes[0] > 2 * sizes[1] > 0
    # the blend is one epoch of each, capped at train_iters * global_batch_size samples
    assert len(data.train) == min(sum(sizes), 5 * 4) == 20
    counts = _consumed_dataset_ids(data.train, steps=5, gbs=4)
    n = sum(counts)
    assert n == 20
    for got, size in zip(counts, sizes):
        assert abs(got - n * size / sum(sizes)) <= 1, (counts, sizes)


def test_unweighted_blend_shorter_than_the_run_warns(tmp_path, caplog):
    """One epoch of each dataset, then the sampler wraps: the same samples, same order."""
    a, b = _corpus(tmp_path, "a", docs=30), _corpus(tmp_path, "b", docs=10)
    cfg = _cfg(tmp_path, data_path=[a, b], data_cache_path=None)
    long = dataclasses.replace(cfg, training=dataclasses.replace(cfg.training, train_iters=400))
    with caplog.at_level("WARNING", logger="mtp_megatron"):
        _, data = _build(long)
    epoch = len(data.train)
    assert epoch < 400 * 4
    warned = [r.getMessage() for r in caplog.records if "without weights" in r.getMessage()]
    assert len(warned) == 1 and f"{epoch} training samples" in warned[0], warned
    assert "--train-iters" in warned[0] and "--data-path 1 A 1 B" in warned[0]
    sampler = GlobalBatchSampler(data.train, micro_batch_size=epoch, global_batch_size=epoch,
                                 dp_rank=0, dp_size=1)
    first, second = sampler.next_step()[0], sampler.next_step()[0]
    assert torch.equal(first["tokens"], second["tokens"])  # what the warning says
    caplog.clear()
    with caplog.at_level("WARNING", logger="mtp_megatron"):
        _build(cfg)  # 20 samples: within the epoch, no warning
    assert not [r for r in caplog.records if "without weights" in r.getMessage()]


@contextlib.contextmanager
def _deadline(seconds):
    """Fail instead of hanging (megatron-core's epoch loop is pure Python: SIGALRM stops it)."""
    def expired(*_):
        raise TimeoutError(f"dataset setup still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _built_splits(cache):
    return sorted({name.split("-")[2] for name in os.listdir(cache)})


def test_eval_iters_0_with_an_empty_validation_split_builds_only_train(tmp_path):
    # Issue 15: 10 documents, --split 98,2,0 -> the validation split gets 0 documents;
    # with --eval-iters 0 megatron-core still built it and looped forever.
    prefix = _corpus(tmp_path, docs=10)
    cfg = _cfg(tmp_path, data_path=[prefix], split="98,2,0", eval_iters=0)
    with _deadline(30):
        plan, data = _build(cfg)
    assert data.valid is None and not plan.has_valid
    assert len(data.train) >= 5 * 4 and data.train[0]["tokens"].shape == (SEQ,)
    assert _built_splits(tmp_path / "cache") == ["train"]


def test_unread_splits_are_not_built_and_do_not_change_the_train_samples(tmp_path):
    prefix = _corpus(tmp_path)
    with_eval = _cfg(tmp_path, data_path=[prefix], split="80,10,10",
                     data_cache_path=str(tmp_path / "a"))
    without = _cfg(tmp_path, data_path=[prefix], split="80,10,10", eval_iters=0,
                   data_cache_path=str(tmp_path / "b"))
    _, a = _build(with_eval)
    _, b = _build(without)
    assert _built_splits(tmp_path / "a") == ["train", "valid"]  # never the test split
    assert _built_splits(tmp_path / "b") == ["train"]
    assert a.valid is not None and b.valid is None
    for i in range(len(a.train)):
        assert torch.equal(a.train[i]["tokens"], b.train[i]["tokens"])


@pytest.mark.parametrize("split, eval_iters, name", [
    ("98,2,0", 2, "validation"),  # the validation split is read and has no document
    ("1,99,0", 0, "train"),
])
def test_a_used_split_without_documents_fails_fast(tmp_path, split, eval_iters, name):
    prefix = _corpus(tmp_path, docs=10)
    cfg = _cfg(tmp_path, data_path=[prefix], split=split, eval_iters=eval_iters)
    with _deadline(30), pytest.raises(ConfigError) as err:
        _build(cfg)
    assert err.value.flag == "--split"
    assert f"the {name} split of {prefix} gets 0 of its 10 documents" in str(err.value)


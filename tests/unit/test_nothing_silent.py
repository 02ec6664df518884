"""Issue 19, the pure-Python items: one clear line instead of a traceback or a silence.

* item 2: the LR schedule on resume (Megatron-LM's two flags, the refusal naming both);
* item 4: ``hf import --save`` into a training run's directory;
* item 6: ``LOCAL_RANK=-1``/``abc``, ``SLURM_LOCALID=x``: the error is printed (it was not,
  and the launcher exited 2 after 10 s);
* item 8: ``--config`` on a directory or a binary file, ``generate --prompt-file`` on a
  binary file, ``preprocess --output-prefix dir/``, a truncated ``.idx``, ``hf export
  --out`` into the tokenizer's directory;
* item 9: preprocess ingesting its own outputs, generate's text losing trailing
  whitespace, another MTP depth, ``--world-size`` against the launcher.

None starts a process.
"""

import os
import sys
from types import SimpleNamespace

import pytest
import yaml

from mtp_megatron import cli, generate
from mtp_megatron.checkpoint import CheckpointError, check_compatible
from mtp_megatron.checkpoint.compat import check_schedule
from mtp_megatron.config import CheckpointConfig, ConfigError, build_config, load_config
from mtp_megatron.config.loader import save_config
from mtp_megatron.data import preprocess as pp

BASE = {"num_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "seq_length": 32,
        "micro_batch_size": 2, "global_batch_size": 8}
BINARY = b"\xff\xfe\x00\x89PNG\r\n\x1a\n\x00\x00"


# --- item 2: the LR schedule ------------------------------------------------------------

def _saved_schedule(**changes):
    values = {"max_lr": 2e-3, "min_lr": 2e-4, "lr_warmup_steps": 1, "lr_decay_steps": 10,
              "lr_decay_style": "cosine", "start_wd": 0.01, "end_wd": 0.01,
              "wd_incr_steps": 10, "wd_incr_style": "constant", "num_steps": 8}
    return dict(values, **changes)


def _scheduler(**changes):
    saved = _saved_schedule(**changes)
    return SimpleNamespace(**{k: v for k, v in saved.items() if k != "num_steps"})


def test_a_changed_schedule_is_refused_naming_both_flags():
    ours = _scheduler(lr_decay_steps=20, lr_warmup_steps=2, wd_incr_steps=20)
    with pytest.raises(CheckpointError) as err:
        check_schedule("ck/iter_0000008", ours, _saved_schedule(), CheckpointConfig())
    msg = str(err.value)
    assert "--override-opt-param-scheduler" in msg
    assert "--use-checkpoint-opt-param-scheduler" in msg
    assert "--lr-decay-iters (default: --train-iters) 10 -> 20" in msg
    assert "--lr-warmup-iters 1 -> 2" in msg and "ck/iter_0000008" in msg
    with pytest.raises(CheckpointError, match="--lr 0.002 -> 0.01"):
        check_schedule("ck", _scheduler(max_lr=0.01), _saved_schedule(), CheckpointConfig())


def test_either_flag_says_which_schedule_wins():
    ours, saved = _scheduler(max_lr=0.01), _saved_schedule()
    for flags in (dict(override_opt_param_scheduler=True),
                  dict(use_checkpoint_opt_param_scheduler=True)):
        assert check_schedule("ck", ours, saved, CheckpointConfig(**flags)) == [
            "--lr 0.002 -> 0.01"]
    # the same schedule (a longer --train-iters only moves the constant weight decay's
    # horizon) needs neither
    assert check_schedule("ck", _scheduler(wd_incr_steps=99), saved, CheckpointConfig()) == []


def test_the_two_flags_exclude_each_other():
    with pytest.raises(ConfigError, match="--use-checkpoint-opt-param-scheduler.*"
                                          "--override-opt-param-scheduler"):
        CheckpointConfig(override_opt_param_scheduler=True,
                         use_checkpoint_opt_param_scheduler=True)


# --- item 9: another MTP depth; --world-size --------------------------------------------

def test_another_mtp_depth_points_to_hf_export_and_import(tmp_path):
    directory = tmp_path / "iter_0000010"
    directory.mkdir()
    save_config(build_config(None, BASE, 1), str(directory / "run_config.yaml"))
    cfg = build_config(None, dict(BASE, mtp_num_layers=1), 1)
    with pytest.raises(CheckpointError) as err:
        check_compatible(str(directory), cfg, checkpoint=CheckpointConfig(finetune=True))
    msg = str(err.value)
    assert "--mtp-num-layers=1" in msg
    assert f"mtp_megatron.hf export --load {directory}" in msg
    assert "mtp_megatron.hf import --hf HF_DIR --save NEW_DIR --mtp-num-layers 1" in msg
    assert "--load NEW_DIR --finetune" in msg


def test_world_size_is_checked_against_the_launcher_before_the_batch():
    # DP would be 4 for --world-size 4: 6 is not a multiple of 2 x 4, but that is not
    # the mistake; the launcher started 2 ranks
    argv = ["--world-size", "4", "--global-batch-size", "6", "--micro-batch-size", "3"]
    with pytest.raises(ConfigError) as err:
        load_config(argv, 2, "WORLD_SIZE")
    assert "--world-size=4" in str(err.value) and "WORLD_SIZE" in str(err.value)
    assert "global-batch-size" not in str(err.value)
    cfg, _ = load_config(["--world-size", "4", "--dry-run"], 1)  # a plan
    assert cfg.parallel.world_size == 4


# --- item 8: --config, --prompt-file ------------------------------------------------------

def test_config_on_a_directory_or_a_binary_file_is_one_error(tmp_path):
    with pytest.raises(ConfigError, match="it is a directory"):
        load_config(["--config", str(tmp_path)])
    binary = tmp_path / "weights.bin"
    binary.write_bytes(BINARY)
    with pytest.raises(ConfigError, match="--config.*not UTF-8"):
        load_config(["--config", str(binary)])


def test_prompt_file_that_is_binary_is_one_error(tmp_path, capsys):
    binary = tmp_path / "prompts.bin"
    binary.write_bytes(BINARY * 1000)
    assert generate.main(["--load", str(tmp_path), "--prompt-file", str(binary)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--prompt-file {binary}: not UTF-8" in err


# --- item 6: a broken rank variable -----------------------------------------------------

@pytest.mark.parametrize("env,name", [
    ({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "-1"}, "LOCAL_RANK"),
    ({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "abc"}, "LOCAL_RANK"),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_LOCALID": "x",
      "SLURM_JOB_NODELIST": "node1", "SLURM_JOB_ID": "7"}, "SLURM_LOCALID"),
])
def test_a_broken_local_rank_is_printed_at_once(monkeypatch, capsys, tmp_path, env, name):
    slept = []
    monkeypatch.setattr(cli.time, "sleep", slept.append)
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_LOCALID",
                "SLURM_NTASKS", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert cli.main(["--output-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {name}=") and err.count("error:") == 1, err
    assert slept == []  # it was a 10 s wait and no message


# --- item 8 and 9: preprocess -------------------------------------------------------------

def test_output_prefix_that_is_a_directory_is_one_error(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("hello\n")
    assert pp.main(["--input", str(tmp_path / "a.txt"), "--output-prefix",
                    str(tmp_path / "newdir") + "/", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "--output-prefix" in err and "a file prefix" in err and "Traceback" not in err
    assert not (tmp_path / "newdir").exists()


def test_a_rerun_with_the_output_inside_the_input_leaves_its_outputs_out(tmp_path, caplog):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("def f():\n    return 1\n")
    (src / "b.txt").write_text("x = 2\n")
    prefix = str(src / "corpus")
    first = pp.preprocess([str(src)], prefix, progress=False)
    data = open(prefix + ".bin", "rb").read()
    second = pp.preprocess([str(src)], prefix, progress=False)
    assert (second.documents, second.tokens, second.skipped) == (2, first.tokens, 0)
    assert open(prefix + ".bin", "rb").read() == data
    assert caplog.text.count("leaving out") == 3  # .bin, .idx, .meta.json


def test_a_truncated_index_is_one_error_and_nothing_more(tmp_path):
    from mtp_megatron.config import DataConfig, ModelConfig
    from mtp_megatron.data.datasets import prepare_data

    src = tmp_path / "a.txt"
    src.write_text("some text to tokenize, long enough for a sequence or two\n" * 20)
    prefix = str(tmp_path / "d")
    pp.preprocess([str(src)], prefix, progress=False)
    whole = open(prefix + ".idx", "rb").read()
    unraisable = []
    old_hook = sys.unraisablehook
    sys.unraisablehook = unraisable.append
    try:
        for cut in (30, len(whole) - 8):  # inside the header; inside the arrays
            with open(prefix + ".idx", "wb") as fh:
                fh.write(whole[:cut])
            with pytest.raises(ConfigError) as err:
                prepare_data(data=DataConfig(data_path=[prefix], eval_iters=0),
                             model=ModelConfig(seq_length=16))
            assert f"{prefix}.idx has {cut} bytes" in str(err.value)
            import gc

            gc.collect()
    finally:
        sys.unraisablehook = old_hook
    assert unraisable == []  # no "Exception ignored in IndexedDataset.__del__"


# --- item 9: generated text -------------------------------------------------------------

def test_decoded_text_keeps_trailing_whitespace():
    from mtp_megatron.data.tokenizers import BYTE_EOD, build_tokenizer, decode

    tokenizer = build_tokenizer()
    assert decode(tokenizer, [32] * 64) == " " * 64  # megatron-core's detokenize gives ""
    assert decode(tokenizer, list(b"x = 1\n\n") + [BYTE_EOD]) == "x = 1\n\n"


# --- item 4 and 8: Hugging Face ----------------------------------------------------------

def test_import_into_a_training_runs_directory_is_refused(tmp_path, capsys):
    from mtp_megatron.checkpoint.lock import SaveLock
    from mtp_megatron.hf import cli as hf_cli

    run = tmp_path / "run"
    (run / "iter_0000008").mkdir(parents=True)
    (run / "latest_checkpointed_iteration.txt").write_text("8\n")
    argv = ["import", "--hf", str(tmp_path / "llama"), "--save", str(run)]
    assert hf_cli.main(argv) == 2
    err = capsys.readouterr().err
    assert f"--save {run} holds a training run's checkpoints (latest iteration 8)" in err
    assert (run / "latest_checkpointed_iteration.txt").read_text() == "8\n"
    live = tmp_path / "live"
    lock = SaveLock.acquire(str(live))  # a run training there
    try:
        assert hf_cli.main(["import", "--hf", str(tmp_path / "llama"), "--save",
                            str(live)]) == 2
        assert f"--save {live} is in use by another run" in capsys.readouterr().err
        assert os.path.exists(os.path.join(str(live), ".save.lock"))  # still the run's
    finally:
        lock.release()


def test_export_into_the_tokenizers_directory_is_refused_before_writing(tmp_path):
    pytest.importorskip("transformers")
    from mtp_megatron.hf.deps import HFError
    from mtp_megatron.hf.export import export

    model_dir = tmp_path / "llama"
    model_dir.mkdir()
    (model_dir / "tokenizer.json").write_text("{}")
    (model_dir / "model.safetensors").write_bytes(b"the original weights")
    ck = tmp_path / "ck" / "iter_0000000"
    ck.mkdir(parents=True)
    (ck / "metadata.json").write_text("{}")
    (tmp_path / "ck" / "latest_checkpointed_iteration.txt").write_text("0\n")
    cfg = build_config({"data": {"tokenizer_type": "huggingface",
                                 "tokenizer_model": str(model_dir / "tokenizer.json")}},
                       dict(BASE, swiglu=True), 1)
    save_config(cfg, str(ck / "run_config.yaml"))
    with pytest.raises(HFError, match=f"--out {model_dir} is the directory of the run's "
                                      "tokenizer"):
        export(str(tmp_path / "ck"), str(model_dir))
    assert (model_dir / "model.safetensors").read_bytes() == b"the original weights"
    assert sorted(os.listdir(model_dir)) == ["model.safetensors", "tokenizer.json"]
    assert yaml.safe_load(open(ck / "run_config.yaml"))["data"]["tokenizer_type"] == \
        "huggingface"

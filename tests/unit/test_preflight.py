"""Checks that run before any process group: each names its flag."""

import importlib.util

import pytest

from mtp_megatron.config import ConfigError, build_config
from mtp_megatron.runtime.preflight import preflight

SINGLE = {}  # no launcher variables: one local rank


def test_tensorboard_dir_without_tensorboard_names_the_flag_and_the_fix(tmp_path):
    if importlib.util.find_spec("tensorboard") is not None:
        pytest.skip("tensorboard is installed here")
    cfg = build_config(None, {"tensorboard_dir": str(tmp_path / "tb")}, None)
    with pytest.raises(ConfigError, match="--tensorboard-dir") as err:
        preflight(cfg, SINGLE)
    assert "pip install" in str(err.value)


def test_world_size_must_match_the_launcher():
    cfg = build_config(None, {"world_size": 4}, None)
    with pytest.raises(ConfigError, match="--world-size"):
        preflight(cfg, {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0",
                        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"})


def test_output_dir_under_a_file_is_rejected(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    cfg = build_config(None, {"output_dir": str(blocker / "run")}, None)
    with pytest.raises(ConfigError, match="--output-dir"):
        preflight(cfg, SINGLE)


def test_local_impl_is_chosen_without_a_gpu(tmp_path):
    cfg = build_config(None, {"output_dir": str(tmp_path)}, None)
    launch, impl = preflight(cfg, SINGLE)
    assert launch.world_size == 1
    import torch

    if not torch.cuda.is_available():
        assert impl == "local"
    else:
        assert impl in ("local", "transformer_engine")


def test_a_plain_run_of_a_model_parallel_config_names_the_launcher(tmp_path):
    cfg = build_config(None, {"tensor_model_parallel_size": 2, "output_dir": str(tmp_path)}, None)
    with pytest.raises(ConfigError, match="--nproc-per-node x --nnodes=1 .*TP x PP x CP = 2"):
        preflight(cfg, SINGLE)


def test_divisibility_is_the_config_s_rule_not_preflight_s():
    # --world-size 3 with TP=2 fails when the config is built, before preflight runs
    with pytest.raises(ConfigError, match="--world-size=3 .*multiple of TP x PP x CP = 2"):
        build_config(None, {"tensor_model_parallel_size": 2, "world_size": 3}, None)


def test_output_dir_and_save_that_are_files_say_so(tmp_path):
    """Regression: a file given as --output-dir was reported as "not writable"."""
    blocker = tmp_path / "file"
    blocker.write_text("x")
    for key, flag in (("output_dir", "--output-dir"), ("save", "--save")):
        cfg = build_config(None, {key: str(blocker)}, None)
        with pytest.raises(ConfigError, match=f"{flag}=.*is a file, expected a directory"):
            preflight(cfg, SINGLE)
    cfg = build_config(None, {"output_dir": str(blocker / "run")}, None)
    with pytest.raises(ConfigError, match="file is a file, so no directory can be made"):
        preflight(cfg, SINGLE)


def test_load_that_is_a_file_says_so(tmp_path):
    """Regression: --load on a file said "no such directory"."""
    from mtp_megatron.checkpoint.layout import CheckpointError, resolve_load_dir

    ckpt = tmp_path / "model.pt"
    ckpt.write_text("x")
    cfg = build_config(None, {"load": str(ckpt), "output_dir": str(tmp_path / "run")}, None)
    with pytest.raises(ConfigError, match="--load=.*is a file, expected a directory"):
        preflight(cfg, SINGLE)
    with pytest.raises(CheckpointError, match="is a file, expected a directory"):
        resolve_load_dir(str(ckpt))
    with pytest.raises(CheckpointError, match="no such directory"):
        resolve_load_dir(str(tmp_path / "nothing"))
    cfg = build_config(None, {"load": str(tmp_path / "nothing"),
                              "output_dir": str(tmp_path / "run")}, None)
    with pytest.raises(ConfigError, match="no such directory"):
        preflight(cfg, SINGLE)

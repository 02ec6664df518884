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

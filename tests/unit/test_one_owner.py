"""One owner per rule: --split, the tokenizer flags, the launcher's rank variables.

* ``--split`` is parsed and checked once, at config time (``config/data.py::parse_split``),
  and what it accepts megatron-core's own parser (which the dataset builder runs on the
  same string later) reads as the same weights; what megatron-core would choke on is a
  ConfigError naming --split before any process group exists.
* The tokenizer flag rules live in ``config/data.py::check_tokenizer_flags``: the config
  section and ``build_tokenizer`` (preprocess, generation) give the same errors.
* ``RANK``/``LOCAL_RANK``/``WORLD_SIZE`` and their SLURM twins are read in
  ``runtime/launch_env.py`` only, and passed on.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

from mtp_megatron.config import ConfigError, DataConfig, build_config
from mtp_megatron.config.data import parse_split

PACKAGE = pathlib.Path(__file__).resolve().parents[2] / "mtp_megatron"
ACCEPTED = ["98,2,0", "98/2/0", "98 , 2, 0", "98,2", "1", "100", ".5,.5", "5.,1", "99.5,0.5,0"]
REFUSED = ["1e2,1,0", "0,1,0", "1,2,3,4", "-1,2", "inf", "nan,1", "98 2 0", "a,b", "", "98,,2"]


@pytest.mark.parametrize("split", ACCEPTED)
def test_an_accepted_split_is_what_megatron_core_reads(split):
    from megatron.core.datasets.blended_megatron_dataset_config import (
        parse_and_normalize_split,
    )

    ours = parse_split(split)
    total = sum(ours)
    assert parse_and_normalize_split(split) == pytest.approx([w / total for w in ours])


@pytest.mark.parametrize("split", REFUSED)
def test_a_bad_split_is_a_config_error_naming_the_flag(split):
    with pytest.raises(ConfigError, match=r"^--split="):
        build_config(None, {"split": split}, 1)


def test_the_dataset_builder_does_not_judge_split_again():
    source = (PACKAGE / "data" / "datasets.py").read_text()
    assert 'ConfigError("--split"' not in source


@pytest.mark.parametrize("kind,model", [("sentencepiece", None), ("huggingface", None),
                                        ("byte-level", "tok.json"), ("bpe", None)])
def test_tokenizer_flags_give_the_same_error_in_the_config_and_the_builder(kind, model):
    from mtp_megatron.data.tokenizers import build_tokenizer

    with pytest.raises(ConfigError) as in_config:
        DataConfig(tokenizer_type=kind, tokenizer_model=model)
    with pytest.raises(ConfigError) as in_builder:
        build_tokenizer(kind, model)
    assert str(in_config.value) == str(in_builder.value)


LAUNCHER_VARS = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "SLURM_PROCID",
                 "SLURM_LOCALID", "SLURM_NTASKS"}


def test_the_launchers_rank_variables_are_read_in_launch_env_only():
    readers = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "launch_env.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and node.value in LAUNCHER_VARS:
                readers.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.value}")
    assert not readers, readers


def test_the_launchers_world_size_reaches_the_config_once():
    from mtp_megatron.config import load_config
    from mtp_megatron.runtime.launch_env import launcher_world_size

    assert launcher_world_size({}) == (None, "")
    assert launcher_world_size({"RANK": "0", "WORLD_SIZE": "2"}) == (2, "WORLD_SIZE")
    assert launcher_world_size({"SLURM_PROCID": "1", "SLURM_NTASKS": "4"}) == (4, "SLURM_NTASKS")
    with pytest.raises(ConfigError, match="^WORLD_SIZE='x'"):
        launcher_world_size({"WORLD_SIZE": "x"})
    cfg, _ = load_config(["--global-batch-size", "16", "--micro-batch-size", "2"],
                         *launcher_world_size({"RANK": "0", "WORLD_SIZE": "2"}))
    assert cfg.parallel.world_size == 2 and cfg.parallel.data_parallel_size == 2
    with pytest.raises(ConfigError, match=r"--world-size=4 .*launcher's world size 2 "
                                          r"\(SLURM_NTASKS\)"):
        load_config(["--world-size", "4"], 2, "SLURM_NTASKS")

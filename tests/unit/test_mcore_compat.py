"""runtime/mcore_compat.py: the one place that knows which megatron-core is installed.

Pure tests (no process group) of each concept it owns, on whichever release line is
installed, plus the rules it applies to a config for a *named* version, so both lines'
answers are checked whatever CI venv runs them.
"""

from __future__ import annotations

import ast
import os
import pathlib

import pytest

from mtp_megatron.config import ConfigError, build_config
from mtp_megatron.runtime import mcore_compat

ROOT = pathlib.Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "mtp_megatron"


def _cfg(**values):
    return build_config(None, dict(values), 1)


def test_the_installed_release_is_a_tested_line():
    assert mcore_compat.line() in mcore_compat.LINES
    assert mcore_compat.line_of(mcore_compat.installed_version()) == mcore_compat.line()
    assert mcore_compat.line_of("0.19.2") == "0.19" and mcore_compat.line_of("0.16.1") == "0.16"
    assert mcore_compat.line_of("0.18.2") is None and mcore_compat.line_of("0.16.0") is None


def test_nothing_else_in_the_package_asks_for_the_version():
    """One owner: no other module reads megatron-core's version or compares versions."""
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "mcore_compat.py":
            continue
        text = path.read_text()
        for needle in ('version("megatron-core")', "megatron.core.package_info",
                       "megatron_core_version", "mcore_version"):
            if needle in text:
                offenders.append(f"{path.relative_to(ROOT)}: {needle}")
    assert not offenders, offenders


@pytest.mark.parametrize("vocab", [128, 200, 512])
def test_the_null_tokenizer_has_the_vocabulary_asked_for_and_eod_last(vocab):
    """0.16's library counts the EOD outside its argument, 0.19's inside: the adapter
    gives the same tokenizer on both (mock data and checkpoints agree across releases)."""
    tokenizer = mcore_compat.null_tokenizer(vocab)
    assert tokenizer.vocab_size == vocab and tokenizer.eod == vocab - 1


def test_mtp_state_keys_are_renamed_both_ways_only_where_needed():
    inner = mcore_compat.mtp_inner_layer_name()
    assert inner == {"0.19": "mtp_model_layer", "0.16": "transformer_layer"}[mcore_compat.line()]
    mine = {f"module.mtp.layers.1.{inner}.mlp.linear_fc1.weight": 1,
            "decoder.layers.0.mlp.linear_fc1.weight": 2,
            f"mtp.layers.0.{inner}.self_attention.linear_qkv.weight": 3,
            "mtp.layers.0.eh_proj.weight": 4}
    ours = mcore_compat.mtp_layer_state_keys(mine)
    assert sorted(ours) == sorted([
        "module.mtp.layers.1.transformer_layer.mlp.linear_fc1.weight",
        "decoder.layers.0.mlp.linear_fc1.weight",
        "mtp.layers.0.transformer_layer.self_attention.linear_qkv.weight",
        "mtp.layers.0.eh_proj.weight"])
    assert mcore_compat.mtp_layer_state_keys_for_model(ours) == mine


@pytest.mark.parametrize("flag,field", [("--mtp-use-repeated-layer", "mtp_use_repeated_layer"),
                                        ("--mtp-detach-heads", "mtp_detach_heads")])
def test_019_mtp_options_are_refused_on_016_naming_the_version(flag, field):
    cfg = _cfg(mtp_num_layers=2, **{field: True})
    with pytest.raises(ConfigError, match=rf"{flag}=True .*megatron-core 0\.16\.1 is "
                                          r"installed.*Allowed: megatron-core >=0\.19\.2"):
        mcore_compat.check_config(cfg, found="0.16.1")
    mcore_compat.check_config(cfg, found="0.19.2")  # fine on the main line
    assert mcore_compat.mtp_config_kwargs(repeated_layer=True, detach_heads=False) == (
        {"mtp_use_repeated_layer": True, "mtp_detach_heads": False}
        if mcore_compat.line() == "0.19" else {})


def test_019_mtp_options_need_mtp():
    with pytest.raises(ConfigError, match="--mtp-detach-heads=True .*only with --mtp-num-layers"):
        _cfg(mtp_detach_heads=True)


def test_fp8_full_recompute_with_mtp_is_refused_before_018_naming_the_issue():
    values = dict(mtp_num_layers=1, fp8_format="hybrid", transformer_impl="transformer_engine",
                  recompute_granularity="full", recompute_method="uniform",
                  recompute_num_layers=1, hidden_size=128, num_attention_heads=4,
                  ffn_hidden_size=512)
    cfg = _cfg(**values)
    with pytest.raises(ConfigError, match=r"--recompute-granularity='full'.*"
                                          r"NVIDIA/Megatron-LM#4593, fixed by #4765"):
        mcore_compat.check_config(cfg, found="0.16.1")
    mcore_compat.check_config(cfg, found="0.19.2")
    mcore_compat.check_config(_cfg(**dict(values, recompute_granularity="selective",
                                          recompute_method=None, recompute_num_layers=None)),
                              found="0.16.1")
    no_mtp = dict(values)
    del no_mtp["mtp_num_layers"]
    mcore_compat.check_config(_cfg(**no_mtp), found="0.16.1")  # no MTP, no MTP gradients lost


def test_per_token_loss_with_mtp_warns_on_016_only(caplog):
    cfg = _cfg(mtp_num_layers=1, calculate_per_token_loss=True)
    mcore_compat.check_config(cfg, found="0.19.2")
    assert "3159" not in caplog.text
    mcore_compat.check_config(cfg, found="0.16.1")
    assert "NVIDIA/Megatron-LM#3159" in caplog.text
    assert mcore_compat.per_token_mtp_loss_rescaled() == (mcore_compat.line() == "0.19")


def test_an_untested_release_is_refused_before_anything_starts():
    with pytest.raises(ConfigError, match="megatron-core='0.18.2'"):
        mcore_compat.check_config(_cfg(mtp_num_layers=1), found="0.18.2")


def test_the_launcher_checks_the_config_against_the_release_before_dry_run(monkeypatch, capsys):
    from mtp_megatron import cli

    monkeypatch.setattr(mcore_compat, "installed_version", lambda: "0.17.1")
    rc = cli.main(["--mtp-num-layers", "1", "--dry-run"])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("error: megatron-core='0.17.1' is not allowed") and "\n" == err[-1]


def test_take_mtp_sums_reads_and_zeroes_the_tracker():
    import torch
    from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper

    mcore_compat.reset_mtp_tracker()
    assert mcore_compat.take_mtp_sums() is None and not mcore_compat.mtp_tracker_has_sums()
    tracker = MTPLossLoggingHelper.tracker
    if mcore_compat.line() == "0.19":
        tracker.update(loss_values=torch.tensor([2.0, 3.0]),
                       correct_values=torch.tensor([1.0, 0.0]),
                       total_values=torch.tensor([4.0, 4.0]))
    else:
        tracker["values"] = torch.tensor([2.0, 3.0])
    sums = mcore_compat.take_mtp_sums()
    assert sums.loss.tolist() == [2.0, 3.0]
    if mcore_compat.line() == "0.19":
        assert sums.correct.tolist() == [1.0, 0.0] and sums.total.tolist() == [4.0, 4.0]
    else:
        assert sums.correct is None and sums.total is None
    again = mcore_compat.take_mtp_sums()
    assert again.loss.tolist() == [0.0, 0.0]  # zeroed for the next window
    mcore_compat.reset_mtp_tracker()


def test_the_repeated_layer_serves_every_depth():
    import torch

    class Block(torch.nn.Module):
        def __init__(self, repeated):
            super().__init__()
            self.layers = torch.nn.ModuleList([torch.nn.Linear(1, 1), torch.nn.Linear(1, 1)])
            self.mtp_use_repeated_layer = repeated

    plain, repeated = Block(False), Block(True)
    assert mcore_compat.mtp_layer_for_depth(plain, 2) is plain.layers[1]
    assert mcore_compat.mtp_layer_for_depth(repeated, 2) is repeated.layers[0]


def test_every_bridged_module_and_function_exists_in_this_release():
    """A release that moved a bridged call would otherwise fail far from its cause."""
    import importlib

    for name in mcore_compat.cpu_bridge_modules():
        assert hasattr(importlib.import_module(name), "torch"), name
    for path in (mcore_compat.cpu_bridge_tensor_cuda_callers()
                 + mcore_compat.cpu_bridge_type_name_checkers()
                 + mcore_compat.cpu_bridge_host_numpy_callers()
                 + mcore_compat.cpu_bridge_eager_functions()):
        module, _, qualname = path.partition(":")
        owner = importlib.import_module(module)
        for part in qualname.split("."):
            owner = getattr(owner, part)
        assert callable(owner), path


def test_workarounds_are_consulted_through_needs_only():
    """Each workaround's code asks ``mcore_compat.needs(name)`` with a name of the table."""
    asked = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "needs"
                    and node.args and isinstance(node.args[0], ast.Constant)):
                asked.add(node.args[0].value)
    assert asked == set(mcore_compat.WORKAROUNDS)
    assert os.path.exists(ROOT / "tests" / "unit" / "test_mcore_workarounds.py")

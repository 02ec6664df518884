"""Boolean negations, flat YAML keys and one-rank error reporting (pure Python)."""

import dataclasses

import pytest

from mtp_megatron import cli
from mtp_megatron.config import SECTIONS, ConfigError, load_config
from mtp_megatron.config.loader import negation_of, parse_cli

BOOLEANS = [(section, f.name) for section, cls in SECTIONS.items()
            for f in dataclasses.fields(cls) if f.metadata.get("type") is bool]


def _flag(name):
    return "--" + name.replace("_", "-")


def test_every_section_has_booleans_to_check():
    assert len(BOOLEANS) >= 10 and ("training", "bf16") in BOOLEANS


@pytest.mark.parametrize("section,name", BOOLEANS, ids=[n for _, n in BOOLEANS])
def test_yaml_true_is_turned_off_by_the_negated_flag(tmp_path, section, name):
    path = tmp_path / "c.yaml"
    path.write_text(f"{section}:\n  {name}: true\n")
    cfg, _ = load_config(["--config", str(path), negation_of(_flag(name))])
    assert getattr(getattr(cfg, section), name) is False
    assert parse_cli([_flag(name)])[1] == {name: True}


def test_negative_switches_are_not_doubled():
    assert negation_of("--no-load-optim") == "--load-optim"
    assert negation_of("--bf16") == "--no-bf16"
    assert parse_cli(["--load-optim", "--no-load-rng"])[1] == {
        "no_load_optim": False, "no_load_rng": True}
    with pytest.raises(ConfigError, match="--no-no-load-optim"):
        parse_cli(["--no-no-load-optim"])


def test_the_last_of_a_flag_and_its_negation_wins():
    assert parse_cli(["--bf16", "--no-bf16"])[1] == {"bf16": False}
    assert parse_cli(["--no-bf16", "--bf16"])[1] == {"bf16": True}


def test_field_names_are_unique_over_sections_and_never_a_section_name():
    names = [f.name for cls in SECTIONS.values() for f in dataclasses.fields(cls)]
    assert len(names) == len(set(names))
    assert not set(names) & set(SECTIONS)


def test_flat_yaml_keys_go_to_their_section(tmp_path):
    path = tmp_path / "flat.yaml"
    path.write_text("mtp_num_layers: 2\nnum_layers: 6\nbf16: true\nmodel:\n  hidden_size: 64\n")
    cfg, _ = load_config(["--config", str(path), "--no-bf16"])
    assert cfg.mtp.mtp_num_layers == 2 and cfg.model.num_layers == 6
    assert cfg.model.hidden_size == 64 and cfg.training.bf16 is False


def test_a_misspelt_flat_key_names_the_closest_valid_key(tmp_path):
    path = tmp_path / "flat.yaml"
    path.write_text("mtp_num_layer: 1\n")
    with pytest.raises(ConfigError, match="'mtp_num_layer'.*Did you mean 'mtp_num_layers'"):
        load_config(["--config", str(path)])


def test_a_key_given_flat_and_sectioned_is_an_error(tmp_path):
    path = tmp_path / "both.yaml"
    path.write_text("mtp_num_layers: 1\nmtp:\n  mtp_num_layers: 2\n")
    with pytest.raises(ConfigError, match="both at the top level and under mtp"):
        load_config(["--config", str(path)])


@pytest.mark.parametrize("env,printed", [
    ({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2"}, True),
    ({"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2"}, False),
    ({"SLURM_PROCID": "3", "SLURM_LOCALID": "3", "SLURM_NTASKS": "4"}, False),
])
def test_a_config_error_is_printed_by_rank_zero_only(monkeypatch, capsys, env, printed):
    slept = []
    monkeypatch.setattr(cli.time, "sleep", slept.append)
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_LOCALID"):
        monkeypatch.delenv(var, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert cli.main(["--mtp-num-layers", "0"]) == 2  # every rank exits non-zero
    err = capsys.readouterr().err
    assert ("--mtp-num-layers=0 is not allowed" in err) is printed, err
    assert err.count("error:") == int(printed)
    # a silent rank outlives the reporting one, so torchrun cannot kill it mid-print
    assert slept == ([] if printed else [cli.SILENT_RANK_GRACE_S])


def test_a_machine_check_is_printed_once_per_node(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("RANK", "4")
    monkeypatch.setenv("LOCAL_RANK", "0")  # first rank of the second node
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("MASTER_ADDR", "node0")
    monkeypatch.setenv("MASTER_PORT", "29500")
    args = ["--global-batch-size", "32", "--load", str(tmp_path / "missing")]
    assert cli.main(args) == 2
    assert capsys.readouterr().err.count("--load=") == 1

"""Build a :class:`RunConfig` from defaults, a YAML file and command-line flags.

Precedence: command line > YAML (``--config file.yaml``) > dataclass defaults.

YAML is sectioned, with the flag names in snake_case::

    model:
      num_layers: 4
    mtp:
      mtp_num_layers: 2

Flat keys (``mtp_num_layers: 2`` at the top level, Megatron-LM style) are accepted too:
every field name belongs to exactly one section. Unknown sections, keys and flags are
errors that suggest the closest valid name. Every boolean flag has a negation
(``--bf16``/``--no-bf16``; ``--no-load-optim``/``--load-optim``), so a YAML ``true`` can
be turned off from the command line. A key or section given twice in one file is an
error (PyYAML would keep the last silently).
A YAML string is read like the flag's text on the command line: ``lr: 1e-3`` (a string
to PyYAML, whose floats need a dot) is the float 0.001; integer flags take integer
spellings only (``train_iters: 1e5`` is an error naming the flag, as ``--train-iters
1e5`` is).

    cfg, run = load_config(["--config", "examples/tiny.yaml", "--mtp-num-layers", "2"])
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import sys
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

import yaml

from mtp_megatron.config.fields import ConfigError, flag_of
from mtp_megatron.config.run import SECTIONS, RunConfig

logger = logging.getLogger(__name__)



@dataclass(frozen=True)
class RunOptions:
    """What to do with the config: train it or only plan it."""

    config_path: Optional[str] = None
    dry_run: bool = False
    gpu_memory_gb: Optional[float] = None  # --dry-run: flag stages that need more
    mfu: float = 0.4  # --dry-run: model FLOPs utilisation for the tokens/s estimate


def _field_to_section() -> Dict[str, str]:
    return {f.name: section for section, cls in SECTIONS.items() for f in dataclasses.fields(cls)}


def negation_of(flag: str) -> str:
    """The flag that turns a switch off: ``--bf16`` -> ``--no-bf16``; a switch that is
    itself negative loses its ``--no-`` instead (``--no-load-optim`` -> ``--load-optim``)."""
    return "--" + flag[len("--no-"):] if flag.startswith("--no-") else "--no-" + flag[2:]


def _on_off(default: bool, flag: str) -> str:
    return flag if default else negation_of(flag)


class _Switch(argparse.Action):
    """A boolean flag and its negation (the first option string sets True), so a YAML
    ``true`` can be turned off from the command line."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, option_string == self.option_strings[0])

    def format_usage(self) -> str:
        return " | ".join(self.option_strings)


def build_parser() -> argparse.ArgumentParser:
    """An argparse parser with one flag per config field; absent flags stay absent."""
    parser = argparse.ArgumentParser(
        prog="pretrain_gpt_mtp.py",
        description="Pretrain a GPT with multi-token prediction on megatron-core.",
        argument_default=argparse.SUPPRESS,
        allow_abbrev=False,
    )
    parser.add_argument("--config", help="YAML file with sectioned settings (see examples/).")
    parser.add_argument(
        "--dry-run", action="store_true",
        help="Validate, print the plan (rank layout, parameters, FLOPs) and exit.",
    )
    parser.add_argument(
        "--gpu-memory-gb", type=float, metavar="GIB",
        help="With --dry-run: GPU memory in GiB; stages whose estimate exceeds it are flagged "
        "and the exit code is 2 (default: checked against 80 GiB as advice, exit 0).",
    )
    parser.add_argument(
        "--mfu", type=float, metavar="FRACTION",
        help="With --dry-run: model FLOPs utilisation for the tokens/s estimate (default: 0.4).",
    )
    for section, cls in SECTIONS.items():
        group = parser.add_argument_group(section)
        for f in dataclasses.fields(cls):
            meta = f.metadata
            flag = meta.get("flag") or flag_of(f.name)
            if meta["type"] is bool:
                group.add_argument(flag, negation_of(flag), dest=f.name, action=_Switch,
                                   help=_help(f, flag))
            else:
                group.add_argument(
                    flag, dest=f.name, type=meta["type"], choices=meta["choices"],
                    nargs=meta.get("nargs"),
                    metavar=f.name.upper() if not meta["choices"] else None,
                    help=_help(f, flag),
                )
    return parser


def _help(f: dataclasses.Field, flag: str) -> str:
    """A field's help with its default, '%' escaped (argparse %-formats help strings)."""
    text = f.metadata["help"]
    if f.metadata["type"] is bool:
        text += f" (default: {_on_off(f.default, flag)})"
    elif "(default:" not in text:
        text += f" (default: {f.default})"
    return text.replace("%", "%%")




def parse_cli(argv: Sequence[str]) -> tuple[RunOptions, Dict[str, Any]]:
    """Parse flags into (run options, {field: value}) for the flags actually given."""
    parser = build_parser()
    known, unknown = parser.parse_known_args(list(argv))
    if unknown:
        flags = [a for a in parser._option_string_actions if a.startswith("--")]
        bad = next((u for u in unknown if u.startswith("-")), unknown[0])
        raise ConfigError.unknown("flag", bad.split("=", 1)[0], flags)
    values = vars(known)
    options = RunOptions(
        config_path=values.pop("config", None), dry_run=values.pop("dry_run", False),
        gpu_memory_gb=values.pop("gpu_memory_gb", None), mfu=values.pop("mfu", 0.4),
    )
    _check_plan_options(options)
    return options, values


def _check_plan_options(options: RunOptions) -> None:
    gib = options.gpu_memory_gb
    if gib is not None and not (math.isfinite(gib) and gib > 0):
        raise ConfigError("--gpu-memory-gb", gib, "a positive number of GiB")
    if not (math.isfinite(options.mfu) and 0 < options.mfu <= 1):
        raise ConfigError("--mfu", options.mfu, "a fraction in (0, 1]")
    if not options.dry_run and (gib is not None or options.mfu != 0.4):
        logger.warning("--gpu-memory-gb and --mfu only affect --dry-run; ignored for training.")


def read_yaml(path: str) -> Dict[str, Dict[str, Any]]:
    """Read a YAML file into ``{section: {key: value}}``; unknown sections or keys are
    errors."""
    if os.path.isdir(path):
        raise ConfigError("--config", path, "a YAML file", "it is a directory")
    if not os.path.isfile(path):
        raise ConfigError("--config", path, "an existing YAML file", "file not found")
    try:
        with open(path, encoding="utf-8") as fh:
            data = _yaml_load_unique(fh, path) or {}
    except yaml.YAMLError as exc:
        raise ConfigError("--config", path, "valid YAML", str(exc).splitlines()[0]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError("--config", path, "a UTF-8 text file",
                          f"byte {exc.start} is not UTF-8 (a binary file?)") from None
    if not isinstance(data, dict):
        raise ConfigError("--config", path, "a mapping of sections (model:, mtp:, ...)")
    return _sectioned(data, path)


def _sectioned(data: Dict[str, Any], path: str) -> Dict[str, Dict[str, Any]]:
    """Sections as given, plus flat keys (``mtp_num_layers: 1`` at the top level, as
    Megatron-LM and NeMo users write them) moved into the one section that owns them."""
    owner = _field_to_section()
    out: Dict[str, Dict[str, Any]] = {}
    for section, body in data.items():
        if section in SECTIONS:
            if not isinstance(body, dict):
                raise ConfigError("--config", path, f"a mapping under {section}:")
            _check_keys(section, body, path)
            out.setdefault(section, {}).update(body)
        elif section not in owner:
            raise ConfigError.unknown("key", str(section), [*SECTIONS, *owner], where=path)
    for key, value in data.items():
        if key in SECTIONS:
            continue
        body = out.setdefault(owner[key], {})
        if key in body:
            raise ConfigError("--config", path, f"{key} given once",
                              f"{key} is set both at the top level and under {owner[key]}:")
        body[key] = value
    return out


def _check_keys(section: str, body: Dict[str, Any], path: str) -> None:
    names = [f.name for f in dataclasses.fields(SECTIONS[section])]
    for key in body:
        if key in names:
            continue
        owner = _field_to_section().get(key)
        if owner:
            raise ConfigError(
                "--config", path, f"{key} under {owner}:", f"{key} is not a {section} key"
            )
        raise ConfigError.unknown(
            "key", f"{section}.{key}", [f"{section}.{n}" for n in names], where=path
        )


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader, but a key repeated in one mapping is an error."""

    path = "<yaml>"

    def construct_mapping(self, node, deep=False):
        seen: Dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # '<<: *anchor' may repeat keys
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                first = seen.setdefault(key, line)
            except TypeError:  # an unhashable key: SafeLoader reports it
                continue
            if first != line:
                raise ConfigError("--config", self.path, "each key once per mapping",
                                  f"{key!r} is given on line {first} and again on line {line}; "
                                  "the second would silently replace the first")
        return super().construct_mapping(node, deep)


def _yaml_load_unique(stream, path: str) -> Any:
    """``yaml.safe_load`` that rejects duplicate keys and sections, naming key and file."""
    loader = _UniqueKeyLoader(stream)
    loader.path = path
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def _numbers_from_strings(section: str, body: Dict[str, Any]) -> Dict[str, Any]:
    """Parse strings given to int/float fields the way the command line parses the flag."""
    types = {f.name: f.metadata.get("type") for f in dataclasses.fields(SECTIONS[section])}
    out = dict(body)
    for key, value in body.items():
        kind = types.get(key)
        if not isinstance(value, str) or kind not in (int, float):
            continue
        try:
            out[key] = kind(value.strip())
        except ValueError:
            if kind is int and _is_integral(value):
                raise ConfigError(flag_of(key), value, "an integer",
                                  f"write {int(float(value)):d}; integer flags take no "
                                  "float notation") from None
    return out


def _is_integral(text: str) -> bool:
    try:
        number = float(text)
    except ValueError:
        return False
    return math.isfinite(number) and number == int(number)


def build_config(
    yaml_values: Optional[Dict[str, Dict[str, Any]]] = None,
    cli_values: Optional[Dict[str, Any]] = None,
    world_size: Optional[int] = None,
) -> RunConfig:
    """Merge defaults < YAML < CLI (and the launcher's world size) into a validated RunConfig."""
    merged: Dict[str, Dict[str, Any]] = {name: {} for name in SECTIONS}
    for section, body in (yaml_values or {}).items():
        merged[section].update(_numbers_from_strings(section, body))
    owner = _field_to_section()
    for key, value in (cli_values or {}).items():
        merged[owner[key]][key] = value
    if world_size is not None and "world_size" not in merged["parallel"]:
        merged["parallel"]["world_size"] = world_size
    return RunConfig(**{name: SECTIONS[name](**body) for name, body in merged.items()})


def load_config(argv: Optional[Sequence[str]] = None, world_size: Optional[int] = None,
                world_var: str = "") -> tuple[RunConfig, RunOptions]:
    """The launcher's entry: parse argv, read --config, apply precedence, validate.

    ``world_size`` is the launcher's (read once, by
    ``runtime.launch_env.launcher_world_size``, from ``world_var``); None outside a
    launcher."""
    argv = sys.argv[1:] if argv is None else argv
    options, cli_values = parse_cli(argv)
    yaml_values = read_yaml(options.config_path) if options.config_path else None
    given = cli_values.get("world_size")
    if world_size and given is not None and given != world_size and not options.dry_run:
        # before the sections' checks, which would judge the batch for the wrong DP size
        origin = f" ({world_var})" if world_var else ""
        raise ConfigError("--world-size", given, f"the launcher's world size {world_size}"
                          f"{origin}, or leave it out", "--world-size is for --dry-run plans")
    cfg = build_config(yaml_values, cli_values, world_size)
    return cfg, options


def to_dict(cfg: RunConfig) -> Dict[str, Dict[str, Any]]:
    return {name: dataclasses.asdict(getattr(cfg, name)) for name in SECTIONS}


def save_config(cfg: RunConfig, path: str) -> None:
    """Write the resolved config as sectioned YAML (loadable with --config)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        yaml.safe_dump(to_dict(cfg), fh, sort_keys=False)
    os.replace(tmp, path)


def cli_flags() -> List[str]:
    return [a for a in build_parser()._option_string_actions if a.startswith("--")]

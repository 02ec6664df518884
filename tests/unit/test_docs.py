"""The docs cannot drift from the code (in the spirit of torchtitan's CLI-freeze test).

* README's flag table states each flag's dataclass default (numbers compared as numbers;
  ``off``/``on`` for switches and unset values; the few defaults the table words in prose
  are listed here with the value they stand for, so a changed default fails either way);
  every flag in it exists.
* README's Layout section lists exactly the package's subpackages and top-level modules.
* Every file path, ``path.py::name`` and dotted ``mtp_megatron.module(.name)`` cited in
  README.md and docs/*.md exists.
* Every ``examples/*.yaml``, every YAML block and every launcher command shown in the docs
  parses into a valid config (``load_config``: unknown flags and bad values fail here).

A slower tier runs the shown commands themselves (tests/functional/test_doc_commands.py).
"""

from __future__ import annotations

import ast
import dataclasses
import pathlib
import re
import shlex

import pytest
import yaml

from mtp_megatron.config import SECTIONS, load_config
from mtp_megatron.config.fields import flag_of

ROOT = pathlib.Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README] + DOCS

# Defaults the table words in prose: flag -> (the dataclass default, the README's words).
PROSE = {
    "--mtp-num-layers": (None, "off"),
    "--mtp-loss-scaling-factor-final": (None, "the factor"),
    "--mtp-loss-scaling-factor-decay-iters": (None, "`--train-iters`"),
    "--ffn-hidden-size": (None, "Megatron-LM's: 4h, with SwiGLU int(8h/3/64)·64 (320 at h=128)"),
    "--num-query-groups": (None, "heads"),
    "--max-position-embeddings": (None, "seq"),
    "--vocab-size": (None, "tokenizer's"),
    "--untie-embeddings-and-output-weights": (False, "tied"),
    "--lr-warmup-iters": (None, "10%"),
    "--transformer-impl": (None, "TE on GPU, else local"),
    "--ckpt-keep-last": (None, "all"),
    "--wandb-exp-name": (None, "output dir's name"),
    "--wandb-save-dir": (None, "`<output-dir>/wandb`"),
    "--peak-tflops": (None, "GPU table"),
    "--ddp-bucket-size": (None, "mcore's"),
    "--moe-ffn-hidden-size": (None, "MLP width"),
    "--moe-shared-expert-intermediate-size": (None, "none"),
    "--moe-router-topk-scaling-factor": (None, "none"),
    "--moe-router-num-groups": (None, "none"),
    "--moe-router-group-topk": (None, "none"),
    "--q-lora-rank": (None, "none"),
    "--expert-tensor-parallel-size": (None, "TP"),
    "--save": (None, "off"), "--load": (None, "off"), "--save-interval": (None, "off"),
    "--world-size": (None, "the launcher's"),
}
NOT_FIELDS = {"--dry-run", "--config", "--gpu-memory-gb", "--mfu"}  # run options


def _fields():
    """flag -> dataclass default, for every config field."""
    out = {}
    for section in SECTIONS.values():
        for f in dataclasses.fields(section):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            out[f.metadata.get("flag") or flag_of(f.name)] = default
    return out


def _table_rows():
    lines = README.read_text().splitlines()
    start = lines.index("| flag | default | meaning |")
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            return
        cells = [c.strip() for c in line.strip("|").split("|")]
        flags = [f.split()[0] for f in re.findall(r"`(--[a-z0-9-]+(?: [A-Z])?)`", cells[0])]
        defaults = [d.strip() for d in cells[1].split(" / ")] if cells[1] else []
        yield flags, defaults, line


def _matches(flag, default, shown):
    if flag in PROSE:
        value, words = PROSE[flag]
        return default == value and shown == words
    if isinstance(default, bool):
        return shown == ("on" if default else "off")
    if default is None or default == ():
        return shown == "off"
    if isinstance(default, (int, float)):
        try:
            return float(shown) == float(default)
        except ValueError:
            return False
    return shown == str(default)


def test_every_flag_row_states_the_dataclass_default():
    fields = _fields()
    wrong, unknown, rows = [], [], 0
    for flags, defaults, _line in _table_rows():
        rows += 1
        for i, flag in enumerate(flags):
            if flag in NOT_FIELDS:
                continue
            if flag not in fields:
                unknown.append(flag)
                continue
            shown = defaults[i] if len(defaults) == len(flags) else (defaults or [""])[0]
            if not _matches(flag, fields[flag], shown):
                wrong.append(f"{flag}: README says {shown!r}, the default is {fields[flag]!r}")
    assert rows > 40
    assert not unknown, f"README flags that do not exist: {unknown}"
    assert not wrong, wrong


def test_the_prose_defaults_are_still_the_dataclass_defaults():
    fields = _fields()
    stale = {flag: fields.get(flag, "no such flag") for flag, (value, _) in PROSE.items()
             if fields.get(flag, "no such flag") != value}
    assert not stale, stale


# --- the Layout section --------------------------------------------------------------

def _layout_block():
    text = README.read_text()
    block = text.split("## Layout", 1)[1].split("```", 2)[1]
    return [line for line in block.splitlines() if line.strip()]


def test_the_layout_section_lists_exactly_the_package():
    package = ROOT / "mtp_megatron"
    actual = {f"mtp_megatron/{p.name}/" for p in package.iterdir()
              if p.is_dir() and (p / "__init__.py").exists()}
    actual |= {f"mtp_megatron/{p.name}" for p in package.glob("*.py")
               if p.name not in ("__init__.py", "__main__.py")}
    listed = {line.split()[0] for line in _layout_block() if line.startswith("mtp_megatron/")}
    assert listed == actual, (sorted(actual - listed), sorted(listed - actual))
    for line in _layout_block():
        if line.startswith("mtp_megatron/"):
            assert len(line.split(None, 1)) == 2, f"no one-line purpose: {line}"


# --- what the docs cite --------------------------------------------------------------

PATH = re.compile(r"`((?:mtp_megatron|tests|scripts|launch|benchmarks|examples|docs|\.ci)"
                  r"/[\w./-]*[\w/])(?:::(\w+))?`")
DOTTED = re.compile(r"`(mtp_megatron(?:\.\w+)+)`")


def _defined(path: pathlib.Path, name: str) -> bool:
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) \
                and node.name == name:
            return True
        if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == name for t in node.targets):
            return True
    return False


def _resolve_dotted(dotted: str) -> bool:
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        base = ROOT.joinpath(*parts[:cut])
        rest = parts[cut:]
        for candidate in (base.with_suffix(".py"), base / "__init__.py"):
            if candidate.exists():
                return not rest or (len(rest) == 1 and _defined(candidate, rest[0]))
    return False


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_cited_path_and_name_exists(page):
    missing = []
    for match in PATH.finditer(page.read_text()):
        path, name = ROOT / match.group(1), match.group(2)
        if any(ch in match.group(1) for ch in "*<>"):
            continue
        if not path.exists():
            missing.append(match.group(1))
        elif name and not _defined(path, name):
            missing.append(f"{match.group(1)}::{name}")
    for match in DOTTED.finditer(page.read_text()):
        if not _resolve_dotted(match.group(1)):
            missing.append(match.group(1))
    assert not missing, missing


# --- what the docs show parses --------------------------------------------------------

def _code_blocks(page):
    return re.findall(r"```(\w*)\n(.*?)```", page.read_text(), re.S)


def _commands(block):
    text = block.replace("\\\n", " ")
    for line in text.splitlines():
        line = line.split(" #", 1)[0].strip()
        if line and not line.startswith("#"):
            yield line


def _launcher_args(command):
    """The launcher's arguments in a shown command, or None if it is no launcher run."""
    if "pretrain_gpt_mtp.py" not in command and "mtp-pretrain" not in command:
        return None
    words = shlex.split(command)
    for i, word in enumerate(words):
        if word.endswith("launch/pretrain_gpt_mtp.py") or word == "mtp-pretrain":
            return words[i + 1:]
    return None


def _placeholder(args):
    return any(re.search(r"[<>$]|\.\.\.", a) for a in args)


def _world(command):
    match = re.search(r"--nproc-per-node[ =](\d+)", command)
    return int(match.group(1)) if match else 1


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_launcher_command_shown_parses(page, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    checked = 0
    for lang, block in _code_blocks(page):
        if lang not in ("", "bash", "sh", "console"):
            continue
        for command in _commands(block):
            args = _launcher_args(command)
            if args is None or _placeholder(args) or "--help" in args:
                continue
            config = [a for a in args if a.endswith((".yaml", ".yml"))]
            if any(not (ROOT / c).exists() for c in config):
                continue  # a user's own file (my.yaml)
            load_config(args, None if "--dry-run" in args else _world(command))
            checked += 1
    if page == README:
        assert checked >= 3


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_yaml_block_shown_parses(page):
    from mtp_megatron.config import build_config

    for lang, block in _code_blocks(page):
        if lang not in ("yaml", "yml"):
            continue
        values = yaml.safe_load(block)
        if isinstance(values, dict) and set(values) & set(SECTIONS):
            build_config(values, None, None)


@pytest.mark.parametrize("path", sorted((ROOT / "examples").rglob("*.yaml")),
                         ids=lambda p: p.name)
def test_every_example_parses(path):
    values = yaml.safe_load(path.read_text())
    assert isinstance(values, dict)
    if set(values) & set(SECTIONS):  # a run config (experiments/ hold sweep specs)
        load_config(["--config", str(path)], None)

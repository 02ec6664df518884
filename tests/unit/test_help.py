"""``--help`` of every entry point exits 0 and lists every flag (issue 15, item 1)."""

import dataclasses
import os
import re
import subprocess
import sys
from dataclasses import dataclass

import pytest

from mtp_megatron.config import loader
from mtp_megatron.config.fields import flag_of, option
from mtp_megatron.config.run import SECTIONS

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Each in a fresh interpreter, as a user runs it. (``python -m mtp_megatron.data.preprocess``
# imports megatron-core at start-up, ~5 s: it runs in-process below.)
ENTRY_POINTS = {
    "pretrain": [os.path.join("launch", "pretrain_gpt_mtp.py")],
    "generate-module": ["-m", "mtp_megatron.generate"],
    "generate-launcher": [os.path.join("launch", "generate_mtp.py")],
}


def _help(args):
    proc = subprocess.run([sys.executable, *args, "--help"], capture_output=True, text=True,
                          cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    return proc.stdout


@pytest.mark.functional
@pytest.mark.parametrize("name", sorted(ENTRY_POINTS))
def test_help_of_every_entry_point_exits_0(name):
    out = _help(ENTRY_POINTS[name])
    assert out.startswith("usage:") and "--help" in out


def test_preprocess_help_exits_0(capsys):
    from mtp_megatron.data import preprocess

    with pytest.raises(SystemExit) as exit_:
        preprocess.main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage:") and "--strict" in out and "--output-prefix" in out


@pytest.mark.functional
def test_pretrain_help_lists_every_config_flag():
    out = _help(ENTRY_POINTS["pretrain"])
    fields = [f for cls in SECTIONS.values() for f in dataclasses.fields(cls)]
    flags = {f.metadata.get("flag") or flag_of(f.name) for f in fields}
    assert len(flags) == len(fields) > 40
    assert flags <= set(loader.cli_flags())
    missing = [flag for flag in loader.cli_flags()
               if not re.search(rf"(?m)^  (-\w, )?(--[\w-]+, )*{re.escape(flag)}(,| |$)", out)]
    assert not missing, missing
    assert "Linear warmup steps (default: 10% of the decay steps)." in out
    assert "(default: 10% of the decay steps). (default: None)" not in out


def test_any_percent_in_a_help_text_is_printed_literally(monkeypatch):
    @dataclass(frozen=True)
    class Odd:
        odd_flag: int = option(3, "Keep 10% of %(prog)s and %o here.", type=int)
        odd_switch: bool = option(False, "100% on.", type=bool)

    monkeypatch.setattr(loader, "SECTIONS", {**SECTIONS, "odd": Odd})
    text = " ".join(loader.build_parser().format_help().split())
    assert "Keep 10% of %(prog)s and %o here. (default: 3)" in text
    assert "100% on." in text

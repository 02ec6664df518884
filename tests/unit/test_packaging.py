"""setup.py, both constraints files, the Makefile and mcore_compat agree; the console
scripts resolve.

The declared megatron-core range must be exactly what CI runs: per Python version, the
release line ``runtime/mcore_compat.py`` supports and the constraints file pins.
"""

import ast
import importlib
import os
import re
import subprocess
import sys

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from mtp_megatron.runtime import mcore_compat

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# constraints file -> (the Python it is resolved for, the megatron-core line it pins)
STACKS = {"constraints.txt": ("3.12", "0.19"), "constraints-compat.txt": ("3.11", "0.16")}


def _setup_kwargs():
    tree = ast.parse(open(os.path.join(ROOT, "setup.py")).read())
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call)
                and getattr(n.func, "id", None) == "setup")
    return {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords
            if kw.arg in ("install_requires", "python_requires", "entry_points",
                          "extras_require")}


def _pins(name):
    pins = {}
    for line in open(os.path.join(ROOT, name)):
        line = line.split("#")[0].strip()
        if line:
            req = Requirement(line)
            pins[req.name.lower()] = next(iter(req.specifier)).version
    return pins


def _requirements_for(python, lines):
    """The requirements that apply on ``python`` (markers evaluated)."""
    env = {"python_version": python, "python_full_version": python + ".0"}
    reqs = [Requirement(line) for line in lines]
    return [r for r in reqs if r.marker is None or r.marker.evaluate(env)]


def test_console_scripts_resolve_to_callables():
    scripts = _setup_kwargs()["entry_points"]["console_scripts"]
    names = {s.split("=")[0].strip() for s in scripts}
    assert names == {"mtp-pretrain", "mtp-generate", "mtp-preprocess"}
    for spec in scripts:
        module, func = spec.split("=")[1].strip().split(":")
        assert callable(getattr(importlib.import_module(module), func)), spec


@pytest.mark.parametrize("constraints", sorted(STACKS))
def test_requirements_are_ranges_and_each_stacks_pins_fall_inside_them(constraints):
    python, line = STACKS[constraints]
    pins = _pins(constraints)
    reqs = _requirements_for(python, _setup_kwargs()["install_requires"])
    for req in reqs:
        assert not any(s.operator == "==" for s in req.specifier), f"{req} is an exact pin"
        assert req.name.lower() in pins, f"{req.name} has no pin in {constraints}"
        assert req.specifier.contains(pins[req.name.lower()]), (str(req), pins[req.name])
    torch = next(r for r in reqs if r.name == "torch")
    assert torch.specifier.contains("2.6") and torch.specifier.contains("2.13.0")
    assert mcore_compat.line_of(pins["megatron-core"]) == line


@pytest.mark.parametrize("python,line", [("3.12", "0.19"), ("3.11", "0.16")])
def test_the_declared_megatron_core_range_is_exactly_the_tested_line(python, line):
    """Never a version CI does not run: on each Python, setup.py's range is the line's."""
    (mcore,) = [r for r in _requirements_for(python, _setup_kwargs()["install_requires"])
                if r.name == "megatron-core"]
    spec, line_python = mcore_compat.LINES[line]
    assert mcore.specifier == SpecifierSet(spec) and line_python == python
    for version in ("0.16.0", "0.17.1", "0.18.2", "0.19.1", "0.20.0"):
        assert not mcore.specifier.contains(version)  # untested: never declared


def test_python_requires_is_the_two_tested_pythons():
    allowed = SpecifierSet(_setup_kwargs()["python_requires"])
    assert allowed.contains("3.11") and allowed.contains("3.12")
    assert not allowed.contains("3.10") and not allowed.contains("3.13")  # nothing tests them
    assert allowed.contains("{}.{}".format(*sys.version_info[:2]))


def test_the_makefile_builds_each_stack_from_its_constraints():
    makefile = open(os.path.join(ROOT, "Makefile")).read()
    assert "PYTHON ?= $(shell scripts/find_python.sh 3.12)" in makefile
    assert "COMPAT_PYTHON ?= $(shell scripts/find_python.sh 3.11)" in makefile
    assert re.search(r"\$\(PYTHON\),\$\(VENV\),3\.12,constraints\.txt", makefile)
    assert re.search(r"\$\(COMPAT_PYTHON\),\$\(COMPAT_VENV\),3\.11,constraints-compat\.txt",
                     makefile)


@pytest.mark.functional
def test_find_python_skips_a_refusing_shim_and_says_how_to_choose(tmp_path):
    """A `python3.12` on PATH that refuses to run (a pyenv shim) is skipped for pyenv's
    versions folder; with nothing usable the message names PYTHON=."""
    shim = tmp_path / "bin" / "python3.12"
    shim.parent.mkdir()
    shim.write_text("#!/bin/sh\necho 'pyenv: python3.12: command not found' >&2\nexit 127\n")
    shim.chmod(0o755)
    real = tmp_path / "pyenv" / "versions" / "3.12.9" / "bin" / "python3.12"
    real.parent.mkdir(parents=True)
    real.write_text(f"#!/bin/sh\nexec {sys.executable} -c "
                    "'import sys; sys.exit(0)' \"$@\"\n")
    real.chmod(0o755)
    env = {"PATH": f"{shim.parent}:/usr/bin:/bin", "PYENV_ROOT": str(tmp_path / "pyenv"),
           "HOME": str(tmp_path)}
    script = os.path.join(ROOT, "scripts", "find_python.sh")
    out = subprocess.run([script, "3.12"], env=env, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == str(real), out
    real.unlink()
    out = subprocess.run([script, "3.12"], env=env, capture_output=True, text=True)
    assert out.returncode == 1 and out.stdout == ""
    assert "make PYTHON=/path/to/python3.12" in out.stderr


def test_the_te_extra_is_what_each_megatron_core_line_declares():
    te = _setup_kwargs()["extras_require"]["te"]
    (main,) = _requirements_for("3.12", te)
    (floor,) = _requirements_for("3.11", te)
    # megatron-core 0.19.2's own `te` extra: transformer-engine[pytorch,core_cu13], unbounded
    assert main.name == "transformer-engine" and main.extras == {"pytorch", "core_cu13"}
    assert str(main.specifier) == ""
    # megatron-core 0.16.1's dev extra
    assert floor.specifier == SpecifierSet(">=2.9.0a0,<2.12.0")


def test_the_dev_extra_carries_what_the_optional_tests_need():
    dev = _setup_kwargs()["extras_require"]["dev"]
    assert {"pytest", "ruff", "wandb", "matplotlib"} <= set(dev)

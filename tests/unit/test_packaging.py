"""setup.py, constraints.txt and the Makefile agree, and the console scripts resolve."""

import ast
import importlib
import os
import re
import sys

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _setup_kwargs():
    tree = ast.parse(open(os.path.join(ROOT, "setup.py")).read())
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call)
                and getattr(n.func, "id", None) == "setup")
    return {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords
            if kw.arg in ("install_requires", "python_requires", "entry_points",
                          "extras_require")}


def _pins():
    pins = {}
    for line in open(os.path.join(ROOT, "constraints.txt")):
        line = line.split("#")[0].strip()
        if line:
            req = Requirement(line)
            pins[req.name.lower()] = next(iter(req.specifier)).version
    return pins


def test_console_scripts_resolve_to_callables():
    scripts = _setup_kwargs()["entry_points"]["console_scripts"]
    names = {s.split("=")[0].strip() for s in scripts}
    assert names == {"mtp-pretrain", "mtp-generate", "mtp-preprocess"}
    for spec in scripts:
        module, func = spec.split("=")[1].strip().split(":")
        assert callable(getattr(importlib.import_module(module), func)), spec


def test_requirements_are_ranges_and_the_pins_fall_inside_them():
    kwargs = _setup_kwargs()
    pins = _pins()
    for line in kwargs["install_requires"]:
        req = Requirement(line)
        assert not any(s.operator == "==" for s in req.specifier), f"{line} is an exact pin"
        assert req.name.lower() in pins, f"{req.name} has no pin in constraints.txt"
        assert req.specifier.contains(pins[req.name.lower()]), (line, pins[req.name.lower()])
    torch = next(Requirement(r) for r in kwargs["install_requires"] if r.startswith("torch"))
    assert torch.specifier.contains("2.6") and torch.specifier.contains("2.13.0")


def test_python_requires_agrees_with_the_makefile_and_this_interpreter():
    allowed = SpecifierSet(_setup_kwargs()["python_requires"])
    makefile = open(os.path.join(ROOT, "Makefile")).read()
    major, minor = re.search(r"sys.version_info\[:2\] == \((\d+), (\d+)\)", makefile).groups()
    assert allowed.contains(f"{major}.{minor}")
    assert allowed.contains("{}.{}".format(*sys.version_info[:2]))
    assert not allowed.contains("3.10")  # nothing tests it
    assert "-c constraints.txt" in makefile


def test_the_dev_extra_carries_what_the_optional_tests_need():
    dev = _setup_kwargs()["extras_require"]["dev"]
    assert {"pytest", "ruff", "wandb", "matplotlib"} <= set(dev)

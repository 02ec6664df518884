"""Imports run downward only: each subpackage imports from lower layers, never upward.

    config, exit_codes                  what every layer reads
    runtime                             process groups, megatron-core adapter, CPU bridge
    data, model, checkpoint             built on the runtime, independent of each other
    plan, training                      the planner, the loop
    inference, plot                     what reads a trained run
    hf, experiments, generate           tools built on inference and training
    cli                                 the launcher's body

(checkpoint/ used to import training/optim.py for ``sub_optimizers``; it lives in
runtime/optimizer_parts.py now.) Function-level imports count too.
"""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[2] / "mtp_megatron"
LAYERS = {
    "config": 0, "exit_codes": 0,
    "runtime": 1,
    "data": 2, "model": 2, "checkpoint": 2,
    "plan": 3, "training": 3,
    "inference": 4, "plot": 4,
    "hf": 5, "experiments": 5, "generate": 5,
    "cli": 6,
}


def _part(path: pathlib.Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _imports(path: pathlib.Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "mtp_megatron" and len(parts) > 1:
                yield node.lineno, parts[1]


def test_every_part_of_the_package_has_a_layer():
    parts = {_part(p) for p in PACKAGE.rglob("*.py") if p.name != "__init__.py"
             or p.parent != PACKAGE}
    parts.discard("__main__")
    assert parts <= set(LAYERS), sorted(parts - set(LAYERS))


@pytest.mark.parametrize("part", sorted(LAYERS))
def test_imports_go_down_only(part):
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if _part(path) != part:
            continue
        for lineno, target in _imports(path):
            if target != part and target in LAYERS and LAYERS[target] >= LAYERS[part]:
                upward.append(f"{path.relative_to(PACKAGE.parent)}:{lineno} imports {target}")
    assert not upward, upward

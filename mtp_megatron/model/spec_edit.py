"""Edit megatron-core layer specs: swap one module class for another everywhere in a spec.

A spec is a tree of ``ModuleSpec`` / submodule dataclasses, lists, dicts and
``functools.partial`` builders; :func:`replace_module` returns a copy with every
occurrence of one class replaced (the original is untouched, so megatron-core's cached
specs stay as they were).

    spec = replace_module(get_gpt_decoder_block_spec(config, False), WrappedTorchNorm, MyNorm)
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any


def replace_module(spec: Any, old: type, new: Any) -> Any:
    """A copy of ``spec`` with each ``old`` (a class in the spec tree) replaced by ``new``."""
    if spec is old:
        return new
    if isinstance(spec, (list, tuple)):
        return type(spec)(replace_module(s, old, new) for s in spec)
    if isinstance(spec, dict):
        return {k: replace_module(v, old, new) for k, v in spec.items()}
    if isinstance(spec, functools.partial):
        return functools.partial(replace_module(spec.func, old, new),
                                 *replace_module(spec.args, old, new),
                                 **replace_module(spec.keywords, old, new))
    if dataclasses.is_dataclass(spec) and not isinstance(spec, type):
        return dataclasses.replace(spec, **{
            f.name: replace_module(getattr(spec, f.name), old, new)
            for f in dataclasses.fields(spec) if f.init})
    return spec

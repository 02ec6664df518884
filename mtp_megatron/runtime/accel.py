"""Transformer Engine, detected lazily, and what FP8 needs from the GPU and TE.

TE is not a dependency but the ``te`` extra (GPU only). NVIDIA apex is not used by this
package: megatron-core picks up its fused kernels itself where an NGC image ships it
(and falls back to torch without it); the PyPI package named ``apex`` is unrelated.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from mtp_megatron.config import ConfigError


@functools.lru_cache(maxsize=None)
def te_available() -> bool:
    """True when Transformer Engine's PyTorch extension imports."""
    if importlib.util.find_spec("transformer_engine") is None:
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # built for another CUDA, or no GPU driver
        return False
    return True


def resolve_transformer_impl(requested: str | None) -> str:
    """``--transformer-impl`` as given, or transformer_engine on a GPU with TE, else local."""
    if requested == "transformer_engine" and not te_available():
        raise ConfigError(
            "--transformer-impl", requested, "local (Transformer Engine is not installed here)",
            "install the te extra on a CUDA machine: pip install -e .[te]",
        )
    if requested:
        return requested
    return "transformer_engine" if torch.cuda.is_available() and te_available() else "local"


@dataclass(frozen=True)
class _RecipeNeeds:
    min_capability: Tuple[int, int]
    below_capability: Optional[Tuple[int, int]]  # None: any newer GPU too
    min_te: str
    te_check: str  # Transformer Engine's own support check, where it has one
    gpus: str


# What each --fp8-recipe needs (megatron-core 0.16.1 maps them to TE recipes in
# fp8_utils.get_fp8_recipe; the TE minimums are the ones it checks there).
FP8_RECIPE_NEEDS = {
    "delayed": _RecipeNeeds((8, 9), None, "1.0", "check_fp8_support", "Ada, Hopper, Blackwell"),
    "tensorwise": _RecipeNeeds((8, 9), None, "2.2", "check_fp8_support",
                               "Ada, Hopper, Blackwell"),
    "blockwise": _RecipeNeeds((9, 0), (10, 0), "2.3", "check_fp8_block_scaling_support",
                              "Hopper"),
    "mxfp8": _RecipeNeeds((10, 0), None, "2.1", "check_mxfp8_support", "Blackwell"),
}


def _te_version() -> Optional[str]:
    try:
        import transformer_engine

        return str(transformer_engine.__version__)
    except Exception:  # not installed, or no usable build here
        return None


def _version_tuple(version: str) -> Tuple[int, ...]:
    parts = []
    for piece in version.split("+")[0].split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def _te_support_check(name: str) -> Optional[Tuple[bool, str]]:
    """Transformer Engine's own verdict (``fp8`` in TE 1.x/2.x, ``quantization`` later);
    None when this TE has no such check."""
    for module in ("transformer_engine.pytorch.fp8", "transformer_engine.pytorch.quantization"):
        try:
            check = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            continue
        ok, reason = check()
        return bool(ok), str(reason)
    return None


def fp8_recipe_support(recipe: str, capability: Tuple[int, int]) -> Tuple[bool, str]:
    """Whether ``recipe`` can run on a GPU of ``capability`` with the installed TE."""
    needs = FP8_RECIPE_NEEDS[recipe]
    version = _te_version()
    if version is not None and _version_tuple(version) < _version_tuple(needs.min_te):
        return False, f"needs Transformer Engine >= {needs.min_te}, found {version}"
    verdict = _te_support_check(needs.te_check)
    if verdict is not None:
        return verdict
    too_new = needs.below_capability is not None and capability >= needs.below_capability
    if capability < needs.min_capability or too_new:
        return False, f"needs a {needs.gpus} GPU, this one has compute capability " \
                      f"{capability[0]}.{capability[1]}"
    return True, ""


def check_fp8_runtime(fp8_format: str | None, fp8_recipe: str = "delayed") -> None:
    """FP8 needs a CUDA GPU with FP8 tensor cores (compute capability >= 8.9), Transformer
    Engine, and a GPU/TE pair that supports ``--fp8-recipe``. Raises ConfigError naming
    the flag at fault."""
    if not fp8_format:
        return
    if not torch.cuda.is_available():
        raise ConfigError("--fp8-format", fp8_format, "only on a CUDA GPU", "no GPU found")
    major, minor = torch.cuda.get_device_capability()
    if (major, minor) < (8, 9):
        raise ConfigError(
            "--fp8-format", fp8_format, "only on GPUs with FP8 (Ada, Hopper, Blackwell)",
            f"this GPU has compute capability {major}.{minor}",
        )
    if not te_available():
        raise ConfigError(
            "--fp8-format", fp8_format, "only with Transformer Engine installed",
            "pip install -e .[te] on this machine",
        )
    ok, reason = fp8_recipe_support(fp8_recipe, (major, minor))
    if not ok:
        here = [r for r in FP8_RECIPE_NEEDS if fp8_recipe_support(r, (major, minor))[0]]
        raise ConfigError("--fp8-recipe", fp8_recipe,
                          f"one this GPU and TE support: {', '.join(here) or 'none'}", reason)

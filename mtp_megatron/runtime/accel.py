"""Optional accelerator libraries, detected lazily: Transformer Engine and NVIDIA apex.

Neither is a dependency. TE is the ``te`` extra (GPU only); NVIDIA apex exists only in
NGC containers (the PyPI package named ``apex`` is unrelated and never installed).
"""

from __future__ import annotations

import functools
import importlib.util

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


@functools.lru_cache(maxsize=None)
def nvidia_apex_available() -> bool:
    """True only for NVIDIA apex (it ships ``amp_C``), never the unrelated PyPI ``apex``."""
    return importlib.util.find_spec("amp_C") is not None


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


def check_fp8_runtime(fp8_format: str | None) -> None:
    """FP8 needs a CUDA GPU with FP8 tensor cores (compute capability >= 8.9) and TE."""
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

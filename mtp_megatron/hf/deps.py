"""The optional ``[hf]`` dependencies (transformers, safetensors), imported on demand.

    transformers = require("transformers")   # HFError naming the pip command when absent
"""

from __future__ import annotations

import importlib
import os

INSTALL = "pip install 'mtp_megatron[hf]' (or: pip install transformers safetensors)"


class HFError(RuntimeError):
    """A Hugging Face import/export that cannot proceed; the message says what to change."""


def require(package: str):
    """Import ``package`` (transformers or safetensors) or raise :class:`HFError`."""
    # Never reach the hub: every path we read is a local directory.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        return importlib.import_module(package)
    except ImportError as exc:
        raise HFError(
            f"python -m mtp_megatron.hf needs the optional package {package!r} ({exc}); "
            f"install it with: {INSTALL}"
        ) from None

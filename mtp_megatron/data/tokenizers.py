"""Tokenizers, all through ``megatron.core.tokenizers``; none downloads anything.

* ``byte-level`` (default, no files): ids 0-255 are the UTF-8 bytes, 256 is the
  end-of-document token (EOD), 257 is padding; vocabulary 258 (padded to 384 for the
  model). megatron-core's own byte-level default puts EOD on byte 0 and padding on byte 1,
  which would turn NUL bytes into document ends and mask every ``\\x01`` byte out of the
  loss, so we move both specials past the bytes.
* ``huggingface``: a local ``tokenizer.json`` (or the directory holding it and its
  ``tokenizer_config.json``); needs ``transformers``. The hub is forced offline.
* ``sentencepiece``: a local ``.model`` file; needs ``sentencepiece``.
* ``null``: megatron-core's null tokenizer, only for ``--mock-data``.

Preprocessing and training call :func:`build_tokenizer` with the same arguments, so
the ids written to ``.bin`` files and the ids the model expects agree.
"""

from __future__ import annotations

import importlib.util
import os
from typing import List, Optional

import numpy as np
from megatron.core.tokenizers import MegatronTokenizer

from mtp_megatron.config.data import TOKENIZER_PACKAGES, check_tokenizer_flags
from mtp_megatron.config.fields import ConfigError
from mtp_megatron.runtime import mcore_compat

BYTE_EOD, BYTE_PAD, BYTE_VOCAB = 256, 257, 258
MOCK_VOCAB_SIZE = 512

def check_tokenizer_files(tokenizer_type: str, tokenizer_model: Optional[str]) -> None:
    """What this machine must have for the tokenizer (the flags themselves are checked by
    ``config/data.py::check_tokenizer_flags``): the model file, and the package that reads
    it. Every tokenizer this package builds goes through it (training, preprocess,
    generation)."""
    check_tokenizer_flags(tokenizer_type, tokenizer_model)
    if tokenizer_type not in TOKENIZER_PACKAGES:
        return
    if not os.path.exists(tokenizer_model):
        raise ConfigError("--tokenizer-model", tokenizer_model,
                          f"an existing local file for --tokenizer-type {tokenizer_type}",
                          "tokenizers are never downloaded")
    package = TOKENIZER_PACKAGES[tokenizer_type]
    if importlib.util.find_spec(package) is None:
        raise ConfigError("--tokenizer-type", tokenizer_type, f"only with {package} installed",
                          f"pip install {package}")


def build_tokenizer(tokenizer_type: str = "byte-level", tokenizer_model: Optional[str] = None):
    """A megatron-core tokenizer; :class:`ConfigError` for a bad flag, a missing file or
    package (:func:`check_tokenizer_files`), or a tokenizer without an end-of-sequence token."""
    check_tokenizer_files(tokenizer_type, tokenizer_model)
    if tokenizer_type == "byte-level":
        return MegatronTokenizer.from_pretrained(
            metadata_path={"library": "byte-level"}, vocab_size=256,
            special_tokens=["<pad>", "<eod>"], _eos_id=BYTE_EOD, _pad_id=BYTE_PAD,
        )
    path = tokenizer_model
    if tokenizer_type == "huggingface":
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        if os.path.isfile(path):  # AutoTokenizer reads a directory
            path = os.path.dirname(os.path.abspath(path))
    tokenizer = MegatronTokenizer.from_pretrained(
        tokenizer_path=path, metadata_path={"library": tokenizer_type}
    )
    if tokenizer.eod is None:
        raise ConfigError("--tokenizer-model", tokenizer_model,
                          "a tokenizer with an end-of-sequence token (used as end of document)")
    return tokenizer


def mock_tokenizer(vocab_size: int = MOCK_VOCAB_SIZE):
    """megatron-core's null tokenizer: ids 0..vocab_size-2, EOD = vocab_size - 1."""
    return mcore_compat.null_tokenizer(vocab_size)


def token_dtype(vocab_size: int):
    """The ``.bin`` element type, Megatron's choice: uint16 below 65,500 ids, else int32."""
    return np.uint16 if vocab_size < 65500 else np.int32


def decode(tokenizer, ids: List[int]) -> str:
    """The text of ``ids``, whitespace and all. megatron-core's byte-level ``detokenize``
    strips trailing whitespace (64 generated spaces come back as "") and drops bytes that
    are not UTF-8; here the bytes are decoded as they are (an incomplete character shows
    as U+FFFD) and the specials (EOD, padding) left out."""
    if getattr(tokenizer, "library", None) == "byte-level":
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")
    return tokenizer.detokenize(ids)


def encode(tokenizer, text: str) -> np.ndarray:
    """Token ids of ``text`` (no EOD). Byte-level takes a vectorised path with equal output."""
    if getattr(tokenizer, "library", None) == "byte-level":
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
    return np.asarray(tokenizer.tokenize(text), dtype=np.int64)

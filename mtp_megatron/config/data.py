"""Data flags (``data:`` in YAML) and Megatron's blend and split syntax."""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence, Tuple

from mtp_megatron.config.fields import (
    ConfigError,
    check_int,
    check_types,
    option,
)

logger = logging.getLogger(__name__)

TOKENIZER_TYPES = ("byte-level", "huggingface", "sentencepiece")


def _list_option(default: Any, help: str, **kwargs) -> Any:
    """An :func:`option` that takes one or more values on the command line."""
    base = option(default, help, **kwargs)
    return dataclasses.field(default=default, metadata={**base.metadata, "nargs": "+"})


def parse_blend(items: Sequence[str]) -> Tuple[List[str], Optional[List[float]]]:
    """Megatron's blend syntax: ``p1 p2 ...`` or ``w1 p1 w2 p2 ...`` -> (prefixes, weights)."""
    items = [str(i) for i in items]

    def is_number(text: str) -> bool:
        try:
            return math.isfinite(float(text))
        except ValueError:
            return False

    if len(items) % 2 == 0 and all(is_number(w) for w in items[0::2]):
        weights = [float(w) for w in items[0::2]]
        if any(w <= 0 for w in weights):
            raise ConfigError("--data-path", " ".join(items), "positive weights: w1 p1 w2 p2 ...")
        return items[1::2], weights
    if any(is_number(i) for i in items):
        raise ConfigError("--data-path", " ".join(items),
                          "prefixes (p1 p2 ...) or weight-prefix pairs (w1 p1 w2 p2 ...)")
    return items, None


# A --split weight: digits with at most one decimal point (megatron-core's parser,
# ``parse_and_normalize_split``, reads every run of digits and dots as a number, so "1e2"
# would be two numbers there and "-1" a positive one).
_WEIGHT = r"(?:\d+\.?\d*|\.\d+)"
_SPLIT = re.compile(rf"\s*{_WEIGHT}(?:\s*[,/]\s*{_WEIGHT}){{0,2}}\s*")


def parse_split(split: str) -> List[float]:
    """``"98,2,0"`` -> ``[98.0, 2.0, 0.0]`` (train, validation, test weights).

    The one owner of the ``--split`` rule, checked at config time: up to three plain
    decimal weights separated by ``,`` or ``/``, train > 0. Every string accepted here is
    read by megatron-core's dataset builder (which parses the same string again) as the
    same weights; tests/unit/test_one_owner.py compares the two parsers."""
    text = str(split)
    parts = ([float(p) for p in re.findall(_WEIGHT, text)]
             if _SPLIT.fullmatch(text) else [])
    if not parts or parts[0] <= 0:
        raise ConfigError("--split", split,
                          "up to three plain decimal weights train,valid,test separated by "
                          "commas, train > 0 (e.g. 98,2,0)")
    return parts + [0.0] * (3 - len(parts))


# --tokenizer-type -> the package its --tokenizer-model is read with (byte-level: no file)
TOKENIZER_PACKAGES = {"huggingface": "transformers", "sentencepiece": "sentencepiece"}


def check_tokenizer_flags(tokenizer_type: str, tokenizer_model: Optional[str]) -> None:
    """The flag rules for tokenizers, the one owner (training's config and ``preprocess``
    alike): a known type; a model file exactly for the types that read one. Whether the
    file exists and its package imports is ``data/tokenizers.py::check_tokenizer_files``."""
    if tokenizer_type not in TOKENIZER_TYPES:
        raise ConfigError("--tokenizer-type", tokenizer_type,
                          "one of " + ", ".join(TOKENIZER_TYPES))
    needs_model = tokenizer_type in TOKENIZER_PACKAGES
    if needs_model and not tokenizer_model:
        raise ConfigError("--tokenizer-model", None,
                          f"a local file with --tokenizer-type {tokenizer_type}")
    if tokenizer_model and not needs_model:
        raise ConfigError("--tokenizer-model", tokenizer_model,
                          f"nothing with --tokenizer-type {tokenizer_type} (it needs no file); "
                          "a file only with --tokenizer-type huggingface or sentencepiece")


@dataclass(frozen=True)
class DataConfig:
    """Where training and validation tokens come from, and how often to validate.

    Neither ``--data-path`` nor ``--mock-data``: the embedded corpus (the Python standard
    library, byte-level; see ``mtp_megatron/data/corpus.py``).
    """

    mock_data: bool = option(
        False, "Synthetic, learnable token sequences (megatron-core's MockGPTDataset).", type=bool
    )
    data_path: Optional[Tuple[str, ...]] = _list_option(
        None, "Indexed dataset prefixes (<prefix>.bin/.idx), Megatron blend syntax: "
        "'p1 p2' or 'w1 p1 w2 p2' (default: the embedded standard-library corpus).", type=str,
    )
    split: str = option("98,2,0", "Train,validation,test weights over documents.", type=str)
    tokenizer_type: str = option(
        "byte-level", "Tokenizer the data was preprocessed with.", type=str,
        choices=TOKENIZER_TYPES,
    )
    tokenizer_model: Optional[str] = option(
        None, "Local tokenizer.json (huggingface) or .model file (sentencepiece).", type=str
    )
    data_cache_path: Optional[str] = option(
        None, "Directory for dataset index caches and the embedded corpus "
        "(default: next to the data; ~/.cache/mtp_megatron for the embedded corpus).", type=str,
    )
    eval_interval: Optional[int] = option(
        100, "Validate every N iterations (and always at the end).", type=int
    )
    eval_iters: int = option(
        10, "Global batches per validation (the same ones every time; 0 disables).", type=int
    )

    num_workers: int = option(
        0, "DataLoader worker processes that build the next steps' microbatches (pinned "
        "memory on GPU); 0 builds them in the main process. Same samples, same order.",
        type=int,
    )

    def __post_init__(self):
        check_types(self)
        check_int("--num-workers", self.num_workers, 0)
        if isinstance(self.data_path, str):
            object.__setattr__(self, "data_path", tuple(self.data_path.split()))
        elif self.data_path is not None:
            object.__setattr__(self, "data_path", tuple(str(p) for p in self.data_path))
        if self.data_path is not None:
            if not self.data_path:
                raise ConfigError("--data-path", "", "at least one dataset prefix")
            parse_blend(self.data_path)
            if self.mock_data:
                raise ConfigError("--mock-data", True, "not together with --data-path")
        parse_split(self.split)
        check_int("--eval-interval", self.eval_interval, 1, allow_none=True)
        check_int("--eval-iters", self.eval_iters, 0)
        check_tokenizer_flags(self.tokenizer_type, self.tokenizer_model)
        if self.mock_data and (self.tokenizer_type != "byte-level" or self.split != "98,2,0"):
            logger.warning("--tokenizer-type/--split have no effect with --mock-data.")

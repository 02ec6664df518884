"""Build megatron-core GPT datasets for training and validation.

Two steps, so that every user mistake surfaces before any collective:

1. :func:`prepare_data` (every rank, no communication): the tokenizer, the dataset
   prefixes (``--data-path``, or the embedded standard-library corpus, built once), and
   the checks: files present and readable, ``.bin`` size matching its ``.idx``, the
   data's ids inside the vocabulary, and, for every split that will be built, at least
   one document and one sequence's worth of tokens in each prefix.
2. :func:`build_datasets` (every rank, collective): megatron-core's
   ``BlendedMegatronDatasetBuilder`` over ``GPTDataset`` (or ``MockGPTDataset`` with
   ``--mock-data``). Only the ranks that read batches build (the first pipeline stage
   embeds tokens, the last computes the losses and runs the MTP layers); the others get
   a same-shaped placeholder, since their model chunk never looks at the batch.

Validation uses the ``--split`` validation documents; ``--eval-iters`` global batches of
them, the same ones at every evaluation, so the numbers are comparable over a run.

Only the splits that are read are built: train always, validation only with
``--eval-iters`` > 0 and a validation weight, test never. megatron-core builds every split
with a nonzero ``--split`` weight, and ``GPTDataset._get_num_epochs`` loops forever on a
split without tokens (it adds empty epochs until it has one token), so an unread split
with no documents would hang the run; the checks above cover exactly the splits built.
The other loops in megatron-core's index building are bounded once each built split has
``--seq-length`` + 1 tokens: each epoch adds at least one sample, and blending indices are
built for a given size (we always pass one), never "exhaustively".
"""

from __future__ import annotations

import json
import logging
import os
import struct
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import numpy as np
import torch
from megatron.core import parallel_state
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.blended_megatron_dataset_config import (
    convert_split_vector_to_split_matrix,
    parse_and_normalize_split,
)
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset
from megatron.core.datasets.indexed_dataset import IndexedDataset

from mtp_megatron.config import ConfigError, DataConfig, ModelConfig, TrainingConfig
from mtp_megatron.config.data import parse_blend, parse_split
from mtp_megatron.data.corpus import ensure_stdlib_corpus
from mtp_megatron.data.tokenizers import MOCK_VOCAB_SIZE, build_tokenizer, mock_tokenizer

__all__ = ["MOCK_VOCAB_SIZE", "DataPlan", "Datasets", "build_datasets", "mock_tokenizer",
           "prepare_data"]

logger = logging.getLogger(__name__)

SPLIT_NAMES = ("train", "validation", "test")


@dataclass(frozen=True)
class DataPlan:
    """What :func:`build_datasets` needs, decided and checked on every rank."""

    tokenizer: object
    blend: Optional[Tuple[List[str], Optional[List[float]]]]  # None: mock data
    split: Optional[str]
    cache_dir: Optional[str]
    description: str
    has_valid: bool

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size


@dataclass(frozen=True)
class Datasets:
    train: object
    valid: Optional[object] = None


def prepare_data(*, data: DataConfig, model: ModelConfig) -> DataPlan:
    """Tokenizer, blend and checks. Raises :class:`ConfigError` with the flag to fix."""
    if data.mock_data:
        tokenizer = mock_tokenizer(model.vocab_size or MOCK_VOCAB_SIZE)
        return DataPlan(tokenizer, None, None, data.data_cache_path, "mock data",
                        data.eval_iters > 0)
    tokenizer = build_tokenizer(data.tokenizer_type, data.tokenizer_model)
    if model.vocab_size is not None and model.vocab_size < tokenizer.vocab_size:
        raise ConfigError("--vocab-size", model.vocab_size,
                          f"at least the tokenizer's {tokenizer.vocab_size} "
                          f"(--tokenizer-type {data.tokenizer_type})")
    if data.data_path:
        prefixes, weights = parse_blend(data.data_path)
        cache_dir, description = data.data_cache_path, " ".join(data.data_path)
    else:
        if data.tokenizer_type != "byte-level":
            raise ConfigError("--tokenizer-type", data.tokenizer_type,
                              "byte-level for the embedded corpus (or give --data-path)")
        prefixes = [ensure_stdlib_corpus(data.data_cache_path)]
        weights, description = None, "embedded corpus: Python standard library"
        cache_dir = data.data_cache_path or os.path.join(os.path.dirname(prefixes[0]), "cache")
    split = parse_split(data.split)
    has_valid = split[1] > 0 and data.eval_iters > 0
    vocab = model.vocab_size or tokenizer.vocab_size
    docs = tokens = 0
    for prefix in prefixes:
        d, t = _check_dataset(prefix, data=data, vocab=vocab, seq_length=model.seq_length,
                              used=(True, has_valid, False))
        docs, tokens = docs + d, tokens + t
    description += (f" ({docs:,} documents, {tokens:,} tokens; tokenizer {data.tokenizer_type}, "
                    f"vocab {tokenizer.vocab_size}; split {data.split})")
    if split[1] == 0 and data.eval_iters:
        logger.warning("--split %s has no validation part: --eval-interval/--eval-iters have "
                       "no effect.", data.split)
    return DataPlan(tokenizer, (prefixes, weights), data.split, cache_dir, description, has_valid)


def _check_dataset(prefix: str, *, data: DataConfig, vocab: int, seq_length: int,
                   used: Tuple[bool, bool, bool]) -> Tuple[int, int]:
    """Checks one prefix; returns its (documents, tokens)."""
    for suffix in (".bin", ".idx"):
        path = prefix + suffix
        if not os.path.isfile(path) or not os.access(path, os.R_OK):
            raise ConfigError("--data-path", prefix, "prefixes of readable <prefix>.bin and "
                              "<prefix>.idx files", f"{path} is missing or unreadable")
    _check_index_file(prefix + ".idx")
    try:
        index = IndexedDataset(prefix, mmap=True)
    except Exception as err:  # a corrupt index raises anything from struct to numpy
        raise ConfigError("--data-path", prefix, "a Megatron indexed dataset",
                          f"{prefix}.idx cannot be read: {err}") from None
    lengths = index.sequence_lengths
    expected = int(lengths.sum()) * np.dtype(index.index.dtype).itemsize
    actual = os.path.getsize(prefix + ".bin")
    if actual != expected:
        raise ConfigError("--data-path", prefix, "a .bin matching its .idx",
                          f"{prefix}.bin has {actual} bytes, the index describes {expected}")
    _check_meta(prefix, data=data, vocab=vocab)
    _check_splits(prefix, lengths, used=used, seq_length=seq_length, split=data.split)
    return len(lengths), int(lengths.sum())


INDEX_MAGIC = b"MMIDIDX\x00\x00"  # megatron-core's .idx header, format version 1
INDEX_HEADER = 34  # magic 9, version 8, dtype code 1, sequence count 8, document count 8


def _check_index_file(path: str) -> None:
    """The ``.idx`` header and size, read before megatron-core opens it: its
    ``IndexedDataset`` half-built from a truncated or foreign file also prints
    "Exception ignored in IndexedDataset.__del__" after our one-line error."""
    size = os.path.getsize(path)
    with open(path, "rb") as fh:
        header = fh.read(INDEX_HEADER)
    why = None
    if len(header) < INDEX_HEADER:
        why = f"{path} has {size} bytes, less than the {INDEX_HEADER}-byte header (truncated?)"
    elif header[:9] != INDEX_MAGIC or struct.unpack("<Q", header[9:17])[0] != 1:
        why = f"{path} does not start with megatron-core's index header (MMIDIDX, version 1)"
    else:
        sequences, documents = struct.unpack("<QQ", header[18:34])
        expected = INDEX_HEADER + 12 * sequences + 8 * documents
        if size not in (expected, expected + sequences):  # + modes: a multimodal index
            why = (f"{path} has {size} bytes, its header describes {expected} "
                   f"({sequences} sequences, {documents} documents; truncated?)")
    if why:
        raise ConfigError("--data-path", path[:-len(".idx")], "a Megatron indexed dataset",
                          why)


def _check_meta(prefix: str, *, data: DataConfig, vocab: int) -> None:
    """Our preprocessing writes <prefix>.meta.json: catch data made with another tokenizer."""
    path = prefix + ".meta.json"
    if not os.path.isfile(path):
        return
    with open(path) as fh:
        meta = json.load(fh)
    if meta.get("tokenizer_type") not in (None, data.tokenizer_type):
        raise ConfigError("--tokenizer-type", data.tokenizer_type,
                          f"{meta['tokenizer_type']}, the tokenizer {prefix} was made with")
    if meta.get("max_token_id", -1) >= vocab:
        raise ConfigError("--vocab-size", vocab,
                          f"more than the largest id in {prefix} ({meta['max_token_id']})")


def split_ranges(split: str, num_documents: int) -> List[Optional[Tuple[int, int]]]:
    """Document ranges [begin, end) per split, exactly as megatron-core's builder cuts them."""
    # --split was checked at config time (config/data.py::parse_split, the one owner)
    matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(split))
    return [None if m is None else (int(round(m[0] * float(num_documents))),
                                    int(round(m[1] * float(num_documents)))) for m in matrix]


def _check_splits(prefix: str, lengths: np.ndarray, *, used: Tuple[bool, bool, bool],
                  seq_length: int, split: str) -> None:
    """Each split that will be built needs a document and one sequence's worth of tokens."""
    for name, is_used, bounds in zip(SPLIT_NAMES, used, split_ranges(split, len(lengths))):
        if not is_used or bounds is None:
            continue
        beg, end = bounds
        skip = " (or --eval-iters 0 to skip validation)" if name == "validation" else ""
        if end <= beg:
            raise ConfigError(
                "--split", split, f"weights that give the {name} split documents{skip}",
                f"the {name} split of {prefix} gets 0 of its {len(lengths)} documents",
            )
        tokens = int(lengths[beg:end].sum())
        if tokens < seq_length + 1:
            raise ConfigError(
                "--seq-length", seq_length,
                f"at most {max(tokens - 1, 0)}: the {name} split of {prefix} has {tokens} "
                f"tokens ({end - beg} of {len(lengths)} documents with --split {split})",
                f"a sample needs --seq-length + 1 tokens; shorten it, or change --split{skip}",
            )


def is_built_on_rank() -> bool:
    """Batches are read by the first stage (tokens) and the last (labels, MTP inputs)."""
    return (parallel_state.is_pipeline_first_stage(ignore_virtual=True)
            or parallel_state.is_pipeline_last_stage(ignore_virtual=True))


def build_datasets(plan: DataPlan, *, data: DataConfig, model: ModelConfig,
                   training: TrainingConfig, seed: Optional[int] = None,
                   built_on_rank: Callable[[], bool] = is_built_on_rank) -> Datasets:
    """Train and validation datasets (collective: call on every rank)."""
    gbs, seq = training.global_batch_size, model.seq_length
    num_valid = data.eval_iters * gbs if plan.has_valid else 0
    sizes = [training.train_iters * gbs, num_valid, 0]
    common = dict(
        random_seed=training.seed if seed is None else seed, sequence_length=seq,
        tokenizer=plan.tokenizer, reset_position_ids=False, reset_attention_mask=False,
        eod_mask_loss=False, create_attention_mask=False, path_to_cache=plan.cache_dir,
    )
    if plan.blend is None:
        config, cls = GPTDatasetConfig(**common), MockGPTDataset
    else:
        config = GPTDatasetConfig(blend=plan.blend, split=plan.split, **common)
        cls = GPTDataset
    # megatron-core builds every split with a bookend in the matrix (a nonzero --split
    # weight), read or not; drop the unread ones (the bookends of the others stay as they
    # are, so the training samples do not depend on --eval-iters).
    config.split_matrix = [m if n else None for m, n in zip(config.split_matrix, sizes)]
    train, valid, _ = BlendedMegatronDatasetBuilder(cls, sizes, built_on_rank, config).build()
    if train is None:  # a rank whose chunks never read the batch
        train = Placeholder(seq, sizes[0])
        valid = Placeholder(seq, num_valid) if num_valid else None
    else:
        _warn_if_repeating(train, sizes[0], "training", "--train-iters")
        _warn_if_repeating(valid, num_valid, "validation", "--eval-iters")
    return Datasets(train=train, valid=valid if num_valid else None)


def _warn_if_repeating(dataset, needed: int, split: str, flag: str) -> None:
    """A dataset shorter than the run reads: the sampler wraps around after it, repeating
    the samples in the same order. megatron-core sizes every dataset to what is asked
    (more epochs, reshuffled) except a blend without weights, one epoch of each."""
    if dataset is not None and len(dataset) < needed:
        logger.warning(
            "--data-path without weights blends one epoch of each dataset: %d %s samples, "
            "but %s x --global-batch-size reads %d, so after %d samples the same samples "
            "repeat in the same order. Give weights (--data-path 1 A 1 B ...) for "
            "megatron-core's reshuffled epochs, or lower %s.",
            len(dataset), split, flag, needed, len(dataset), flag)


class Placeholder:
    """Zero batches of the right shape for middle pipeline stages (never read)."""

    def __init__(self, seq_length: int, length: int):
        self.length = max(1, length)
        zeros = torch.zeros(seq_length, dtype=torch.long, device="cpu")  # host batches
        self.sample = {"tokens": zeros, "labels": zeros, "loss_mask": zeros.float(),
                       "position_ids": torch.arange(seq_length, device="cpu")}

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int):
        return self.sample

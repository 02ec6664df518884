"""How many vocabulary rows a (resumed) model is built with, and which of them score.

The embedding and the output layer have ``--vocab-size`` (or the tokenizer's) rows, padded
up to a multiple of ``--make-vocab-size-divisible-by`` x TP. The padding rows are real
parameters: their logits take part in the softmax, and training pushes them down. So the
padded size is part of what a checkpoint learned, and a resume keeps it:

* when this run's TP divides the checkpoint's rows (almost always: 384 rows split over
  TP = 2 as 192 each), the model is built with exactly those rows, whatever
  ``--make-vocab-size-divisible-by`` x TP would give for a fresh run. A TP change then
  resumes the straight run.
* otherwise (e.g. 258 rows, ``--make-vocab-size-divisible-by 1``, resumed at TP = 4) the
  rows grow to the next multiple of ``--make-vocab-size-divisible-by`` x TP, and the new
  rows are *dead*: their logits are masked (``model/padding.py``), so they take no
  probability mass and the loss is the straight run's. The checkpoints this run saves
  record where the live rows end (``live_rows``), so later resumes keep masking them.

    rows = vocab_rows(cfg, vocab_size=258)      # reads the checkpoint this run resumes
    rows.padded, rows.live                      # 384, 384 (TP 2 resuming a TP 1 run)
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Dict, Optional

from mtp_megatron.checkpoint.layout import read_tracker, resolve_load_dir
from mtp_megatron.config import RunConfig, padded_vocab_size

logger = logging.getLogger("mtp_megatron")


@dataclass(frozen=True)
class VocabRows:
    """Rows of the embedding / output layer (``padded``); logits of rows ``live`` and up
    are masked."""

    padded: int
    live: int

    @property
    def masked(self) -> int:
        return self.padded - self.live


def rows_for(saved: Optional[Dict[str, Any]], *, vocab_size: int, divisible_by: int,
             tp: int) -> VocabRows:
    """The rows to build, given the checkpoint's ``vocab`` record (None: a fresh run)."""
    natural = padded_vocab_size(vocab_size, divisible_by, tp)
    saved = saved or {}
    rows = saved.get("padded_vocab_size")
    if not rows or saved.get("vocab_size") not in (None, vocab_size) or rows < vocab_size:
        return VocabRows(natural, natural)  # fresh, or a vocabulary the load will refuse
    live = saved.get("live_rows") or rows
    if rows % tp == 0:
        return VocabRows(rows, live)
    multiple = divisible_by * tp
    return VocabRows(int(math.ceil(rows / multiple) * multiple), live)


def saved_vocab(directory: str) -> Optional[Dict[str, Any]]:
    """The ``vocab`` record of a checkpoint's common state (None if it has none or cannot
    be read: the load reports that)."""
    from mtp_megatron.checkpoint.dist_ckpt import common_state

    vocab = common_state(directory).get("vocab")
    return vocab if isinstance(vocab, dict) else None


def resume_directory(cfg: RunConfig) -> Optional[str]:
    """The iteration directory this run will load (as ``Trainer._maybe_resume``), or None."""
    ckpt = cfg.checkpoint
    root = ckpt.resume_from
    if root is None or (not ckpt.load and read_tracker(root) is None):
        return None
    return resolve_load_dir(root)[0]


def vocab_rows(cfg: RunConfig, *, vocab_size: int) -> VocabRows:
    """The rows this run builds: the checkpoint's it resumes from (see the module
    docstring), else ``vocab_size`` padded for this run's TP."""
    directory = resume_directory(cfg)
    saved = saved_vocab(directory) if directory else None
    rows = rows_for(saved, vocab_size=vocab_size,
                    divisible_by=cfg.model.make_vocab_size_divisible_by,
                    tp=cfg.parallel.tensor_model_parallel_size)
    tp = cfg.parallel.tensor_model_parallel_size
    if saved and _is_last_rank():
        if rows.padded != saved["padded_vocab_size"]:
            logger.warning("vocabulary: %s has %d rows, which TP %d cannot split: %d rows, "
                           "the logits of rows %d to %d masked (no probability mass)",
                           directory, saved["padded_vocab_size"], tp, rows.padded, rows.live,
                           rows.padded - 1)
        elif rows.padded != padded_vocab_size(vocab_size,
                                              cfg.model.make_vocab_size_divisible_by, tp):
            logger.info("vocabulary: keeping the %d rows of %s (TP %d splits them)",
                        rows.padded, directory, tp)
    return rows


def _is_last_rank() -> bool:
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_rank() == dist.get_world_size() - 1

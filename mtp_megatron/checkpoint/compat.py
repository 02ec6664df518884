"""Resuming with changed settings: compare a checkpoint with this run, name the field.

    check_compatible("ck/iter_0000100", cfg, checkpoint=cfg.checkpoint,
                     vocab_size=258, padded_vocab_size=384, common=common_state)

Shapes (layers, sizes, vocabulary and its padding, learned position table) must match:
the weights would not fit. Precision (--bf16/--fp16) and --use-distributed-optimizer
decide the optimizer state's format, and --freeze-main-model which parameters it
covers: they may change only when the optimizer state is not loaded (--no-load-optim
keeps the iteration, --finetune restarts at 0). Every error
is a :class:`CheckpointError` naming the checkpoint, the field, both values and the way
out. The checkpoint side is its run_config.yaml plus its common state (vocabulary
sizes, layout), so this is pure Python.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Dict, Optional

import yaml

from mtp_megatron.checkpoint.layout import CONFIG_NAME, CheckpointError
from mtp_megatron.config import CheckpointConfig, RunConfig, to_dict
from mtp_megatron.config.model import default_ffn_hidden_size

logger = logging.getLogger("mtp_megatron")

# Settings that must match between the checkpoint and the model it is loaded into.
SHAPE_KEYS = {
    "model": ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups",
              "ffn_hidden_size", "swiglu", "disable_bias_linear", "normalization",
              "untie_embeddings_and_output_weights", "position_embedding_type",
              "make_vocab_size_divisible_by"),
    "mtp": ("mtp_num_layers",),
}
# Settings that decide the optimizer's state format: they may change on resume only
# when the optimizer state is not loaded (--no-load-optim or --finetune).
FORMAT_KEYS = {"training": ("bf16", "fp16"), "parallel": ("use_distributed_optimizer",)}


def _effective(section: str, key: str, values: Dict[str, Any]) -> Any:
    """A shape field as the model is built with it (defaults resolved)."""
    if section == "model" and key == "num_query_groups":
        return values.get(key) or values.get("num_attention_heads")
    if section == "model" and key == "ffn_hidden_size":
        return values.get(key) or default_ffn_hidden_size(values.get("hidden_size") or 0,
                                                          bool(values.get("swiglu")))
    return values.get(key)


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def _precision(training: Dict[str, Any]) -> str:
    return "bf16" if training.get("bf16") else "fp16" if training.get("fp16") else "fp32"


def _check_shapes(directory: str, saved: Dict[str, Any], ours: Dict[str, Any]) -> None:
    for section, keys in SHAPE_KEYS.items():
        for key in keys:
            theirs = _effective(section, key, saved.get(section, {}))
            mine = _effective(section, key, ours[section])
            if theirs != mine:
                raise CheckpointError(
                    f"{directory} was saved with {section}.{key}={theirs!r} but this run has "
                    f"{_flag(key)}={mine!r}; use the same value (the weights have other shapes)"
                )
    model, saved_model = ours["model"], saved.get("model", {})
    if model["position_embedding_type"] == "learned_absolute":
        theirs = saved_model.get("max_position_embeddings") or saved_model.get("seq_length")
        mine = model["max_position_embeddings"] or model["seq_length"]
        if theirs != mine:
            raise CheckpointError(
                f"{directory} has learned absolute position embeddings for {theirs} positions "
                f"(model.max_position_embeddings or model.seq_length) but this run builds "
                f"{mine} (--max-position-embeddings={model['max_position_embeddings']}, "
                f"--seq-length={model['seq_length']}); pass --max-position-embeddings {theirs} "
                f"(any --seq-length up to {theirs} then works)"
            )


def _check_vocab(directory: str, common: Dict[str, Any], vocab_size: Optional[int],
                 padded: Optional[int], tp: int) -> None:
    saved = common.get("vocab") or {}
    if saved.get("vocab_size") and vocab_size and saved["vocab_size"] != vocab_size:
        raise CheckpointError(
            f"{directory} was trained with a vocabulary of {saved['vocab_size']} tokens but "
            f"this run has {vocab_size} (--vocab-size or the tokenizer); use the same "
            "tokenizer/--vocab-size (the embedding and output layer have other shapes)"
        )
    if saved.get("padded_vocab_size") and padded and saved["padded_vocab_size"] != padded:
        message = (f"{directory} has {saved['padded_vocab_size']} embedding rows (vocabulary "
                   f"padded for --make-vocab-size-divisible-by x TP), this run {padded}")
        if (common.get("layout") or {}).get("tp") == tp:
            raise CheckpointError(message + "; use the same --vocab-size and tokenizer")
        logger.warning("%s: the rows of padding that differ start fresh", message)


def _check_format(directory: str, saved: Dict[str, Any], ours: Dict[str, Any],
                  checkpoint: Optional[CheckpointConfig]) -> None:
    """Precision and distributed optimizer decide the optimizer state's format."""
    if checkpoint is not None and (checkpoint.no_load_optim or checkpoint.finetune):
        return  # weights only: they load into any precision/optimizer
    how = ("; to continue with the new setting load the weights only: --no-load-optim "
           "(keeps the iteration and LR schedule, fresh optimizer state) or --finetune "
           "(iteration 0)")
    theirs, mine = _precision(saved.get("training", {})), _precision(ours["training"])
    if theirs != mine:
        raise CheckpointError(
            f"{directory} was saved with {theirs} precision (training.bf16/fp16) but this "
            f"run uses {mine}: the optimizer state has another format{how}, or resume "
            f"with the checkpoint's precision"
            + (f" (--{theirs})" if theirs != "fp32" else " (no --bf16/--fp16)")
        )
    theirs = bool(saved.get("mtp", {}).get("freeze_main_model"))
    mine = bool(ours["mtp"].get("freeze_main_model"))
    if theirs != mine:  # the optimizer holds the MTP parameters only, or every parameter
        raise CheckpointError(
            f"{directory} was saved with mtp.freeze_main_model={theirs} but this run has "
            f"--freeze-main-model={mine}: the optimizer state covers other parameters"
            f"{how}; the acceptance stage starts from a trained checkpoint with --finetune"
        )
    key = "use_distributed_optimizer"
    theirs, mine = bool(saved.get("parallel", {}).get(key)), bool(ours["parallel"][key])
    if theirs != mine:
        raise CheckpointError(
            f"{directory} was saved with parallel.{key}={theirs} but this run has "
            f"--use-distributed-optimizer={mine}: the optimizer state has another "
            f"format{how}, or resume with the checkpoint's setting"
        )


def check_compatible(directory: str, cfg: RunConfig, *,
                     checkpoint: Optional[CheckpointConfig] = None,
                     vocab_size: Optional[int] = None, padded_vocab_size: Optional[int] = None,
                     common: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Compare the checkpoint with this run; raise CheckpointError naming the field.

    Shapes (layers, sizes, vocabulary, learned positions) must match. Precision and the
    distributed optimizer must match unless ``checkpoint`` says the optimizer is not
    loaded (--no-load-optim, --finetune). ``common`` is the checkpoint's common state
    (vocabulary sizes, layout); returns the saved config dict.
    """
    path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isfile(path):
        raise CheckpointError(f"{directory}: missing {CONFIG_NAME}; not saved by mtp_megatron?")
    with open(path) as fh:
        saved = yaml.safe_load(fh)
    ours = to_dict(cfg)
    _check_shapes(directory, saved, ours)
    if common is not None:
        _check_vocab(directory, common, vocab_size, padded_vocab_size,
                     cfg.parallel.tensor_model_parallel_size)
    _check_format(directory, saved, ours, checkpoint)
    return saved

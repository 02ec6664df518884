"""Resuming with changed settings: compare a checkpoint with this run, name the field.

    check_compatible("ck/iter_0000100", cfg, checkpoint=cfg.checkpoint,
                     vocab_size=258, padded_vocab_size=384, common=common_state)

Shapes (layers, sizes, vocabulary, learned position table) must match: the weights would
not fit. The padded vocabulary is the checkpoint's whenever this run's TP splits it (the
model is built so, ``checkpoint/vocab.py``), so --make-vocab-size-divisible-by may differ;
rows added because TP cannot split the checkpoint's are masked. Precision (--bf16/--fp16)
and --use-distributed-optimizer decide the optimizer state's format, and
--freeze-main-model which parameters it covers: they may change only
when the optimizer state is not loaded (--no-load-optim keeps the iteration, --finetune
restarts at 0). Every error is a :class:`CheckpointError` naming the checkpoint, the
field, both values and the way out. The MTP objective's weighting (factor, its schedule,
the depth weights) may change: a warning names each changed flag with both values. The
checkpoint side is its run_config.yaml plus its common state (vocabulary sizes, layout),
so this is pure Python.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Dict, List, Optional

import yaml

from mtp_megatron.checkpoint.layout import CONFIG_NAME, CheckpointError
from mtp_megatron.config import CheckpointConfig, RunConfig, to_dict
from mtp_megatron.config.fields import ConfigError
from mtp_megatron.config.model import default_ffn_hidden_size
from mtp_megatron.config.moe import layer_pattern, parse_layer_freq
from mtp_megatron.config.mtp import MTPConfig, normalised_depth_weights

logger = logging.getLogger("mtp_megatron")

# Multi-latent attention's widths: compared when either side has MLA
MLA_SHAPE_KEYS = ("q_lora_rank", "kv_lora_rank", "qk_head_dim", "qk_pos_emb_head_dim",
                  "v_head_dim", "qk_layernorm")
# Settings that must match between the checkpoint and the model it is loaded into.
SHAPE_KEYS = {
    "model": ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups",
              "ffn_hidden_size", "swiglu", "disable_bias_linear", "normalization",
              "untie_embeddings_and_output_weights", "position_embedding_type",
              "make_vocab_size_divisible_by",  # compared only without a saved row count
              "num_experts", "moe_ffn_hidden_size",
              "moe_shared_expert_intermediate_size", "moe_layer_freq",
              "moe_router_enable_expert_bias",
              "multi_latent_attention", *MLA_SHAPE_KEYS),
    "mtp": ("mtp_num_layers",),
}
# Settings that decide the optimizer's state format: they may change on resume only
# when the optimizer state is not loaded (--no-load-optim or --finetune).
FORMAT_KEYS = {"training": ("bf16", "fp16"), "parallel": ("use_distributed_optimizer",)}
# The MTP objective's weighting: may change on resume (a deliberate change of the
# objective from the next iteration on), announced with a warning naming both values.
OBJECTIVE_KEYS = ("mtp_loss_scaling_factor", "mtp_depth_weights",
                  "mtp_loss_scaling_factor_warmup_iters", "mtp_loss_scaling_factor_final",
                  "mtp_loss_scaling_factor_decay_style", "mtp_loss_scaling_factor_decay_iters")


def _effective(section: str, key: str, values: Dict[str, Any]) -> Any:
    """A shape field as the model is built with it (defaults resolved)."""
    if section == "model" and key == "num_query_groups":
        return values.get(key) or values.get("num_attention_heads")
    if section == "model" and key == "ffn_hidden_size":
        return values.get(key) or default_ffn_hidden_size(values.get("hidden_size") or 0,
                                                          bool(values.get("swiglu")))
    if section == "model" and key.startswith("moe_") and values.get("num_experts") is None:
        return None  # a dense model (or one saved before MoE existed): no MoE shape
    if section == "model" and key == "moe_ffn_hidden_size":
        return values.get(key) or _effective(section, "ffn_hidden_size", values)
    if section == "model" and key == "moe_layer_freq":
        freq = parse_layer_freq(values.get(key) or 1)
        return list(layer_pattern(values.get("num_layers") or 0, freq))
    if section == "model" and key in ("moe_router_enable_expert_bias",
                                      "multi_latent_attention"):
        return bool(values.get(key))
    if section == "model" and key in MLA_SHAPE_KEYS:
        # standard attention (or saved before MLA existed): no MLA shape
        return values.get(key) if values.get("multi_latent_attention") else None
    return values.get(key)


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def _precision(training: Dict[str, Any]) -> str:
    return "bf16" if training.get("bf16") else "fp16" if training.get("fp16") else "fp32"


def _check_shapes(directory: str, saved: Dict[str, Any], ours: Dict[str, Any],
                  rows_known: bool = False) -> None:
    """``rows_known``: the checkpoint records its padded vocabulary, which the model was
    built with, so the padding flag need not match."""
    for section, keys in SHAPE_KEYS.items():
        for key in keys:
            if rows_known and key == "make_vocab_size_divisible_by":
                continue
            theirs = _effective(section, key, saved.get(section, {}))
            mine = _effective(section, key, ours[section])
            if theirs != mine:
                raise CheckpointError(
                    f"{directory} was saved with {section}.{key}={theirs!r} but this run has "
                    f"{_flag(key)}={mine!r}; use the same value (the weights have other shapes)"
                    + (_new_depth_hint(directory, mine) if key == "mtp_num_layers" else "")
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


def _new_depth_hint(directory: str, depth: Optional[int]) -> str:
    """How to give a trained model another MTP depth: through the Hugging Face format,
    whose import adds fresh MTP modules (or keeps the exported ones)."""
    return (f". To continue it with {depth or 0} MTP layers, convert it: python -m "
            f"mtp_megatron.hf export --load {directory} --out HF_DIR, then python -m "
            f"mtp_megatron.hf import --hf HF_DIR --save NEW_DIR --mtp-num-layers {depth or 0}, "
            "and train with --load NEW_DIR --finetune (Llama- or GPT-NeoX-shaped models; "
            "docs/hf.md)")


def _check_vocab(directory: str, common: Dict[str, Any], vocab_size: Optional[int],
                 padded: Optional[int], live: Optional[int]) -> None:
    saved = common.get("vocab") or {}
    if saved.get("vocab_size") and vocab_size and saved["vocab_size"] != vocab_size:
        raise CheckpointError(
            f"{directory} was trained with a vocabulary of {saved['vocab_size']} tokens but "
            f"this run has {vocab_size} (--vocab-size or the tokenizer); use the same "
            "tokenizer/--vocab-size (the embedding and output layer have other shapes)"
        )
    rows = saved.get("padded_vocab_size")
    if not rows or not padded or rows == padded:
        return
    if padded > rows and live is not None and live <= (saved.get("live_rows") or rows):
        return  # rows added for a TP that cannot split the checkpoint's: masked
    raise CheckpointError(
        f"{directory} has {rows} embedding rows (the vocabulary padded when it was trained) "
        f"but this model has {padded}: build it with the checkpoint's rows "
        "(mtp_megatron.checkpoint.vocab.vocab_rows)")


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


def _same_weights(theirs: Any, mine: Any, depth: Optional[int]) -> bool:
    """Two --mtp-depth-weights spellings of the same normalised weights are the same."""
    try:
        return normalised_depth_weights(str(theirs), depth or 0) == \
            normalised_depth_weights(str(mine), depth or 0)
    except ConfigError:
        return theirs == mine


def changed_objective(saved: Dict[str, Any], ours: Dict[str, Any]) -> List[str]:
    """The MTP weighting flags that differ from the checkpoint's, as ``--flag: old ->
    new`` (a checkpoint saved before a flag existed had its default)."""
    defaults = dataclasses.asdict(MTPConfig())
    theirs_all, mine_all = saved.get("mtp", {}), ours["mtp"]
    changes = []
    for key in OBJECTIVE_KEYS:
        theirs, mine = theirs_all.get(key, defaults[key]), mine_all[key]
        same = (_same_weights(theirs, mine, mine_all["mtp_num_layers"])
                if key == "mtp_depth_weights" else theirs == mine)
        if not same:
            changes.append(f"{_flag(key)}: {theirs!r} -> {mine!r}")
    return changes


def _announce_objective_changes(directory: str, saved: Dict[str, Any],
                                ours: Dict[str, Any]) -> None:
    if not ours["mtp"]["mtp_num_layers"]:
        return
    for change in changed_objective(saved, ours):
        logger.warning("resuming %s with a changed MTP objective, %s (the checkpoint's value "
                       "-> this run's; applies from the next iteration)", directory, change)


def check_compatible(directory: str, cfg: RunConfig, *,
                     checkpoint: Optional[CheckpointConfig] = None,
                     vocab_size: Optional[int] = None, padded_vocab_size: Optional[int] = None,
                     live_rows: Optional[int] = None,
                     common: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Compare the checkpoint with this run; raise CheckpointError naming the field.

    Shapes (layers, sizes, vocabulary, learned positions) must match. Precision and the
    distributed optimizer must match unless ``checkpoint`` says the optimizer is not
    loaded (--no-load-optim, --finetune). ``common`` is the checkpoint's common state
    (vocabulary sizes, layout); ``padded_vocab_size``/``live_rows`` the model's rows and
    where its masked rows start. Returns the saved config dict.
    """
    path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isfile(path):
        raise CheckpointError(f"{directory}: missing {CONFIG_NAME}; not saved by mtp_megatron?")
    with open(path) as fh:
        saved = yaml.safe_load(fh)
    ours = to_dict(cfg)
    rows_known = bool(((common or {}).get("vocab") or {}).get("padded_vocab_size"))
    _check_shapes(directory, saved, ours, rows_known=rows_known)
    if common is not None:
        _check_vocab(directory, common, vocab_size, padded_vocab_size, live_rows)
    _check_format(directory, saved, ours, checkpoint)
    _announce_objective_changes(directory, saved, ours)
    return saved


# --- the LR schedule (Megatron-LM's --override-opt-param-scheduler and
# --use-checkpoint-opt-param-scheduler) ---------------------------------------------------

OVERRIDE_FLAG = "--override-opt-param-scheduler"
KEEP_FLAG = "--use-checkpoint-opt-param-scheduler"
# megatron-core's scheduler fields in a checkpoint, and the flags that set them here
# (wd_incr_steps is --train-iters, but our weight decay is constant: it changes nothing).
SCHEDULE_FIELDS = (
    ("max_lr", "--lr"), ("min_lr", "--min-lr"), ("lr_warmup_steps", "--lr-warmup-iters"),
    ("lr_decay_steps", "--lr-decay-iters (default: --train-iters)"),
    ("lr_decay_style", "--lr-decay-style"), ("start_wd", "--weight-decay"),
)


def schedule_changes(scheduler: Any, saved: Dict[str, Any]) -> List[str]:
    """``"--lr 0.002 -> 0.01"`` (checkpoint -> this run) for each schedule flag that differs;
    ``scheduler`` is this run's (megatron-core's OptimizerParamScheduler)."""
    return [f"{flag} {saved[key]} -> {getattr(scheduler, key)}"
            for key, flag in SCHEDULE_FIELDS
            if key in saved and saved[key] != getattr(scheduler, key)]


def check_schedule(directory: str, scheduler: Any, saved: Dict[str, Any],
                   checkpoint: CheckpointConfig) -> List[str]:
    """Megatron-LM's rule: a checkpoint whose LR schedule differs from this run's flags is
    refused unless one of the two flags says which wins. Returns the differences."""
    changes = schedule_changes(scheduler, saved)
    if changes and not (checkpoint.override_opt_param_scheduler
                        or checkpoint.use_checkpoint_opt_param_scheduler):
        raise CheckpointError(
            f"{directory} was saved with another LR schedule ({'; '.join(changes)}; "
            f"checkpoint -> this run): pass {OVERRIDE_FLAG} to continue with this run's "
            f"values, or {KEEP_FLAG} to keep the checkpoint's (this run's then have no effect)")
    return changes

"""Mixture-of-Experts rules: the MoE flags live in ``model:`` (the router and experts)
and ``parallel:`` (expert parallelism, the token dispatcher); their checks live here.

Megatron-LM's flags and defaults, validated before anything is built::

    --num-experts 8 --moe-router-topk 2 --moe-ffn-hidden-size 64
    --moe-layer-freq "[0]*1+[1]*3"              # first layer dense, then MoE (DeepSeek-V3)
    --moe-router-score-function sigmoid --moe-router-enable-expert-bias   # aux-loss-free

    layer_pattern(4, "[0]*1+[1]*3") == (0, 1, 1, 1)
    layer_pattern(4, 2) == (1, 0, 1, 0)        # every 2nd layer from layer 0, as megatron-core
"""

from __future__ import annotations

import logging
import re
from typing import Any, Tuple, Union

from mtp_megatron.config.fields import ConfigError, check_float, check_int

logger = logging.getLogger(__name__)

LayerFreq = Union[int, Tuple[int, ...]]
SCORE_FUNCTIONS = ("softmax", "sigmoid")
LOAD_BALANCING = ("aux_loss", "seq_aux_loss", "none")
DISPATCHERS = ("allgather", "alltoall")
# (field, default): the MoE flags of ``model:`` that mean nothing without --num-experts
MODEL_MOE_FIELDS = (
    ("moe_ffn_hidden_size", None), ("moe_router_topk", 2),
    ("moe_shared_expert_intermediate_size", None), ("moe_layer_freq", 1),
    ("moe_router_score_function", "softmax"), ("moe_router_pre_softmax", False),
    ("moe_router_topk_scaling_factor", None), ("moe_router_num_groups", None),
    ("moe_router_group_topk", None), ("moe_router_load_balancing_type", "aux_loss"),
    ("moe_aux_loss_coeff", 0.0), ("moe_router_enable_expert_bias", False),
    ("moe_router_bias_update_rate", 1e-3), ("moe_grouped_gemm", False),
)
_TERM = re.compile(r"^\[([0-9,\s]*)\](?:\*(\d+))?$")
_FREQ_FLAG = "--moe-layer-freq"
_FREQ_ALLOWED = ("an integer N >= 1 (every N-th layer from layer 0 is MoE) or one 0/1 per "
                 "layer: a list, or Megatron-LM's form \"[0]*1+[1]*3\"")


def parse_layer_freq(value: Any) -> LayerFreq:
    """``--moe-layer-freq`` as given (int, list, or its text) -> an int or a 0/1 tuple.

    The text form is Megatron-LM's (``"([0]*3+[1]*58)"``, ``"[1,0,1,0]"``), read by a
    small grammar (lists of 0/1, each optionally repeated ``*n``, joined by ``+``), never
    evaluated."""
    if isinstance(value, bool):
        raise ConfigError(_FREQ_FLAG, value, _FREQ_ALLOWED)
    if isinstance(value, int):
        check_int(_FREQ_FLAG, value, 1)
        return value
    if isinstance(value, (list, tuple)):
        if not value or any(v not in (0, 1) or isinstance(v, bool) for v in value):
            raise ConfigError(_FREQ_FLAG, list(value), _FREQ_ALLOWED)
        return tuple(int(v) for v in value)
    if not isinstance(value, str):
        raise ConfigError(_FREQ_FLAG, value, _FREQ_ALLOWED)
    text = re.sub(r"\s+", "", value)
    if text.isdigit():
        return parse_layer_freq(int(text))
    while text.startswith("(") and text.endswith(")"):
        text = text[1:-1]
    pattern = []
    for term in text.split("+"):
        match = _TERM.match(term)
        if not match:
            raise ConfigError(_FREQ_FLAG, value, _FREQ_ALLOWED)
        items = [int(v) for v in match.group(1).split(",") if v != ""]
        pattern += items * int(match.group(2) or 1)
    return parse_layer_freq(pattern)


def layer_pattern(num_layers: int, freq: LayerFreq) -> Tuple[int, ...]:
    """1 for an MoE layer, 0 for a dense one, per decoder layer (megatron-core's rule)."""
    if isinstance(freq, int):
        return tuple(1 if i % freq == 0 else 0 for i in range(num_layers))
    return tuple(freq)


def check_model_moe(model) -> None:
    """The ``model:`` section's MoE rules (``ModelConfig.__post_init__`` calls it)."""
    if model.num_experts is None:
        for name, default in MODEL_MOE_FIELDS:
            if getattr(model, name) != default:
                flag = "--" + name.replace("_", "-")
                raise ConfigError(flag, getattr(model, name), "only with --num-experts",
                                  "the model is dense without it")
        return
    check_int("--num-experts", model.num_experts, 1)
    check_int("--moe-router-topk", model.moe_router_topk, 1)
    for name in ("moe_ffn_hidden_size", "moe_shared_expert_intermediate_size",
                 "moe_router_num_groups", "moe_router_group_topk"):
        check_int("--" + name.replace("_", "-"), getattr(model, name), 1, allow_none=True)
    check_float("--moe-aux-loss-coeff", model.moe_aux_loss_coeff, 0.0)
    check_float("--moe-router-bias-update-rate", model.moe_router_bias_update_rate, 0.0)
    check_float("--moe-router-topk-scaling-factor", model.moe_router_topk_scaling_factor, 0.0,
                allow_none=True)
    _check_topk(model)
    _check_layers(model)
    _check_balancing(model)


def _check_topk(model) -> None:
    experts, topk = model.num_experts, model.moe_router_topk
    if topk > experts:
        raise ConfigError("--moe-router-topk", topk, f"at most --num-experts={experts}")
    if topk == 1 and model.moe_router_score_function == "softmax" \
            and not model.moe_router_pre_softmax:
        raise ConfigError("--moe-router-topk", 1, "at least 2 with --moe-router-score-function "
                          "softmax, or add --moe-router-pre-softmax",
                          "a softmax over one selected score has zero gradient")
    groups, group_topk = model.moe_router_num_groups, model.moe_router_group_topk
    if (groups is None) != (group_topk is None):
        given = "--moe-router-num-groups" if groups else "--moe-router-group-topk"
        missing = "--moe-router-group-topk" if groups else "--moe-router-num-groups"
        raise ConfigError(given, groups or group_topk, f"only together with {missing}",
                          "group-limited routing (DeepSeek-V3) needs both")
    if groups is None:
        return
    if experts % groups:
        raise ConfigError("--moe-router-num-groups", groups,
                          f"a divisor of --num-experts={experts}")
    if group_topk > groups:
        raise ConfigError("--moe-router-group-topk", group_topk,
                          f"at most --moe-router-num-groups={groups}")
    if topk > group_topk * (experts // groups):
        raise ConfigError("--moe-router-topk", topk,
                          f"at most the {group_topk * (experts // groups)} experts of the "
                          f"--moe-router-group-topk={group_topk} selected groups")


def _check_layers(model) -> None:
    freq = model.moe_layer_freq
    if isinstance(freq, int) and freq > model.num_layers:
        raise ConfigError(_FREQ_FLAG, freq, f"at most --num-layers={model.num_layers}")
    if isinstance(freq, tuple):
        if len(freq) != model.num_layers:
            raise ConfigError(_FREQ_FLAG, list(freq),
                              f"one 0/1 per layer: {model.num_layers} entries (--num-layers)")
        if not any(freq):
            raise ConfigError(_FREQ_FLAG, list(freq), "a pattern with at least one MoE layer "
                              "(1), or no --num-experts for a dense model")
    if model.moe_grouped_gemm and model.transformer_impl == "local":
        raise ConfigError("--moe-grouped-gemm", True, "only with --transformer-impl "
                          "transformer_engine", "the local experts are a loop of MLPs")


def _check_balancing(model) -> None:
    bias = model.moe_router_enable_expert_bias
    if bias and model.moe_router_score_function != "sigmoid":
        raise ConfigError("--moe-router-enable-expert-bias", True,
                          "only with --moe-router-score-function sigmoid",
                          "aux-loss-free balancing biases sigmoid scores (DeepSeek-V3)")
    if model.moe_router_load_balancing_type == "none" and model.moe_aux_loss_coeff > 0:
        logger.warning("--moe-aux-loss-coeff=%g has no effect with "
                       "--moe-router-load-balancing-type none.", model.moe_aux_loss_coeff)
    if model.moe_router_load_balancing_type != "none" and model.moe_aux_loss_coeff == 0:
        logger.warning("--moe-router-load-balancing-type %s has no effect with "
                       "--moe-aux-loss-coeff 0 (the default): no balancing loss is computed, "
                       "logged or trained; set a coefficient, or say none.",
                       model.moe_router_load_balancing_type)
    if not bias and model.moe_router_bias_update_rate != 1e-3:
        logger.warning("--moe-router-bias-update-rate has no effect without "
                       "--moe-router-enable-expert-bias.")


def check_parallel_moe(model, par) -> None:
    """Rules between the MoE shape and the expert-parallel split (``RunConfig`` calls it).

    Megatron's expert grid: the TP x CP x DP ranks of a pipeline stage are regrouped as
    ETP x EP x expert-DP, so ETP x EP must divide them. Without ``--world-size`` (a YAML
    parsed alone) the data-parallel size is unknown: ``runtime/preflight.py`` checks it
    again with the launcher's world size."""
    ep, etp = par.expert_model_parallel_size, par.expert_tensor_size
    if model.num_experts is None:
        for flag, value, default in (("--expert-model-parallel-size", ep, 1),
                                     ("--expert-tensor-parallel-size",
                                      par.expert_tensor_parallel_size, None),
                                     ("--moe-token-dispatcher-type",
                                      par.moe_token_dispatcher_type, "allgather")):
            if value != default:
                raise ConfigError(flag, value, "only with --num-experts")
        return
    if model.num_experts % ep:
        raise ConfigError("--expert-model-parallel-size", ep,
                          f"a divisor of --num-experts={model.num_experts}")
    stage = par.tensor_model_parallel_size * par.context_parallel_size * par.data_parallel_size
    if par.world_size is not None and stage % (ep * etp):  # else preflight, with the launcher's
        raise ConfigError(
            "--expert-model-parallel-size", ep,
            f"a value with EP x ETP = {ep} x {etp} dividing the TP x CP x DP = {stage} ranks "
            "of a pipeline stage (experts are split over the data-parallel ranks)",
        )
    for flag, width in (("--moe-ffn-hidden-size", model.moe_ffn_size),):
        if width % etp:
            raise ConfigError("--expert-tensor-parallel-size", etp,
                              f"a divisor of {flag}={width}")
    shared = model.moe_shared_expert_intermediate_size
    if shared and shared % par.tensor_model_parallel_size:
        raise ConfigError("--tensor-model-parallel-size", par.tensor_model_parallel_size,
                          f"a divisor of --moe-shared-expert-intermediate-size={shared}")
    if not model.disable_bias_linear and etp > 1:
        raise ConfigError("--expert-tensor-parallel-size", etp,
                          "1 when the linear layers have biases (no --disable-bias-linear)",
                          "megatron-core supports expert biases only without expert TP")
    if par.tensor_model_parallel_size > 1 and not par.sequence_parallel:
        raise ConfigError("--sequence-parallel", False, "on with --num-experts and "
                          "--tensor-model-parallel-size > 1",
                          "megatron-core's MoE layer refuses TP without sequence parallelism")

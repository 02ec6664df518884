"""Every difference between the megatron-core releases this package runs on, in one file.

Two release lines are supported, and CI runs both (README "Supported versions"):

* **0.19.x from 0.19.2** on Python 3.12: the main stack (``make test``), what NGC
  images, Megatron-Bridge 0.6 and NeMo run today;
* **0.16.x from 0.16.1** on Python 3.11: the tested floor (``make test-compat``).

Nothing outside this module asks which version is installed: each function below is one
concept, named for what it does, with the versions it distinguishes in its docstring. The
next megatron-core release is this file to audit (and the CPU bridge's module table,
:func:`cpu_bridge_modules`).

    from mtp_megatron.runtime import mcore_compat
    mcore_compat.check_supported()          # ConfigError naming the versions to install
    mcore_compat.mtp_inner_layer_name()     # "transformer_layer" (0.16) / "mtp_model_layer"
"""

from __future__ import annotations

import contextlib
import functools
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Dict, Optional, Tuple

from mtp_megatron.config.fields import ConfigError

if TYPE_CHECKING:  # torch is imported lazily: --dry-run never imports it
    import torch

logger = logging.getLogger("mtp_megatron")

# Release line -> the versions of it that CI tests, and the Python it needs.
LINES: Dict[str, Tuple[str, str]] = {
    "0.19": (">=0.19.2,<0.20", "3.12"),
    "0.16": (">=0.16.1,<0.17", "3.11"),
}
MAIN_LINE = "0.19"
FLOOR_LINE = "0.16"


def installed_version() -> str:
    from importlib.metadata import version

    return version("megatron-core")


def line_of(version: str) -> Optional[str]:
    """The supported release line ``version`` belongs to, or None."""
    from packaging.specifiers import SpecifierSet

    for name, (spec, _) in LINES.items():
        if version in SpecifierSet(spec, prereleases=True):
            return name
    return None


def check_supported(found: Optional[str] = None) -> str:
    """The installed megatron-core's release line; :class:`ConfigError` if it is not one
    this package is tested with (the CPU bridge and this module patch and call internals
    by name, and a silently missing patch fails far from its cause)."""
    found = installed_version() if found is None else found
    name = line_of(found)
    if name is None:
        wanted = " or ".join(f"{spec} (Python {py})" for spec, py in LINES.values())
        main_spec = LINES[MAIN_LINE][0]
        raise ConfigError(
            "megatron-core", found, wanted,
            "mtp_megatron/runtime/mcore_compat.py owns every difference between the tested "
            f"releases; pip install 'megatron-core{main_spec}' on Python 3.12",
        )
    return name


@functools.lru_cache(maxsize=None)
def line() -> str:
    """The installed release line ("0.16" or "0.19"), checked once per process."""
    return check_supported()


def _is_main() -> bool:
    return line() == "0.19"


# ----------------------------------------------------------------------------- tokenizers

def null_tokenizer(vocab_size: int):
    """megatron-core's null tokenizer (``--mock-data``) with ids ``0..vocab_size-1``, EOD
    the last. 0.16: library "null", whose ``vocab_size`` argument excludes the EOD (it adds
    one: EOD = the argument); 0.19: renamed "null-text", whose argument includes it (EOD =
    argument - 1). Same vocabulary and EOD on both, so mock data and checkpoints agree."""
    from megatron.core.tokenizers import MegatronTokenizer

    if _is_main():
        return MegatronTokenizer.from_pretrained(metadata_path={"library": "null-text"},
                                                 vocab_size=vocab_size)
    return MegatronTokenizer.from_pretrained(metadata_path={"library": "null"},
                                             vocab_size=vocab_size - 1)


# ----------------------------------------------------------------------------- MTP model

def mtp_inner_layer_name() -> str:
    """The attribute of ``MultiTokenPredictionLayer`` holding its transformer layer, and
    the matching plain ``state_dict`` key part: ``transformer_layer`` in 0.16,
    ``mtp_model_layer`` in 0.19 (whose ``sharded_state_dict`` still maps it back to
    ``transformer_layer``, so dist checkpoints are the same on both)."""
    return "mtp_model_layer" if _is_main() else "transformer_layer"


def mtp_inner_layer(mtp_layer: torch.nn.Module) -> torch.nn.Module:
    return getattr(mtp_layer, mtp_inner_layer_name())


def mtp_layer_state_keys(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """A plain state dict with the MTP inner layer under the 0.16 name
    (``mtp.layers.K.transformer_layer.*``), the one our HF conversion speaks."""
    inner = mtp_inner_layer_name()
    if inner == "transformer_layer":
        return state
    return {_rename_inner(key, inner, "transformer_layer"): value for key, value in state.items()}


def mtp_layer_state_keys_for_model(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The inverse of :func:`mtp_layer_state_keys`: 0.16 names -> this version's."""
    inner = mtp_inner_layer_name()
    if inner == "transformer_layer":
        return state
    return {_rename_inner(key, "transformer_layer", inner): value for key, value in state.items()}


def _rename_inner(key: str, old: str, new: str) -> str:
    parts = key.split(".")
    # mtp.layers.<k>.<inner>.<rest>, possibly behind wrapper prefixes ("module.")
    for i in range(len(parts) - 3):
        if parts[i:i + 2] == ["mtp", "layers"] and parts[i + 3] == old:
            parts[i + 3] = new
            break
    return ".".join(parts)


def supports_mtp_layer_options() -> bool:
    """``TransformerConfig(mtp_use_repeated_layer, mtp_detach_heads)``: 0.19 only."""
    return _is_main()


def mtp_depth_term_module() -> str:
    """The megatron-core module whose global ``MTPLossAutoScaler`` attaches each MTP
    depth's loss term (``factor / D * mtp_k``) to the hidden states, once per depth in
    depth order, during the last stage's forward: 0.16 ``GPTModel._postprocess`` in
    ``megatron.core.models.gpt.gpt_model`` (which imports the class by name), 0.19
    ``process_mtp_loss`` in ``megatron.core.transformer.multi_token_prediction``.
    ``training/mtp_weighting.py`` replaces that one name while a forward runs."""
    if _is_main():
        return "megatron.core.transformer.multi_token_prediction"
    return "megatron.core.models.gpt.gpt_model"


def mtp_config_kwargs(*, repeated_layer: bool, detach_heads: bool) -> Dict[str, bool]:
    """TransformerConfig fields for the 0.19-only MTP options (nothing on 0.16, where the
    config section refuses them before anything is built)."""
    if not supports_mtp_layer_options():
        return {}
    return {"mtp_use_repeated_layer": repeated_layer, "mtp_detach_heads": detach_heads}


# ----------------------------------------------------------------------------- MTP tracker

@dataclass
class MTPSums:
    """What megatron-core's ``MTPLossLoggingHelper.tracker`` summed since it was last
    taken, on this rank (not reduced): per depth, the loss (each microbatch's masked
    mean) and, on 0.19, the top-1 hits and positions counted (None on 0.16)."""

    loss: torch.Tensor
    correct: Optional[torch.Tensor] = None
    total: Optional[torch.Tensor] = None


def take_mtp_sums() -> Optional[MTPSums]:
    """This rank's tracker sums, then zeroed; None on ranks without MTP layers.

    0.16: ``tracker["values"]`` (loss only), cleared by ``clean_loss_in_tracker``;
    0.19: ``tracker["loss_values"/"correct_values"/"total_values"]``, cleared by
    ``clean_metrics_in_tracker``. Neither version's own reduction is used: 0.19's
    averages with ``ReduceOp.AVG``, which gloo does not have; the caller reduces.
    """
    from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper

    tracker = MTPLossLoggingHelper.tracker
    if _is_main():
        if "loss_values" not in tracker:
            return None
        sums = MTPSums(tracker["loss_values"].clone(), tracker["correct_values"].clone(),
                       tracker["total_values"].clone())
        MTPLossLoggingHelper.clean_metrics_in_tracker()
        return sums
    if "values" not in tracker:
        return None
    sums = MTPSums(tracker["values"].clone())
    MTPLossLoggingHelper.clean_loss_in_tracker()
    return sums


def reset_mtp_tracker() -> None:
    """Forget the tracker (a process global) before building a model: its tensors are
    sized for the previous model's depth."""
    from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper

    MTPLossLoggingHelper.tracker.clear()


def mtp_tracker_has_sums() -> bool:
    from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper

    return ("loss_values" if _is_main() else "values") in MTPLossLoggingHelper.tracker


# ----------------------------------------------------------------------------- MoE tracker

def take_moe_balancing_losses(names, slots: int, device) -> "torch.Tensor":
    """What megatron-core's MoE metrics tracker summed since it was last taken, on this
    rank (not reduced): ``[len(names), slots]``, per tracker name (``load_balancing_loss``,
    ``seq_load_balancing_loss``) and layer slot, zeros where this rank recorded nothing;
    then the tracker is cleared.

    0.19 only (``moe_logging.get_moe_metrics_tracker``; MoE is refused on 0.16 by
    :func:`check_config`). Its own ``report()`` is not used: it averages with
    ``ReduceOp.AVG``, which gloo does not have; ``training/moe_stats.py`` reduces.
    """
    import torch
    from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker

    tracker = get_moe_metrics_tracker()
    out = torch.zeros(len(names), slots, dtype=torch.float64, device=device)
    for row, name in enumerate(names):
        entry = tracker.metrics.get(name)
        if entry is not None:
            out[row, :entry.values.numel()] = entry.values.to(out.dtype)
    tracker.clear()
    return out


def reset_moe_tracker() -> None:
    """Forget the MoE metrics tracker (a process global) before building a model."""
    from megatron.core.transformer.moe.moe_logging import destroy_moe_metrics_tracker

    destroy_moe_metrics_tracker()


# ----------------------------------------------------------------------------- CPU bridge

# megatron-core modules whose own `torch` the CPU bridge replaces (runtime/cpu_bridge.py):
# each calls torch.cuda.current_device/synchronize/current_stream or allocates with
# device="cuda" on a path this package runs. Both releases need these.
_CPU_TORCH_MODULES = (
    "megatron.core.pipeline_parallel.schedules",          # token counters
    "megatron.core.pipeline_parallel.p2p_communication",  # shape exchange, synchronize
    "megatron.core.optimizer.clip_grads",                 # norms and overflow buffers
    "megatron.core.optimizer.optimizer",                  # found_inf, loss-scale tensors
    "megatron.core.optimizer.distrib_optimizer",          # gathered state buffers
    "megatron.core.optimizer.grad_scaler",                # fp16 loss scale
    "megatron.core.rerun_state_machine",                  # its flags
    "megatron.core.tensor_parallel.data",                 # batch-size broadcast
    "megatron.core.transformer.utils",
    "megatron.core.distributed.param_and_grad_buffer",    # buffers; 0.19: streams, events
    "megatron.core.utils",                                # grad norm without apex
    "megatron.core.models.common.embeddings.rotary_pos_embedding",  # inv_freq.to(device)
    "megatron.core.transformer.multi_token_prediction",   # the MTP tracker's tensors
    "megatron.core.tensor_parallel.mappings",             # TP gather/scatter buffers
    "megatron.core.tensor_parallel.layers",               # weight-grad buffers
    "megatron.core.tensor_parallel.utils",
    "megatron.core.models.gpt.gpt_model",
    "megatron.core.transformer.attention",
    "megatron.core.transformer.transformer_layer",
    "megatron.core.dist_checkpointing.strategies.filesystem_async",  # synchronize at save
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",  # failure flags
    "megatron.core.timers",                               # --timing-log-level: synchronize
    # Mixture of Experts (0.19; MoE is refused on 0.16, see check_config)
    "megatron.core.transformer.moe.router",               # gating weight .to(current_device)
    "megatron.core.transformer.moe.token_dispatcher",     # alltoall: device-to-host stream
    # Multi-latent attention (0.19; refused on 0.16, see check_config)
    "megatron.core.models.common.embeddings.yarn_rotary_pos_embedding",  # inv_freq devices
)


def cpu_bridge_modules() -> Tuple[str, ...]:
    """The megatron-core modules whose ``torch`` the CPU bridge replaces (same list for
    0.16 and 0.19 so far; a release that moves a call adds its module here)."""
    return _CPU_TORCH_MODULES


def cpu_bridge_tensor_cuda_callers() -> Tuple[str, ...]:
    """megatron-core functions that call ``Tensor.cuda()`` on a path we run, as
    ``module:qualname`` (0.16 and 0.19): the PP>1 embedding tie and the fp16 loss-scale
    reload."""
    return (
        "megatron.core.models.common.language_module.language_module:"
        "LanguageModule.setup_embeddings_and_output_layer",
        "megatron.core.optimizer.grad_scaler:DynamicGradScaler.load_state_dict",
    )


def cpu_bridge_host_numpy_callers() -> Tuple[str, ...]:
    """Names of megatron-core's ``maybe_move_tensor_to_cpu`` inside the modules that ask it
    for host numpy split sizes (0.19's MoE alltoall token dispatcher)."""
    return ("megatron.core.transformer.moe.token_dispatcher:maybe_move_tensor_to_cpu",)


def cpu_bridge_eager_functions() -> Tuple[str, ...]:
    """``torch.compile``'d megatron-core functions the CPU bridge runs uncompiled (0.19):
    the aux-loss-free router's token counter, a cold compile of ~8 s per process on CPU
    (measured with 0.19.2, torch 2.13) for one in-place vector addition."""
    return ("megatron.core.transformer.moe.router:TopKRouter._apply_expert_bias",)


def cpu_bridge_type_name_checkers() -> Tuple[str, ...]:
    """megatron-core functions that assert ``tensor.type()`` is a ``torch.cuda.*Tensor``
    (0.16 and 0.19): grad clipping (imported by name into optimizer.py too) and the
    mixed-precision optimizers' constructors."""
    return (
        "megatron.core.optimizer.clip_grads:clip_grad_by_total_norm_fp32",
        "megatron.core.optimizer.optimizer:clip_grad_by_total_norm_fp32",
        "megatron.core.optimizer.distrib_optimizer:DistributedOptimizer.__init__",
        "megatron.core.optimizer.optimizer:Float16OptimizerWithFloat16Params.__init__",
    )


# ----------------------------------------------------------------------------- logging

class _Drop(logging.Filter):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


@contextlib.contextmanager
def _dropping(logger_name: str, text: str):
    """Within the block, records of ``logger_name`` containing ``text`` are dropped."""
    log, drop = logging.getLogger(logger_name), _Drop(text)
    log.addFilter(drop)
    try:
        yield
    finally:
        log.removeFilter(drop)


def gpt_model_deprecation_silenced():
    """While building: drop megatron-core 0.19's "GPTModel IS DEPRECATED" warning (logged
    for every model chunk built; it points to ``HybridModel``). This package is built on
    ``GPTModel`` with its MTP block, which 0.19 still ships and fixes; docs/gpu.md says so.
    Nothing to drop on 0.16."""
    return _dropping("megatron.core.models.gpt.gpt_model", "GPTModel IS DEPRECATED")


def ddp_layout_notice_silenced():
    """While wrapping in DDP: drop megatron-core 0.19's "full_param_layout not provided"
    warning. With the distributed optimizer, 0.19's DDP computes the parameter layout
    itself when none is passed (its backward-compatible path, the layout 0.16 used);
    Megatron-LM precomputes the same with ``DistributedOptimizer.compute_full_param_layout``.
    Nothing to drop on 0.16."""
    return _dropping("megatron.core.distributed.distributed_data_parallel",
                     "full_param_layout not provided")


# ----------------------------------------------------------------------------- config rules

def check_config(cfg, found: Optional[str] = None) -> None:
    """What the installed megatron-core release can run, checked before anything starts
    (the launcher calls it right after the config is parsed, ``--dry-run`` included).

    * a tested release (:func:`check_supported`);
    * ``--num-experts`` (Mixture of Experts, expert parallelism): trained and tested on 0.19
      only (its CPU bridge entries, metrics tracker and tests); refused on 0.16;
    * ``--multi-latent-attention``: built, trained and tested on 0.19 only (its local core
      attention, ``model/mla.py``, is written against 0.19's ``DotProductAttention``);
      refused on 0.16;
    * ``--mtp-use-repeated-layer`` / ``--mtp-detach-heads``: TransformerConfig fields since
      0.19; refused on 0.16;
    * FP8 + ``--recompute-granularity full`` + MTP: before 0.18 the MTP layers' gradients
      were silently dropped (NVIDIA/Megatron-LM#4593, fixed by #4765 in 0.18): refused on
      0.16;
    * ``--calculate-per-token-loss`` + MTP: before 0.17 the MTP loss is not rescaled for
      the k tokens each depth rolls off (NVIDIA/Megatron-LM#3159): a warning on 0.16.
    """
    found = installed_version() if found is None else found
    name = check_supported(found)
    mtp, train = cfg.mtp, cfg.training
    if name != MAIN_LINE and cfg.model.num_experts is not None:
        raise ConfigError(
            "--num-experts", cfg.model.num_experts,
            f"megatron-core {LINES[MAIN_LINE][0]} (Python 3.12)",
            f"megatron-core {found} is installed; Mixture-of-Experts is trained and tested "
            "on the main stack only (docs/moe.md)",
        )
    if name != MAIN_LINE and cfg.model.multi_latent_attention:
        raise ConfigError(
            "--multi-latent-attention", True,
            f"megatron-core {LINES[MAIN_LINE][0]} (Python 3.12)",
            f"megatron-core {found} is installed; multi-latent attention is trained and "
            "tested on the main stack only (docs/moe.md)",
        )
    if name == "0.19" or not mtp.enabled:
        return
    for flag, on in (("--mtp-use-repeated-layer", mtp.mtp_use_repeated_layer),
                     ("--mtp-detach-heads", mtp.mtp_detach_heads)):
        if on:
            raise ConfigError(
                flag, True, f"megatron-core {LINES[MAIN_LINE][0]} (Python 3.12)",
                f"megatron-core {found} is installed; the option is a TransformerConfig "
                "field since 0.19",
            )
    if train.fp8_format and train.recompute_granularity == "full":
        raise ConfigError(
            "--recompute-granularity", "full",
            "selective or none with --fp8-format and --mtp-num-layers on megatron-core "
            f"{found}, or megatron-core {LINES[MAIN_LINE][0]}",
            "before 0.18 full recompute under FP8 silently drops the MTP layers' gradients "
            "(NVIDIA/Megatron-LM#4593, fixed by #4765)",
        )
    if train.calculate_per_token_loss:
        logger.warning(
            "--calculate-per-token-loss with MTP on megatron-core %s: each depth's loss is "
            "not rescaled for the tokens it rolls off (NVIDIA/Megatron-LM#3159, fixed in "
            "0.17), so depth k weighs slightly less than the factor says; megatron-core "
            "%s does it right.", found, LINES[MAIN_LINE][0])


def mtp_layer_for_depth(mtp_block: torch.nn.Module, depth: int) -> torch.nn.Module:
    """The ``MultiTokenPredictionLayer`` that runs depth ``depth`` (1-based): layer
    ``depth - 1``, or layer 0 at every depth with 0.19's ``mtp_use_repeated_layer``."""
    if getattr(mtp_block, "mtp_use_repeated_layer", False):  # the attribute is 0.19's
        return mtp_block.layers[0]
    return mtp_block.layers[depth - 1]


# ----------------------------------------------------------------------------- workarounds

# megatron-core bugs this package works around, and on which release line each is still
# needed. tests/unit/test_mcore_workarounds.py re-proves the table on the installed release:
# it runs each scenario without the workaround and checks that the failure appears
# exactly where the table says "needed".
WORKAROUNDS: Dict[str, Dict[str, bool]] = {
    # checkpoint/distopt_ranges.py: fully_reshardable distributed-optimizer state sliced
    # from world tensors without the padding between DDP buckets (state saved shifted)
    "distopt_bucket_padding": {"0.16": True, "0.19": True},
    # model/builder.py::_drop_unused_output_weight: with tied embeddings, the MTP stage
    # (PP > 1, not the first) allocates output_layer.weight that no logit ever uses
    "unused_mtp_output_weight": {"0.16": True, "0.19": True},
    # model/builder.py::_p2p_settings: VPP with PP=2 and batched p2p swaps activations and
    # gradients from the third microbatch on (NVIDIA/Megatron-LM#750, #1450)
    "vpp_unbatched_p2p": {"0.16": True, "0.19": True},
    # checkpoint/dist_ckpt.py: the distributed optimizer over torch's Adam (no Apex/TE)
    # asserts one `step` on a fresh optimizer, loses `step` loading fully_reshardable, and
    # shares one `step` tensor between all parameters after a load
    "torch_adam_step": {"0.16": True, "0.19": True},
    # model/builder.py: --bf16/--fp16 chunks wrapped in Float16Module, as Megatron-LM does;
    # without it norm weights stay fp32 and the optimizers' checkpoints break
    "float16_module": {"0.16": True, "0.19": True},
}


def needs(workaround: str) -> bool:
    """Whether the installed release still needs ``workaround`` (see :data:`WORKAROUNDS`)."""
    return WORKAROUNDS[workaround][line()]


def per_token_mtp_loss_rescaled() -> bool:
    """Under ``--calculate-per-token-loss``, whether each depth's loss is rescaled for the
    tokens it rolls off (lm tokens / depth-k tokens, per microbatch): 0.19 yes
    (NVIDIA/Megatron-LM#3159, since 0.17), 0.16 no. docs/mtp-objective.md has both."""
    return _is_main()


def checkpoint_notices_silenced():
    """While saving: drop megatron-core 0.19's "MCore's async save is deprecated" warning,
    which its torch_dist strategy logs on the synchronous path too (it runs the save
    through its own async machinery); misleading when nothing is saved asynchronously."""
    return _dropping("megatron.core.dist_checkpointing.strategies.torch",
                     "async save is deprecated")


def quiet_import_notices() -> None:
    """Process-start notices of megatron-core 0.19 on a CUDA build of torch without a GPU,
    none of which is actionable here: torch's "No CUDA runtime is found, using CUDA_HOME"
    (cpp_extension, imported by megatron-core's RNG module), "absl.logging is not
    installed" and "MimoModelConfig is experimental" (megatron-core modules imported by
    parallel_state). Called by the entry points before megatron-core is imported; only
    these messages are filtered."""
    import warnings

    for text in ("absl.logging is not installed", "MimoModelConfig is experimental"):
        warnings.filterwarnings("ignore", message=text, category=UserWarning)
    logging.getLogger("torch.utils.cpp_extension").addFilter(_Drop("No CUDA runtime is found"))


def async_save_kwargs() -> Dict[str, str]:
    """``dist_checkpointing.save(..., async_sharded_save=True)`` arguments for the writer
    this package schedules with megatron-core's own ``AsyncCallsQueue``: 0.19 defaults to
    NVIDIA Resiliency Extension's writer (``async_strategy="nvrx"``, a package NGC images
    may lack; without it the save raises), so ask for megatron-core's ("mcore"); 0.16 has
    only that one and no such argument."""
    return {"async_strategy": "mcore"} if _is_main() else {}

"""The configuration: one frozen dataclass per section, composed into :class:`RunConfig`.

Each section validates itself in ``__post_init__``; :class:`RunConfig` adds the rules
that span sections. Every rule raises :class:`ConfigError` naming the flag, the value
and what is allowed, before any process group or model exists, so all of it is
testable as plain Python. Field names are Megatron-LM's flag names with underscores.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, fields
from typing import Any, List, Optional, Sequence, Tuple

from mtp_megatron.config.fields import (
    ConfigError,
    check_bool,
    check_choice,
    check_float,
    check_int,
    flag_of,
    option,
)

logger = logging.getLogger(__name__)

POSITION_EMBEDDINGS = ("rope", "none", "learned_absolute")
MTP_POSITION_EMBEDDINGS = ("rope", "none")
NORMALIZATIONS = ("RMSNorm", "LayerNorm")
TRANSFORMER_IMPLS = ("local", "transformer_engine")
FP8_FORMATS = ("e4m3", "hybrid")
FP8_RECIPES = ("delayed", "tensorwise", "mxfp8", "blockwise")
LR_DECAY_STYLES = ("cosine", "linear", "constant")
TOKENIZER_TYPES = ("byte-level", "huggingface", "sentencepiece")


def _check_types(section) -> None:
    """Generic checks from field metadata: bools are bools, choices are respected."""
    for f in fields(section):
        value = getattr(section, f.name)
        if f.metadata.get("type") is bool:
            check_bool(flag_of(f.name), value)
        elif f.metadata.get("choices"):
            check_choice(flag_of(f.name), value, f.metadata["choices"],
                         allow_none=f.default is None)


@dataclass(frozen=True)
class ModelConfig:
    """GPT architecture. The defaults train in about a minute on 2 CPU cores."""

    num_layers: int = option(4, "Number of transformer layers in the decoder.", type=int)
    hidden_size: int = option(128, "Transformer hidden size.", type=int)
    num_attention_heads: int = option(4, "Number of attention heads.", type=int)
    num_query_groups: Optional[int] = option(
        None, "Query groups for grouped-query attention (default: one per head).", type=int
    )
    ffn_hidden_size: Optional[int] = option(
        None, "MLP hidden size (default: 4 x hidden size).", type=int
    )
    seq_length: int = option(128, "Sequence length of a training sample.", type=int)
    max_position_embeddings: Optional[int] = option(
        None, "Maximum positions (default: --seq-length).", type=int
    )
    vocab_size: Optional[int] = option(
        None, "Vocabulary size (default: the tokenizer's; 512 with --mock-data).", type=int
    )
    make_vocab_size_divisible_by: int = option(
        128, "Pad the vocabulary to a multiple of this times TP.", type=int
    )
    position_embedding_type: str = option(
        "rope", "Position embedding.", type=str, choices=POSITION_EMBEDDINGS
    )
    normalization: str = option("RMSNorm", "Normalization layer.", type=str, choices=NORMALIZATIONS)
    swiglu: bool = option(False, "Use a SwiGLU MLP.", type=bool)
    disable_bias_linear: bool = option(False, "No bias in linear layers.", type=bool)
    untie_embeddings_and_output_weights: bool = option(
        False, "Separate input embedding and output head weights.", type=bool
    )
    hidden_dropout: float = option(0.0, "Dropout after attention and MLP.", type=float)
    attention_dropout: float = option(0.0, "Dropout on attention probabilities.", type=float)
    init_method_std: float = option(0.02, "Std of the normal weight initialisation.", type=float)
    transformer_impl: Optional[str] = option(
        None,
        "Layer implementation (default: transformer_engine on a GPU when TE imports, "
        "else local).",
        type=str,
        choices=TRANSFORMER_IMPLS,
    )

    def __post_init__(self):
        _check_types(self)
        for name in ("num_layers", "hidden_size", "num_attention_heads", "seq_length"):
            check_int(flag_of(name), getattr(self, name), 1)
        for name in ("num_query_groups", "ffn_hidden_size", "max_position_embeddings"):
            check_int(flag_of(name), getattr(self, name), 1, allow_none=True)
        check_int("--vocab-size", self.vocab_size, 2, allow_none=True)
        check_int("--make-vocab-size-divisible-by", self.make_vocab_size_divisible_by, 1)
        for name in ("hidden_dropout", "attention_dropout", "init_method_std"):
            check_float(flag_of(name), getattr(self, name), 0.0)
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                "--hidden-size", self.hidden_size,
                f"a multiple of --num-attention-heads={self.num_attention_heads}",
            )
        if self.num_query_groups and self.num_attention_heads % self.num_query_groups:
            raise ConfigError(
                "--num-query-groups", self.num_query_groups,
                f"a divisor of --num-attention-heads={self.num_attention_heads}",
            )
        if self.max_position_embeddings and self.max_position_embeddings < self.seq_length:
            raise ConfigError(
                "--max-position-embeddings", self.max_position_embeddings,
                f"at least --seq-length={self.seq_length}",
            )

    @property
    def ffn_size(self) -> int:
        return self.ffn_hidden_size or 4 * self.hidden_size

    @property
    def query_groups(self) -> int:
        return self.num_query_groups or self.num_attention_heads


@dataclass(frozen=True)
class ParallelConfig:
    """How the model and the batch are split over ranks (Megatron's order tp-cp-dp-pp)."""

    tensor_model_parallel_size: int = option(1, "Tensor parallel size (TP).", type=int)
    pipeline_model_parallel_size: int = option(1, "Pipeline parallel size (PP).", type=int)
    num_layers_per_virtual_pipeline_stage: Optional[int] = option(
        None, "Layers per virtual pipeline stage (interleaved schedule).", type=int
    )
    context_parallel_size: int = option(1, "Context parallel size (CP).", type=int)
    sequence_parallel: bool = option(False, "Sequence parallelism (needs TP > 1).", type=bool)
    use_distributed_optimizer: bool = option(
        False, "Shard optimizer state over data parallel ranks.", type=bool
    )
    world_size: Optional[int] = option(
        None, "World size (default: from the launcher; set it for --dry-run).", type=int
    )

    def __post_init__(self):
        _check_types(self)
        for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size",
                     "context_parallel_size"):
            check_int(flag_of(name), getattr(self, name), 1)
        check_int("--num-layers-per-virtual-pipeline-stage",
                  self.num_layers_per_virtual_pipeline_stage, 1, allow_none=True)
        check_int("--world-size", self.world_size, 1, allow_none=True)
        if self.sequence_parallel and self.tensor_model_parallel_size == 1:
            raise ConfigError("--sequence-parallel", True,
                              "only with --tensor-model-parallel-size > 1")
        if self.num_layers_per_virtual_pipeline_stage and self.pipeline_model_parallel_size == 1:
            raise ConfigError(
                "--num-layers-per-virtual-pipeline-stage",
                self.num_layers_per_virtual_pipeline_stage,
                "only with --pipeline-model-parallel-size > 1",
            )
        if self.world_size is not None and self.world_size % self.model_parallel_size:
            raise ConfigError(
                "--world-size", self.world_size,
                f"a multiple of TP x PP x CP = {self.model_parallel_size}",
            )

    @property
    def model_parallel_size(self) -> int:
        return (self.tensor_model_parallel_size * self.pipeline_model_parallel_size
                * self.context_parallel_size)

    @property
    def data_parallel_size(self) -> int:
        return (self.world_size or self.model_parallel_size) // self.model_parallel_size


@dataclass(frozen=True)
class MTPConfig:
    """Multi-token prediction (DeepSeek-V3): D sequential modules on the last stage."""

    mtp_num_layers: Optional[int] = option(
        None, "MTP depth D (omit to train without MTP).", type=int
    )
    mtp_loss_scaling_factor: float = option(
        0.1, "Weight of the MTP losses: lm + factor / D * sum_k mtp_k.", type=float
    )

    def __post_init__(self):
        check_int("--mtp-num-layers", self.mtp_num_layers, 1, allow_none=True)
        check_float("--mtp-loss-scaling-factor", self.mtp_loss_scaling_factor, 0.0)
        if self.enabled and self.mtp_loss_scaling_factor == 0:
            logger.warning(
                "--mtp-loss-scaling-factor=0 with --mtp-num-layers=%d: the MTP layers get no "
                "gradient and do not learn.", self.mtp_num_layers,
            )

    @property
    def enabled(self) -> bool:
        return self.mtp_num_layers is not None


@dataclass(frozen=True)
class TrainingConfig:
    """Batch, optimiser, schedule and precision."""

    micro_batch_size: int = option(4, "Samples per microbatch per data parallel rank.", type=int)
    global_batch_size: int = option(16, "Samples per optimizer step over all ranks.", type=int)
    train_iters: int = option(200, "Optimizer steps to run.", type=int)
    lr: float = option(2e-3, "Peak learning rate.", type=float)
    min_lr: float = option(2e-4, "Learning rate at the end of decay.", type=float)
    lr_warmup_iters: Optional[int] = option(
        None, "Linear warmup steps (default: 10% of the decay steps).", type=int
    )
    lr_decay_iters: Optional[int] = option(
        None, "Steps over which to decay (default: --train-iters).", type=int
    )
    lr_decay_style: str = option("cosine", "Decay after warmup.", type=str, choices=LR_DECAY_STYLES)
    weight_decay: float = option(0.01, "AdamW weight decay.", type=float)
    adam_beta1: float = option(0.9, "Adam beta1.", type=float)
    adam_beta2: float = option(0.95, "Adam beta2.", type=float)
    clip_grad: float = option(1.0, "Gradient clipping by global norm (0 disables).", type=float)
    seed: int = option(1234, "Random seed.", type=int)
    bf16: bool = option(False, "bfloat16 mixed precision.", type=bool)
    fp16: bool = option(False, "float16 mixed precision with loss scaling.", type=bool)
    fp8_format: Optional[str] = option(
        None, "FP8 through Transformer Engine.", type=str, choices=FP8_FORMATS
    )
    fp8_recipe: str = option("delayed", "FP8 scaling recipe.", type=str, choices=FP8_RECIPES)
    fp8_amax_history_len: int = option(1024, "FP8 amax history (delayed recipe).", type=int)
    skip_nan_steps: bool = option(
        False, "Skip the update of a step whose loss or gradients are NaN/Inf (default: stop).",
        type=bool,
    )
    calculate_per_token_loss: bool = option(
        False, "Average the loss over all tokens of the global batch, not per microbatch.",
        type=bool,
    )

    def __post_init__(self):
        _check_types(self)
        for name in ("micro_batch_size", "global_batch_size", "train_iters"):
            check_int(flag_of(name), getattr(self, name), 1)
        check_int("--lr-warmup-iters", self.lr_warmup_iters, 0, allow_none=True)
        check_int("--lr-decay-iters", self.lr_decay_iters, 1, allow_none=True)
        check_int("--fp8-amax-history-len", self.fp8_amax_history_len, 1)
        check_int("--seed", self.seed, 0)
        for name in ("lr", "min_lr", "weight_decay", "clip_grad"):
            check_float(flag_of(name), getattr(self, name), 0.0)
        for name in ("adam_beta1", "adam_beta2"):
            value = getattr(self, name)
            check_float(flag_of(name), value, 0.0)
            if value >= 1:
                raise ConfigError(flag_of(name), value, "a number in [0, 1)")
        if self.min_lr > self.lr:
            raise ConfigError("--min-lr", self.min_lr, f"at most --lr={self.lr}")
        if self.warmup_iters >= self.decay_iters:
            raise ConfigError(
                "--lr-warmup-iters", self.lr_warmup_iters,
                f"fewer than --lr-decay-iters (or --train-iters) = {self.decay_iters}",
            )
        if self.bf16 and self.fp16:
            raise ConfigError("--fp16", True, "only one of --bf16 and --fp16")

    @property
    def decay_iters(self) -> int:
        return self.lr_decay_iters or self.train_iters

    @property
    def warmup_iters(self) -> int:
        if self.lr_warmup_iters is None:
            return self.decay_iters // 10
        return self.lr_warmup_iters


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


def parse_split(split: str) -> List[float]:
    """``"98,2,0"`` -> ``[98.0, 2.0, 0.0]`` (train, validation, test weights)."""
    try:
        parts = [float(p) for p in str(split).replace("/", ",").split(",")]
    except ValueError:
        parts = []
    if (not 1 <= len(parts) <= 3 or any(not math.isfinite(p) or p < 0 for p in parts)
            or parts[0] <= 0):
        raise ConfigError("--split", split,
                          "up to three non-negative weights train,valid,test with train > 0 "
                          "(e.g. 98,2,0)")
    return parts + [0.0] * (3 - len(parts))


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

    def __post_init__(self):
        _check_types(self)
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
        needs_model = self.tokenizer_type in ("huggingface", "sentencepiece")
        if needs_model and not self.tokenizer_model:
            raise ConfigError("--tokenizer-model", None,
                              f"a local file with --tokenizer-type {self.tokenizer_type}")
        if self.tokenizer_model and not needs_model:
            raise ConfigError("--tokenizer-model", self.tokenizer_model,
                              "only with --tokenizer-type huggingface or sentencepiece")
        if self.mock_data and (self.tokenizer_type != "byte-level" or self.split != "98,2,0"):
            logger.warning("--tokenizer-type/--split have no effect with --mock-data.")


EXIT_SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2")


@dataclass(frozen=True)
class CheckpointConfig:
    """Saving, loading and leaving cleanly (megatron-core dist_checkpointing, torch_dist)."""

    save: Optional[str] = option(
        None, "Save checkpoints here (and resume from here when --load is not given).", type=str
    )
    load: Optional[str] = option(
        None, "Resume from the latest complete checkpoint in this directory.", type=str
    )
    save_interval: Optional[int] = option(None, "Save every N iterations.", type=int)
    no_load_optim: bool = option(
        False, "Load the model but not the optimizer and LR scheduler states.", type=bool
    )
    no_load_rng: bool = option(False, "Do not restore the RNG states.", type=bool)
    finetune: bool = option(
        False, "Load only the model; start at iteration 0 with a fresh optimizer.", type=bool
    )
    exit_signal_handler: bool = option(
        False, "On --exit-signal: finish the iteration, save, exit 0.", type=bool
    )
    exit_signal: str = option(
        "SIGTERM", "The signal --exit-signal-handler catches.", type=str, choices=EXIT_SIGNALS
    )
    exit_duration_in_mins: Optional[float] = option(
        None, "Save and exit after this many minutes of training.", type=float
    )
    exit_interval: Optional[int] = option(
        None, "Save and exit when the iteration is a multiple of this.", type=int
    )

    def __post_init__(self):
        _check_types(self)
        check_int("--save-interval", self.save_interval, 1, allow_none=True)
        check_int("--exit-interval", self.exit_interval, 1, allow_none=True)
        check_float("--exit-duration-in-mins", self.exit_duration_in_mins, 0.0, allow_none=True)
        if self.save_interval and not self.save:
            raise ConfigError("--save-interval", self.save_interval,
                              "only together with --save DIR")
        exits = self.exit_signal_handler or self.exit_duration_in_mins or self.exit_interval
        if exits and not self.save:
            logger.warning("--exit-signal-handler/--exit-duration-in-mins/--exit-interval "
                           "without --save: the run will stop but save nothing.")

    @property
    def resume_from(self) -> Optional[str]:
        """Where to look for a checkpoint: --load, else --save (auto-resume)."""
        return self.load or self.save


@dataclass(frozen=True)
class LoggingConfig:
    """What is printed and where the run's files go."""

    log_interval: int = option(10, "Print a log line every N iterations.", type=int)
    tensorboard_dir: Optional[str] = option(None, "Write tensorboard scalars here.", type=str)
    output_dir: str = option(
        "runs/default", "The run's directory (resolved config, logs).", type=str
    )

    def __post_init__(self):
        check_int("--log-interval", self.log_interval, 1)


SECTIONS = {
    "model": ModelConfig,
    "parallel": ParallelConfig,
    "mtp": MTPConfig,
    "training": TrainingConfig,
    "data": DataConfig,
    "checkpoint": CheckpointConfig,
    "logging": LoggingConfig,
}


@dataclass(frozen=True)
class RunConfig:
    """The whole run. Cross-section rules live here."""

    model: ModelConfig = ModelConfig()
    parallel: ParallelConfig = ParallelConfig()
    mtp: MTPConfig = MTPConfig()
    training: TrainingConfig = TrainingConfig()
    data: DataConfig = DataConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    logging: LoggingConfig = LoggingConfig()

    def __post_init__(self):
        self._check_mtp()
        self._check_parallel_split()
        self._check_precision()

    def _check_mtp(self) -> None:
        mtp, model, par = self.mtp, self.model, self.parallel
        if not mtp.enabled:
            return
        if par.context_parallel_size > 1:
            raise ConfigError(
                "--context-parallel-size", par.context_parallel_size,
                "1 when --mtp-num-layers is set",
                "MTP is not supported with context parallelism in mtp_megatron",
            )
        if model.position_embedding_type not in MTP_POSITION_EMBEDDINGS:
            raise ConfigError(
                "--position-embedding-type", model.position_embedding_type,
                "rope or none when --mtp-num-layers is set",
                "the MTP layers need relative positions",
            )
        if model.seq_length <= mtp.mtp_num_layers:
            raise ConfigError(
                "--seq-length", model.seq_length,
                f"more than --mtp-num-layers={mtp.mtp_num_layers}",
                "depth k predicts the token k+1 ahead",
            )

    def _check_parallel_split(self) -> None:
        model, par, train = self.model, self.parallel, self.training
        tp, pp = par.tensor_model_parallel_size, par.pipeline_model_parallel_size
        if model.num_attention_heads % tp:
            raise ConfigError(
                "--tensor-model-parallel-size", tp,
                f"a divisor of --num-attention-heads={model.num_attention_heads}",
            )
        if model.ffn_size % tp:
            raise ConfigError(
                "--tensor-model-parallel-size", tp,
                f"a divisor of the MLP width --ffn-hidden-size={model.ffn_size}",
            )
        if model.query_groups % tp:
            raise ConfigError(
                "--tensor-model-parallel-size", tp,
                f"a divisor of --num-query-groups={model.query_groups}",
            )
        if model.num_layers % pp:
            raise ConfigError(
                "--pipeline-model-parallel-size", pp,
                f"a divisor of --num-layers={model.num_layers}",
            )
        vstage = par.num_layers_per_virtual_pipeline_stage
        if vstage and (model.num_layers // pp) % vstage:
            raise ConfigError(
                "--num-layers-per-virtual-pipeline-stage", vstage,
                f"a divisor of the {model.num_layers // pp} layers per pipeline stage",
            )
        if vstage and (model.num_layers // pp) // vstage < 2:
            raise ConfigError(
                "--num-layers-per-virtual-pipeline-stage", vstage,
                f"at most half of the {model.num_layers // pp} layers per pipeline stage "
                "(fewer than 2 virtual stages is not interleaving)",
            )
        step = train.micro_batch_size * par.data_parallel_size
        if train.global_batch_size % step:
            raise ConfigError(
                "--global-batch-size", train.global_batch_size,
                f"a multiple of --micro-batch-size x data parallel size = "
                f"{train.micro_batch_size} x {par.data_parallel_size} = {step}",
            )
        if vstage and self.num_microbatches % pp:
            raise ConfigError(
                "--global-batch-size", train.global_batch_size,
                f"one that gives a multiple of --pipeline-model-parallel-size={pp} "
                f"microbatches (the interleaved schedule needs it; now {self.num_microbatches})",
            )

    def _check_precision(self) -> None:
        train, model = self.training, self.model
        if train.fp8_format and model.transformer_impl == "local":
            raise ConfigError(
                "--fp8-format", train.fp8_format,
                "only with --transformer-impl transformer_engine",
            )

    @property
    def num_microbatches(self) -> int:
        train = self.training
        per_step = train.micro_batch_size * self.parallel.data_parallel_size
        return train.global_batch_size // per_step

    @property
    def virtual_pipeline_size(self) -> Optional[int]:
        vstage = self.parallel.num_layers_per_virtual_pipeline_stage
        if not vstage:
            return None
        return self.model.num_layers // self.parallel.pipeline_model_parallel_size // vstage


def padded_vocab_size(vocab_size: int, divisible_by: int, tp: int) -> int:
    """Megatron's padding: round the vocabulary up to a multiple of divisible_by x TP."""
    multiple = divisible_by * tp
    return int(math.ceil(vocab_size / multiple) * multiple)

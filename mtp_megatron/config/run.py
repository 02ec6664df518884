"""The whole run: the sections composed, and the rules that span sections."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

from mtp_megatron.config.checkpoint import CheckpointConfig
from mtp_megatron.config.data import DataConfig
from mtp_megatron.config.fields import ConfigError
from mtp_megatron.config.logs import LoggingConfig
from mtp_megatron.config.mla import check_parallel_mla
from mtp_megatron.config.model import MTP_POSITION_EMBEDDINGS, ModelConfig
from mtp_megatron.config.moe import check_parallel_moe
from mtp_megatron.config.mtp import MTPConfig
from mtp_megatron.config.parallel import ParallelConfig
from mtp_megatron.config.training import TrainingConfig

logger = logging.getLogger(__name__)

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
        check_parallel_moe(self.model, self.parallel)
        check_parallel_mla(self.model, self.parallel)
        self._check_precision()
        self._check_recompute()

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
        if mtp.mtp_self_distill and self.training.calculate_per_token_loss:
            raise ConfigError(
                "--calculate-per-token-loss", True, "off with --mtp-self-distill",
                "the self-distillation loss is a mean per microbatch, as megatron-core's "
                "MTP loss without it",
            )
        if model.seq_length <= mtp.mtp_num_layers:
            raise ConfigError(
                "--seq-length", model.seq_length,
                f"more than --mtp-num-layers={mtp.mtp_num_layers}",
                "depth k predicts the token k+1 ahead",
            )
        self._check_mtp_schedule()

    def _check_mtp_schedule(self) -> None:
        """The MTP factor schedule against --train-iters: the warmup ends within the run,
        a decay ends after the warmup."""
        mtp, train_iters = self.mtp, self.training.train_iters
        warmup = mtp.mtp_loss_scaling_factor_warmup_iters
        if warmup > train_iters:
            raise ConfigError("--mtp-loss-scaling-factor-warmup-iters", warmup,
                              f"at most --train-iters={train_iters}")
        if not mtp.decays:
            return
        end = self.mtp_factor_decay_iters
        if end <= warmup:
            given = mtp.mtp_loss_scaling_factor_decay_iters
            raise ConfigError(
                "--mtp-loss-scaling-factor-decay-iters", given,
                f"more than --mtp-loss-scaling-factor-warmup-iters={warmup} (the decay "
                "starts when the warmup ends)",
                "" if given is not None else f"its default is --train-iters={train_iters}",
            )
        if mtp.final_factor == mtp.mtp_loss_scaling_factor:
            logger.warning(
                "--mtp-loss-scaling-factor-decay-style %s with --mtp-loss-scaling-factor-final "
                "equal to --mtp-loss-scaling-factor (%g): the factor does not change.",
                mtp.mtp_loss_scaling_factor_decay_style, mtp.mtp_loss_scaling_factor)

    @property
    def mtp_factor_decay_iters(self) -> int:
        """Where the MTP factor's decay ends (--mtp-loss-scaling-factor-decay-iters, by
        default --train-iters, as --lr-decay-iters)."""
        return self.mtp.mtp_loss_scaling_factor_decay_iters or self.training.train_iters

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
        if train.fp8_format:
            self._check_fp8_shapes()

    def _check_fp8_shapes(self) -> None:
        """Transformer Engine's FP8 GEMM rule (``assert_dim_for_fp8_exec``): each linear
        layer's input has rows (tokens on this rank) divisible by 8 and columns divisible
        by 16 (32 for every dimension with --fp8-recipe mxfp8, its block size). Under
        --sequence-parallel the layer-norm linears see s/TP tokens before the all-gather.
        """
        model, par, train = self.model, self.parallel, self.training
        tp, cp, sp = (par.tensor_model_parallel_size, par.context_parallel_size,
                      par.sequence_parallel)
        rows, cols = (32, 32) if train.fp8_recipe == "mxfp8" else (8, 16)
        tokens = model.seq_length * train.micro_batch_size
        split = cp * (tp if sp else 1)
        if tokens % (split * rows):
            where = " x ".join(["--context-parallel-size"] * (cp > 1)
                               + ["--tensor-model-parallel-size (--sequence-parallel)"] * sp)
            raise ConfigError(
                "--seq-length", model.seq_length,
                f"--seq-length x --micro-batch-size = {tokens} tokens per microbatch divisible "
                f"by {split * rows} (FP8 GEMMs need a multiple of {rows} tokens per rank"
                + (f", after dividing by {where}" if split > 1 else "") + ")",
                f"--fp8-format {train.fp8_format}",
            )
        kv = model.hidden_size // model.num_attention_heads
        widths = [  # (flag, its value, what the GEMM sees per rank, that width)
            ("--hidden-size", model.hidden_size, "--hidden-size", model.hidden_size),
            ("--hidden-size", model.hidden_size, "--hidden-size / TP", model.hidden_size // tp),
            ("--ffn-hidden-size", model.ffn_size, "--ffn-hidden-size / TP", model.ffn_size // tp),
            ("--num-query-groups", model.query_groups, "--num-query-groups x head dim / TP",
             model.query_groups * kv // tp),
        ]
        for flag, value, what, width in widths:
            if width % cols:
                raise ConfigError(
                    flag, value, f"a value that makes {what} (now {width}) divisible by {cols}",
                    f"an FP8 GEMM dimension under --fp8-format {train.fp8_format} "
                    f"--fp8-recipe {train.fp8_recipe}",
                )

    def _check_recompute(self) -> None:
        """Recompute against the layer split, and what megatron-core 0.16.1 does with the
        MTP layers: recomputed under full/uniform only with one layer per group (it
        asserts ``recompute_num_layers == 1`` at the first forward otherwise), never
        under full/block (it warns and skips them); selective recomputes the core
        attention of every layer, MTP layers included."""
        train, model, par = self.training, self.model, self.parallel
        if train.cross_entropy_fusion_impl == "te" and model.transformer_impl == "local":
            raise ConfigError("--cross-entropy-fusion-impl", "te",
                              "native with --transformer-impl local")
        if train.recompute_granularity != "full":
            return
        per_chunk = model.num_layers // par.pipeline_model_parallel_size
        if par.num_layers_per_virtual_pipeline_stage:
            per_chunk = par.num_layers_per_virtual_pipeline_stage
        if train.recompute_num_layers > per_chunk:
            raise ConfigError(
                "--recompute-num-layers", train.recompute_num_layers,
                f"at most the {per_chunk} layers of a pipeline stage (or virtual stage)",
            )
        if self.mtp.enabled and train.recompute_method == "uniform" \
                and train.recompute_num_layers != 1:
            raise ConfigError(
                "--recompute-num-layers", train.recompute_num_layers,
                "1 with --recompute-method uniform and --mtp-num-layers",
                "megatron-core 0.16.1 recomputes each MTP layer on its own and asserts it",
            )
        if self.mtp.enabled and train.recompute_method == "block":
            logger.warning("--recompute-method block: megatron-core 0.16.1 does not recompute "
                           "the MTP layers (only the decoder's first --recompute-num-layers "
                           "per stage); use --recompute-method uniform "
                           "--recompute-num-layers 1 to recompute them too.")

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

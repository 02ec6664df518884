"""GPT architecture flags (``model:`` in YAML)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from mtp_megatron.config.fields import (
    ConfigError,
    check_float,
    check_int,
    check_types,
    flag_of,
    option,
)

POSITION_EMBEDDINGS = ("rope", "none", "learned_absolute")
MTP_POSITION_EMBEDDINGS = ("rope", "none")
NORMALIZATIONS = ("RMSNorm", "LayerNorm")
TRANSFORMER_IMPLS = ("local", "transformer_engine")
# megatron-core's AttnBackend names (megatron/core/transformer/enums.py).
ATTENTION_BACKENDS = ("auto", "flash", "fused", "unfused", "local")


@dataclass(frozen=True)
class ModelConfig:
    """GPT architecture, Llama-shaped by default (RMSNorm, SwiGLU, no linear biases, RoPE;
    exports to LlamaForCausalLM). The defaults train in about two minutes on 2 CPU cores."""

    num_layers: int = option(4, "Number of transformer layers in the decoder.", type=int)
    hidden_size: int = option(128, "Transformer hidden size.", type=int)
    num_attention_heads: int = option(4, "Number of attention heads.", type=int)
    num_query_groups: Optional[int] = option(
        None, "Query groups for grouped-query attention (default: one per head).", type=int
    )
    ffn_hidden_size: Optional[int] = option(
        None, "MLP hidden size (default: Megatron-LM's: 4 x hidden size, or with --swiglu "
        "int(8 x hidden size / 3 / 64) x 64, the same parameters as a 4 x GELU MLP).", type=int
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
    rotary_base: int = option(10000, "RoPE base (Hugging Face's rope_theta).", type=int)
    normalization: str = option("RMSNorm", "Normalization layer.", type=str, choices=NORMALIZATIONS)
    norm_epsilon: float = option(
        1e-5, "Epsilon of the normalization layers (rms_norm_eps / layer_norm_eps).", type=float
    )
    swiglu: bool = option(True, "Use a SwiGLU MLP (Llama; off: a GELU MLP).", type=bool)
    disable_bias_linear: bool = option(True, "No bias in linear layers (Llama).", type=bool)
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
    attention_backend: str = option(
        "auto", "Attention kernel (megatron-core AttnBackend): auto, flash, fused, unfused "
        "(Transformer Engine's) or local (megatron-core's unfused DotProductAttention).",
        type=str, choices=ATTENTION_BACKENDS,
    )

    def __post_init__(self):
        check_types(self)
        if self.transformer_impl == "local" and self.attention_backend in ("flash", "fused",
                                                                           "unfused"):
            raise ConfigError(
                "--attention-backend", self.attention_backend,
                "auto or local with --transformer-impl local",
                "flash, fused and unfused are Transformer Engine kernels",
            )
        if self.transformer_impl == "transformer_engine" and self.attention_backend == "local":
            raise ConfigError(
                "--attention-backend", "local", "auto, flash, fused or unfused with "
                "--transformer-impl transformer_engine",
                "local attention is the --transformer-impl local layer",
            )
        for name in ("num_layers", "hidden_size", "num_attention_heads", "seq_length"):
            check_int(flag_of(name), getattr(self, name), 1)
        for name in ("num_query_groups", "ffn_hidden_size", "max_position_embeddings"):
            check_int(flag_of(name), getattr(self, name), 1, allow_none=True)
        check_int("--vocab-size", self.vocab_size, 2, allow_none=True)
        if self.ffn_size == 0:
            raise ConfigError(
                "--ffn-hidden-size", None, "an explicit MLP width for this --hidden-size",
                f"the SwiGLU default int(8 x {self.hidden_size} / 3 / 64) x 64 is 0",
            )
        check_int("--make-vocab-size-divisible-by", self.make_vocab_size_divisible_by, 1)
        for name in ("hidden_dropout", "attention_dropout", "init_method_std"):
            check_float(flag_of(name), getattr(self, name), 0.0)
        check_int("--rotary-base", self.rotary_base, 1)
        check_float("--norm-epsilon", self.norm_epsilon, 0.0)
        if self.norm_epsilon == 0:
            raise ConfigError("--norm-epsilon", self.norm_epsilon, "a positive number")
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
        """The MLP width built: --ffn-hidden-size, else Megatron-LM's default."""
        return self.ffn_hidden_size or default_ffn_hidden_size(self.hidden_size, self.swiglu)

    @property
    def query_groups(self) -> int:
        return self.num_query_groups or self.num_attention_heads


def default_ffn_hidden_size(hidden_size: int, swiglu: bool) -> int:
    """Megatron-LM's default MLP width (``validate_args``): 4h, or with SwiGLU two thirds
    of it (three matrices instead of two: the same parameter count) rounded down to a
    multiple of 64. h=128 -> 320, h=4096 -> 10880; 0 below h=24 (an explicit width is
    required there)."""
    if swiglu:
        return int(4 * hidden_size * 2 / 3 / 64) * 64
    return 4 * hidden_size


def padded_vocab_size(vocab_size: int, divisible_by: int, tp: int) -> int:
    """Megatron's padding: round the vocabulary up to a multiple of divisible_by x TP."""
    multiple = divisible_by * tp
    return int(math.ceil(vocab_size / multiple) * multiple)

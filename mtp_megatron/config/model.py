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
from mtp_megatron.config.mla import ROPE_TYPES, check_model_mla
from mtp_megatron.config.moe import (
    LOAD_BALANCING,
    SCORE_FUNCTIONS,
    LayerFreq,
    check_model_moe,
    layer_pattern,
    parse_layer_freq,
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

    # Mixture of Experts (Megatron-LM's flags; rules in config/moe.py, docs/moe.md)
    num_experts: Optional[int] = option(
        None, "Experts per MoE layer (omit: a dense model).", type=int
    )
    moe_ffn_hidden_size: Optional[int] = option(
        None, "Width of each routed expert's MLP (default: the MLP width).", type=int
    )
    moe_router_topk: int = option(2, "Experts each token is routed to.", type=int)
    moe_shared_expert_intermediate_size: Optional[int] = option(
        None, "Total width of the shared experts every token passes through "
        "(DeepSeek-V3: shared experts x expert width; omit: none).", type=int
    )
    moe_layer_freq: LayerFreq = option(
        1, "Which layers are MoE: N (every N-th, from layer 0) or a 0/1 per layer, "
        "e.g. \"[0]*1+[1]*3\" (first layer dense). The MTP layers copy the last layer's "
        "type.", type=str,
    )
    moe_router_score_function: str = option(
        "softmax", "Router scores: softmax or sigmoid (DeepSeek-V3).", type=str,
        choices=SCORE_FUNCTIONS,
    )
    moe_router_pre_softmax: bool = option(
        False, "Softmax over all experts before top-k (needed for --moe-router-topk 1 "
        "with softmax).", type=bool,
    )
    moe_router_topk_scaling_factor: Optional[float] = option(
        None, "Scale the routed experts' weights (DeepSeek-V3: routed_scaling_factor).",
        type=float,
    )
    moe_router_num_groups: Optional[int] = option(
        None, "Expert groups for group-limited routing (DeepSeek-V3: n_group).", type=int
    )
    moe_router_group_topk: Optional[int] = option(
        None, "Groups each token may use (DeepSeek-V3: topk_group).", type=int
    )
    moe_router_load_balancing_type: str = option(
        "aux_loss", "Balancing loss: aux_loss (per micro-batch), seq_aux_loss (per "
        "sequence) or none.", type=str, choices=LOAD_BALANCING,
    )
    moe_aux_loss_coeff: float = option(
        0.0, "Weight of the balancing loss (0: logged only).", type=float
    )
    moe_router_enable_expert_bias: bool = option(
        False, "Aux-loss-free balancing: a per-expert bias on the sigmoid scores, updated "
        "from the tokens each expert got (DeepSeek-V3).", type=bool,
    )
    moe_router_bias_update_rate: float = option(
        1e-3, "Step of the expert-bias update per optimizer step.", type=float
    )
    moe_grouped_gemm: bool = option(
        False, "Grouped GEMM for the experts (Transformer Engine, GPU).", type=bool
    )

    # Multi-latent attention (Megatron-LM's flags; rules in config/mla.py, docs/moe.md)
    multi_latent_attention: bool = option(
        False, "Multi-latent attention (DeepSeek-V2/V3): queries, keys and values from "
        "low-rank latents.", type=bool,
    )
    q_lora_rank: Optional[int] = option(
        None, "Rank of the query latent (omit: queries straight from the hidden state).",
        type=int,
    )
    kv_lora_rank: int = option(32, "Rank of the key/value latent.", type=int)
    qk_head_dim: int = option(
        128, "Per-head query/key width without RoPE (HF: qk_nope_head_dim).", type=int
    )
    qk_pos_emb_head_dim: int = option(
        64, "Per-head query/key width with RoPE (HF: qk_rope_head_dim; one key part shared "
        "by all heads).", type=int,
    )
    v_head_dim: int = option(128, "Per-head value width.", type=int)
    qk_layernorm: bool = option(
        False, "Normalise the query and key/value latents (DeepSeek-V3's q_a_layernorm, "
        "kv_a_layernorm); with --multi-latent-attention only.", type=bool,
    )
    rope_type: str = option(
        "yarn", "MLA's rotary embedding: rope or yarn (megatron-core's MLA default; with "
        "--rotary-scaling-factor 1 it is plain RoPE).", type=str, choices=ROPE_TYPES,
    )
    rotary_scaling_factor: float = option(
        1.0, "YaRN: context-extension factor (HF: rope_parameters.factor).", type=float
    )
    mscale: float = option(1.0, "YaRN: mscale of the rotary cos/sin.", type=float)
    mscale_all_dim: float = option(
        0.0, "YaRN: mscale_all_dim (also scales the attention softmax).", type=float
    )
    yarn_original_max_position_embeddings: int = option(
        4096, "YaRN: the context length before extension.", type=int
    )
    yarn_beta_fast: float = option(32.0, "YaRN: beta_fast of the correction range.",
                                   type=float)
    yarn_beta_slow: float = option(1.0, "YaRN: beta_slow of the correction range.",
                                   type=float)

    def __post_init__(self):
        check_types(self)
        object.__setattr__(self, "moe_layer_freq", parse_layer_freq(self.moe_layer_freq))
        check_model_moe(self)
        check_model_mla(self)
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
        if self.hidden_size % self.num_attention_heads and not self.multi_latent_attention:
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

    @property
    def mla_rope_type(self) -> str:
        """MLA's rotary embedding (--rope-type)."""
        return self.rope_type

    @property
    def moe(self) -> bool:
        return self.num_experts is not None

    @property
    def moe_ffn_size(self) -> int:
        """Each routed expert's MLP width: --moe-ffn-hidden-size, else the MLP width."""
        return self.moe_ffn_hidden_size or self.ffn_size

    @property
    def moe_layers(self) -> tuple:
        """1 (MoE) or 0 (dense) per decoder layer; all 0 for a dense model."""
        if not self.moe:
            return (0,) * self.num_layers
        return layer_pattern(self.num_layers, self.moe_layer_freq)


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

"""Export a checkpoint of this package (any TP/PP layout) to a transformers directory.

    python -m mtp_megatron.hf export --load runs/x/checkpoints --out hf/x

The checkpoint is resharded into one TP = PP = 1 model (the generation loader), its
state dict renamed (``convert.to_hf``) and written with ``config.json``,
``generation_config.json`` and the tokenizer files of a Hugging Face tokenizer run.
``AutoModelForCausalLM.from_pretrained("hf/x")`` then loads it with no custom code; the
MTP modules are in ``mtp.safetensors`` (see docs/hf.md for the names).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch

from mtp_megatron.config import RunConfig, build_config
from mtp_megatron.hf import files
from mtp_megatron.hf.architectures import Architecture, for_model
from mtp_megatron.hf.config_map import hf_config_kwargs, legacy_config_keys
from mtp_megatron.hf.convert import Shape, to_hf
from mtp_megatron.hf.deps import HFError, require
from mtp_megatron.runtime import mcore_compat

logger = logging.getLogger("mtp_megatron")

DEFAULT_MAX_SHARD_BYTES = 5 * 2**30
CONFIG_CLASSES = {"llama": "LlamaConfig", "gpt_neox": "GPTNeoXConfig",
                  "glm4_moe": "Glm4MoeConfig", "deepseek_v3": "DeepseekV3Config"}


@dataclass
class ExportResult:
    out: str
    architecture: str
    files: List[str]
    mtp_tensors: List[str]


def shape_of(cfg: RunConfig, *, vocab_size: int, padded_vocab: int) -> Shape:
    model = cfg.model
    return Shape(
        num_layers=model.num_layers, heads=model.num_attention_heads,
        groups=model.query_groups, head_dim=model.hidden_size // model.num_attention_heads,
        vocab_size=vocab_size, padded_vocab=padded_vocab, mtp_layers=cfg.mtp.mtp_num_layers or 0,
        tied=not model.untie_embeddings_and_output_weights,
        experts=model.num_experts or 0, expert_bias=model.moe_router_enable_expert_bias,
    )


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def write_config(out: str, arch: Architecture, cfg: RunConfig, *, vocab_size: int,
                 eos_id: int, bos_id, dtype: torch.dtype) -> None:
    transformers = require("transformers")
    kwargs = hf_config_kwargs(arch, cfg.model, vocab_size=vocab_size)
    if cfg.mtp.enabled or arch.moe:  # (GLM-4.5's config defaults to one MTP layer)
        kwargs["num_nextn_predict_layers"] = cfg.mtp.mtp_num_layers or 0
    hf_config = getattr(transformers, CONFIG_CLASSES[arch.name])(
        **kwargs, bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=None,
        dtype=_dtype_name(dtype),
    )
    hf_config.save_pretrained(out)
    path = os.path.join(out, "config.json")
    with open(path) as fh:
        data = json.load(fh)
    data.update(legacy_config_keys(arch, cfg.model))
    with open(path, "w") as fh:
        json.dump(data, fh, indent=2, sort_keys=True)
    transformers.GenerationConfig(bos_token_id=bos_id, eos_token_id=eos_id).save_pretrained(out)


def _special_ids(cfg: RunConfig, tokenizer, imported: Optional[Dict[str, Any]] = None):
    """(eos, bos): an imported, untrained checkpoint's own (its common state keeps the
    Hugging Face config's), else the run's tokenizer's."""
    if imported and imported.get("eos_token_id") is not None:
        return imported["eos_token_id"], imported.get("bos_token_id")
    eos = tokenizer.eod
    bos = getattr(tokenizer, "bos", None) if cfg.data.tokenizer_type != "byte-level" else None
    return eos, bos if isinstance(bos, int) and bos >= 0 else None


def _tokenizer_dir(saved: Dict[str, Any]) -> Optional[str]:
    """The directory of the run's tokenizer files (None: byte-level or mock data)."""
    data = saved.get("data") or {}
    model = data.get("tokenizer_model")
    if data.get("mock_data") or not model or data.get("tokenizer_type") == "byte-level":
        return None
    return model if os.path.isdir(model) else os.path.dirname(os.path.abspath(model))


def _check_out(out: str, saved: Dict[str, Any]) -> None:
    """``--out`` must not be the tokenizer's directory (e.g. the model imported from it):
    the export would overwrite its weights, then fail copying the tokenizer onto itself."""
    tokenizer_dir = _tokenizer_dir(saved)
    if tokenizer_dir and os.path.realpath(out) == os.path.realpath(tokenizer_dir):
        raise HFError(f"--out {out} is the directory of the run's tokenizer (--tokenizer-model "
                      f"{saved['data']['tokenizer_model']}): the export would overwrite the "
                      "model files there; export into another directory")


def _one_layer_per_depth(state: Dict[str, Any], cfg: RunConfig) -> Dict[str, Any]:
    """With --mtp-use-repeated-layer the model holds one MTP layer used at every depth;
    the Hugging Face layout has one module per depth, so each depth gets a copy."""
    if not (cfg.mtp.enabled and cfg.mtp.mtp_use_repeated_layer):
        return state
    first = "mtp.layers.0."
    for k in range(1, cfg.mtp.mtp_num_layers):
        for key in [key for key in state if key.startswith(first)]:
            state[f"mtp.layers.{k}.{key[len(first):]}"] = state[key]
    return state


def export(load: str, out: str, *, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES
           ) -> ExportResult:
    """Write ``out`` (created if needed) from the checkpoint at ``load``."""
    require("transformers")
    require("safetensors")
    from mtp_megatron.checkpoint.dist_ckpt import common_state
    from mtp_megatron.inference.loading import (
        load_for_generation,
        read_saved_config,
        single_rank,
        text_vocab_size,
    )

    directory, saved = read_saved_config(load)
    arch = for_model(build_config(saved).model)  # fail before loading weights
    _check_out(out, saved)
    with single_rank() as device:
        model, cfg, tokenizer = load_for_generation(load, device)
        state = {k: v.cpu() if isinstance(v, torch.Tensor) else v
                 for k, v in model.state_dict().items()}
    state = _one_layer_per_depth(mcore_compat.mtp_layer_state_keys(state), cfg)
    vocab = text_vocab_size(cfg, tokenizer)
    padded = state["embedding.word_embeddings.weight"].shape[0]
    main, mtp = to_hf(state, arch, shape_of(cfg, vocab_size=vocab, padded_vocab=padded))
    os.makedirs(out, exist_ok=True)
    files.clear_weights(out)
    if arch.moe:  # GLM-4.5 / DeepSeek-V3: MTP layers L.. in the main files, as they ship
        main, mtp_file = {**main, **mtp}, None
    written = files.write_weights(main, out, max_shard_bytes=max_shard_bytes)
    if not arch.moe:
        mtp_file = files.write_mtp(mtp, out, num_layers=cfg.model.num_layers,
                                   depth=cfg.mtp.mtp_num_layers or 0)
    written += [mtp_file] if mtp_file else []
    eos, bos = _special_ids(cfg, tokenizer, common_state(directory).get("hf_special_tokens"))
    dtype = state["embedding.word_embeddings.weight"].dtype
    write_config(out, arch, cfg, vocab_size=vocab, eos_id=eos, bos_id=bos, dtype=dtype)
    written += ["config.json", "generation_config.json"]
    if cfg.data.tokenizer_type == "huggingface" and not cfg.data.mock_data:
        written += files.copy_tokenizer(cfg.data.tokenizer_model, out)
    elif cfg.data.tokenizer_type == "sentencepiece" and not cfg.data.mock_data:
        shutil.copyfile(cfg.data.tokenizer_model, os.path.join(out, "tokenizer.model"))
        written.append("tokenizer.model")
    kind = {"llama": "Llama", "gpt_neox": "GPT-NeoX", "glm4_moe": "GLM-4.5 MoE",
            "deepseek_v3": "DeepSeek-V3"}[arch.name]
    logger.info("exported %s (%s, %d MTP tensors) to %s: %s", load, kind, len(mtp), out,
                ", ".join(written))
    return ExportResult(out, arch.hf_class, written, sorted(mtp))

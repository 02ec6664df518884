"""A trained checkpoint as a single-rank model for generation, plus its tokenizer.

    with single_rank(seed=1234) as device:
        model, cfg, tokenizer = load_for_generation("runs/x/checkpoints", device)

A checkpoint saved with any TP/PP/VPP layout is rebuilt as one TP = PP = 1 chunk and
resharded on load by :func:`mtp_megatron.checkpoint.load_model_weights`. The padded
vocabulary is the checkpoint's (its common state records it; older checkpoints: the saved
run's --make-vocab-size-divisible-by x TP).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Any, Dict, Iterator, Tuple

import torch
import yaml
from megatron.core.models.gpt.gpt_model import GPTModel

from mtp_megatron.config import RunConfig, build_config
from mtp_megatron.data.tokenizers import MOCK_VOCAB_SIZE, mock_tokenizer
from mtp_megatron.data.tokenizers import build_tokenizer as data_tokenizer
from mtp_megatron.model.builder import build_gpt_chunk, transformer_config, vocab_size_for
from mtp_megatron.runtime import distributed, mcore_compat
from mtp_megatron.runtime.launch_env import LaunchEnv, free_port

SINGLE_RANK = {
    "tensor_model_parallel_size": 1,
    "pipeline_model_parallel_size": 1,
    "num_layers_per_virtual_pipeline_stage": None,
    "context_parallel_size": 1,
    "sequence_parallel": False,
    "use_distributed_optimizer": False,
    "expert_model_parallel_size": 1,
    "expert_tensor_parallel_size": None,
    "world_size": 1,
}


@contextlib.contextmanager
def single_rank(seed: int = 1234) -> Iterator[torch.device]:
    """A one-process group with TP = PP = 1 (megatron-core needs one even for one rank).

    Reuses a group that is already there; tears down only what it created.
    """
    if torch.distributed.is_initialized():
        yield torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
            else torch.device("cpu")
        return
    cfg = build_config({"training": {"seed": seed}}, dict(SINGLE_RANK))
    device = distributed.initialize(cfg, LaunchEnv(0, 0, 1, "127.0.0.1", free_port()))
    try:
        yield device
    finally:
        distributed.shutdown()


def single_rank_config(saved: Dict[str, Dict[str, Any]]) -> RunConfig:
    """The saved run's config with every parallel split set to one rank."""
    values = {section: dict(body) for section, body in saved.items()}
    values.setdefault("parallel", {}).update(SINGLE_RANK)
    values.setdefault("training", {})["fp8_format"] = None
    return build_config(values)


def build_tokenizer(cfg: RunConfig):
    """The tokenizer the run trained with (the null tokenizer of --mock-data: ids as text)."""
    if cfg.data.mock_data:
        return mock_tokenizer(cfg.model.vocab_size or MOCK_VOCAB_SIZE)
    return data_tokenizer(cfg.data.tokenizer_type, cfg.data.tokenizer_model)


def text_vocab_size(cfg: RunConfig, tokenizer) -> int:
    """Ids the model may emit: --vocab-size, else the tokenizer's (padding excluded)."""
    return cfg.model.vocab_size or tokenizer.vocab_size


def build_for_generation(cfg: RunConfig, padded_vocab: int, device: torch.device) -> GPTModel:
    """A fresh single-rank GPTModel (MTP block included) in eval mode."""
    mcore_compat.reset_mtp_tracker()
    one_rank = dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, **SINGLE_RANK))
    tconfig = transformer_config(one_rank, on_cpu=device.type == "cpu")
    model = build_gpt_chunk(one_rank, tconfig, "local", padded_vocab)
    return model.to(device).eval()


def read_saved_config(path: str) -> Tuple[str, Dict[str, Dict[str, Any]]]:
    """(iteration directory, saved config dict) of a save root or an iter_N directory."""
    from mtp_megatron.checkpoint import resolve_load_dir

    directory, _ = resolve_load_dir(path)
    config_path = os.path.join(directory, "run_config.yaml")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"--load {path}: {config_path} is missing")
    try:
        with open(config_path) as fh:
            saved = yaml.safe_load(fh)
    except yaml.YAMLError as exc:
        saved = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
    if not isinstance(saved, dict):
        from mtp_megatron.checkpoint import CheckpointError

        raise CheckpointError(f"--load {path}: {config_path} is corrupt (expected the saved "
                              f"run's sectioned config; found {str(saved)[:100]!r})")
    return directory, saved


def load_for_generation(path: str, device: torch.device):
    """(model, run config, tokenizer) from a checkpoint saved by training."""
    from mtp_megatron.checkpoint import load_model_weights
    from mtp_megatron.checkpoint.vocab import saved_vocab

    directory, saved = read_saved_config(path)
    saved_cfg = build_config(saved)
    cfg = single_rank_config(saved)
    tokenizer = build_tokenizer(cfg)
    padded = ((saved_vocab(directory) or {}).get("padded_vocab_size")
              or vocab_size_for(saved_cfg, text_vocab_size(cfg, tokenizer)))
    model = build_for_generation(cfg, padded, device)
    load_model_weights(directory, [model])
    return model, cfg, tokenizer

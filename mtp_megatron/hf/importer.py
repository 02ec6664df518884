"""Import a local Llama / GPT-NeoX directory as a checkpoint of this package, adding MTP.

    python -m mtp_megatron.hf import --hf path/to/llama --save ckpt/llama_mtp \
        --mtp-num-layers 1 [--mtp-init last-layer]
    torchrun --nproc-per-node 4 launch/pretrain_gpt_mtp.py --config ckpt/llama_mtp/model.yaml \
        --load ckpt/llama_mtp --finetune --tensor-model-parallel-size 2 --data-path ...

The weights go into one TP = PP = 1 model and are saved as a weights-only checkpoint
(``iter_0000000``), which megatron-core reshards into any layout on load. ``model.yaml``
next to it holds the architecture flags (and the tokenizer), which ``--load`` checks
against the run's. MTP modules: taken from ``mtp.safetensors`` when the directory has
them (an export of this package), else fresh: ``random`` = megatron-core's initialisation
(``--init-method-std`` = the model's ``initializer_range``); ``last-layer`` = each MTP
transformer layer starts as a copy of the last decoder layer (norms of ones and a random
``eh_proj`` either way).
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional

import torch
import yaml

from mtp_megatron.config import RunConfig, build_config, to_dict
from mtp_megatron.hf import files
from mtp_megatron.hf.config_map import model_values_from_hf
from mtp_megatron.hf.convert import Shape, from_hf
from mtp_megatron.hf.deps import HFError, require
from mtp_megatron.hf.export import shape_of
from mtp_megatron.runtime import mcore_compat

logger = logging.getLogger("mtp_megatron")

MTP_INITS = ("random", "last-layer")
RUN_CONFIG = "model.yaml"
HF_SPECIAL_TOKENS = ("bos_token_id", "eos_token_id")


@dataclass
class ImportResult:
    save: str
    config_path: str
    cfg: RunConfig
    mtp_from_file: int
    flags: List[str]


def read_hf_config(hf_dir: str):
    if not os.path.isfile(os.path.join(hf_dir, "config.json")):
        raise HFError(f"--hf {hf_dir}: no config.json (a local Hugging Face model directory "
                      "is needed; nothing is downloaded)")
    return require("transformers").AutoConfig.from_pretrained(hf_dir)


def run_values(hf_dir: str, hf_config, *, mtp_num_layers: Optional[int],
               make_vocab_size_divisible_by: int) -> Dict[str, Dict[str, Any]]:
    """Our config sections (model, mtp, data) for the HF model."""
    _, model = model_values_from_hf(hf_config, os.path.join(hf_dir, "config.json"))
    model["make_vocab_size_divisible_by"] = make_vocab_size_divisible_by
    values: Dict[str, Dict[str, Any]] = {"model": model,
                                         "mtp": {"mtp_num_layers": mtp_num_layers or None}}
    tokenizer = files.tokenizer_in(hf_dir)
    if tokenizer:
        values["data"] = tokenizer
    else:
        logger.warning("%s has no tokenizer.json or tokenizer.model: the run's data flags stay "
                       "byte-level; pass --tokenizer-type/--tokenizer-model for the tokenizer "
                       "this model was trained with", hf_dir)
    return values


def _stored_mtp(hf_config, tensors: Dict[str, torch.Tensor], prefix: str, num_layers: int
                ) -> int:
    """How many MTP modules the directory holds (config's count, tensors present)."""
    count = int(getattr(hf_config, "num_nextn_predict_layers", 0) or 0)
    while count and not any(k.startswith(f"{prefix}{num_layers + count - 1}.eh_proj")
                            for k in tensors):
        count -= 1
    return count


def _warm_start(state: Dict[str, torch.Tensor], shape: Shape, first: int, depth: int) -> None:
    """Copy the last decoder layer into MTP transformer layers first..depth-1."""
    last = f"decoder.layers.{shape.num_layers - 1}."
    for k in range(first, depth):
        for key in [key for key in state if key.startswith(last)]:
            state[f"mtp.layers.{k}.transformer_layer.{key[len(last):]}"] = state[key].clone()


def _load_into(model: torch.nn.Module, state: Dict[str, torch.Tensor], fresh: List[str],
               hf_dir: str) -> None:
    expected = {k for k, v in model.state_dict().items()
                if isinstance(v, torch.Tensor) and not k.endswith("_extra_state")}
    missing = sorted(k for k in expected - set(state)
                     if not any(k.startswith(p) for p in fresh))
    unexpected = sorted(set(state) - expected)
    if missing or unexpected:
        raise HFError(f"--hf {hf_dir}: weights do not match the config (missing: "
                      f"{missing[:5]}, unexpected: {unexpected[:5]})")
    with torch.no_grad():
        params = dict(model.state_dict())
        for key, value in state.items():
            if params[key].shape != value.shape:
                raise HFError(f"--hf {hf_dir}: {key} has shape {tuple(value.shape)}, the "
                              f"config gives {tuple(params[key].shape)}")
            params[key].copy_(value)


def train_flags(config_path: str, save: str, depth: Optional[int]) -> List[str]:
    flags = ["--config", config_path, "--load", save, "--finetune"]
    return flags + (["--mtp-num-layers", str(depth)] if depth else [])


def _refuse_training_checkpoints(save: str) -> None:
    """``--save`` may hold an earlier import (iteration 0, weights only), never a training
    run's checkpoints: the import would rewrite its latest_checkpointed_iteration.txt."""
    from mtp_megatron.checkpoint import read_tracker
    from mtp_megatron.checkpoint.dist_ckpt import common_state
    from mtp_megatron.checkpoint.layout import iteration_dir

    latest = read_tracker(save)
    if latest is None:
        return
    if latest == 0 and common_state(iteration_dir(save, 0)).get("weights_only"):
        return  # an earlier import: replaced
    raise HFError(f"--save {save} holds a training run's checkpoints (latest iteration "
                  f"{latest}); importing there would replace its latest_checkpointed_"
                  "iteration.txt: import into a new directory")


@contextlib.contextmanager
def _claimed(save: str) -> Iterator[None]:
    """Hold ``save``'s lock (as a training run does) while the import writes there."""
    from mtp_megatron.checkpoint.lock import SaveLock

    created = not os.path.exists(save)
    lock = SaveLock.acquire(save)  # CheckpointError if a run is writing there
    try:
        _refuse_training_checkpoints(save)
        yield
    except BaseException:
        lock.release()
        if created:
            with contextlib.suppress(OSError):
                os.rmdir(save)  # only if the failed import left it empty
        raise
    lock.release()


def import_hf(hf_dir: str, save: str, *, mtp_num_layers: Optional[int] = 1,
              mtp_init: str = "random", seed: int = 1234,
              make_vocab_size_divisible_by: int = 128) -> ImportResult:
    """Write a weights-only checkpoint of ``hf_dir`` under ``save`` (+ ``save/model.yaml``).

    ``save`` must not be a training run's directory: a run writing there (its
    ``.save.lock``) or its checkpoints are refused."""
    if mtp_init not in MTP_INITS:
        raise HFError(f"--mtp-init={mtp_init!r}; allowed: {', '.join(MTP_INITS)}")
    with _claimed(save):
        return _import(hf_dir, save, mtp_num_layers=mtp_num_layers, mtp_init=mtp_init,
                       seed=seed, make_vocab_size_divisible_by=make_vocab_size_divisible_by)


def _import(hf_dir: str, save: str, *, mtp_num_layers: Optional[int], mtp_init: str,
            seed: int, make_vocab_size_divisible_by: int) -> ImportResult:
    require("safetensors")
    from mtp_megatron.checkpoint import save_model_weights
    from mtp_megatron.inference.loading import build_for_generation, single_rank
    from mtp_megatron.model.builder import vocab_size_for

    hf_config = read_hf_config(hf_dir)
    values = run_values(hf_dir, hf_config, mtp_num_layers=mtp_num_layers,
                        make_vocab_size_divisible_by=make_vocab_size_divisible_by)
    cfg = build_config(values, {"world_size": 1})
    arch, _ = model_values_from_hf(hf_config)
    vocab = cfg.model.vocab_size
    shape = shape_of(cfg, vocab_size=vocab, padded_vocab=vocab_size_for(cfg, vocab))
    tensors = files.read_weights(hf_dir)
    depth = cfg.mtp.mtp_num_layers or 0
    from_file = min(depth, _stored_mtp(hf_config, tensors, arch.layer_prefix, shape.num_layers))
    state = from_hf(tensors, tensors, arch, shape, mtp_from_file=from_file)
    if mtp_init == "last-layer":
        _warm_start(state, shape, from_file, depth)
    fresh = [f"mtp.layers.{k}." for k in range(from_file, depth)]
    with single_rank(seed=seed) as device:
        torch.manual_seed(seed)
        model = build_for_generation(cfg, shape.padded_vocab, device)
        _load_into(model, mcore_compat.mtp_layer_state_keys_for_model(state), fresh, hf_dir)
        # the model's own token ids: an export writes them back (byte-level data has others)
        special = {key: getattr(hf_config, key, None) for key in HF_SPECIAL_TOKENS}
        save_model_weights([model], cfg, save, extra={"hf_special_tokens": special})
    config_path = os.path.join(save, RUN_CONFIG)
    sections = to_dict(cfg)
    with open(config_path, "w") as fh:
        yaml.safe_dump({name: sections[name] for name in values}, fh, sort_keys=False)
    flags = train_flags(config_path, save, depth)
    logger.info("imported %s (%s, %d MTP modules from the directory, %d fresh, --mtp-init %s) "
                "to %s; continue with: torchrun launch/pretrain_gpt_mtp.py %s", hf_dir,
                arch.hf_class, from_file, depth - from_file, mtp_init, save, " ".join(flags))
    return ImportResult(save, config_path, cfg, from_file, flags)

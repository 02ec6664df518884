"""Writing and reading the files of a Hugging Face model directory.

    write_weights(tensors, "out", max_shard_bytes=5 * 2**30)   # model.safetensors or shards
    tensors = read_weights("hf_dir")                            # every weight file listed

Above ``max_shard_bytes`` the weights go to ``model-0000i-of-0000n.safetensors`` with
``model.safetensors.index.json`` (transformers' layout). The MTP modules go to
``mtp.safetensors``, which the index does not list: transformers loads every tensor of the
files in the index (and reports each one the class does not know as UNEXPECTED), so the
main model loads clean and MTP-aware code reads ``mtp.safetensors`` by name.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
from typing import Dict, List, Optional

import torch

from mtp_megatron.hf.deps import HFError, require

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
MTP_FILE = "mtp.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt", "tokenizer.model",
                   "chat_template.jinja")


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def clear_weights(out: str) -> None:
    """Remove weight files of an earlier export (a stale index would shadow new files)."""
    for path in glob.glob(os.path.join(out, "model*.safetensors")) + [
            os.path.join(out, INDEX), os.path.join(out, MTP_FILE)]:
        if os.path.exists(path):
            os.remove(path)


def write_weights(tensors: Dict[str, torch.Tensor], out: str, *, max_shard_bytes: int
                  ) -> List[str]:
    """Write ``tensors`` as one file or as shards plus an index; returns the file names."""
    save_file = require("safetensors.torch").save_file
    total = sum(_nbytes(t) for t in tensors.values())
    if total <= max_shard_bytes:
        save_file(tensors, os.path.join(out, SINGLE), metadata={"format": "pt"})
        return [SINGLE]
    shards: List[Dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        if shards[-1] and size + _nbytes(t) > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += _nbytes(t)
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for name, shard in zip(names, shards):
        save_file(shard, os.path.join(out, name), metadata={"format": "pt"})
        weight_map.update({key: name for key in shard})
    with open(os.path.join(out, INDEX), "w") as fh:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, fh, indent=2)
    return names + [INDEX]


def write_mtp(tensors: Dict[str, torch.Tensor], out: str, *, num_layers: int, depth: int
              ) -> Optional[str]:
    if not tensors:
        return None
    save_file = require("safetensors.torch").save_file
    save_file(tensors, os.path.join(out, MTP_FILE), metadata={
        "format": "pt", "num_nextn_predict_layers": str(depth),
        "first_layer_index": str(num_layers)})
    return MTP_FILE


def weight_files(hf_dir: str) -> List[str]:
    """The safetensors files of a HF directory (the index's, or model.safetensors)."""
    index = os.path.join(hf_dir, INDEX)
    if os.path.isfile(index):
        with open(index) as fh:
            files = sorted(set(json.load(fh)["weight_map"].values()))
        return [os.path.join(hf_dir, f) for f in files]
    single = os.path.join(hf_dir, SINGLE)
    if os.path.isfile(single):
        return [single]
    raise HFError(
        f"--hf {hf_dir}: no {SINGLE} or {INDEX}; only safetensors weights are read "
        "(re-save the model with save_pretrained(dir, safe_serialization=True))"
    )


def read_weights(hf_dir: str) -> Dict[str, torch.Tensor]:
    """Every tensor of the model's weight files, plus ``mtp.safetensors`` when present."""
    load_file = require("safetensors.torch").load_file
    tensors: Dict[str, torch.Tensor] = {}
    paths = weight_files(hf_dir)
    if os.path.isfile(os.path.join(hf_dir, MTP_FILE)):
        paths.append(os.path.join(hf_dir, MTP_FILE))
    for path in paths:
        tensors.update(load_file(path))
    return tensors


def copy_tokenizer(source: str, out: str) -> List[str]:
    """Copy the tokenizer files next to ``source`` (a tokenizer.json or its directory)."""
    directory = source if os.path.isdir(source) else os.path.dirname(os.path.abspath(source))
    copied = []
    for name in TOKENIZER_FILES:
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            shutil.copyfile(path, os.path.join(out, name))
            copied.append(name)
    return copied


def tokenizer_in(hf_dir: str) -> Optional[Dict[str, str]]:
    """Our data flags for the tokenizer shipped in ``hf_dir``, if it has one."""
    if os.path.isfile(os.path.join(hf_dir, "tokenizer.json")):
        return {"tokenizer_type": "huggingface",
                "tokenizer_model": os.path.abspath(os.path.join(hf_dir, "tokenizer.json"))}
    if os.path.isfile(os.path.join(hf_dir, "tokenizer.model")):
        return {"tokenizer_type": "sentencepiece",
                "tokenizer_model": os.path.abspath(os.path.join(hf_dir, "tokenizer.model"))}
    return None

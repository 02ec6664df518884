"""Checkpoints saved by megatron-core 0.16.1, committed, for the upgrade tests.

``tests/fixtures/mcore016/<case>/`` holds, per case (MTP D=2, TP2 on 2 CPU ranks):

* ``ck/``: the dist checkpoint at iteration ``SAVED_AT`` (model, optimizer, scheduler, RNG);
* ``metrics.jsonl``: the straight run's log to ``TRAIN_ITERS`` (what a resume must repeat);
* ``digest.json``: the megatron-core version that saved it, a digest of every weight as
  loaded back on that version, and of the files ``hf export`` wrote and of the weights
  ``hf import`` gave back from them.

Regenerate (only when a case changes; needs the floor's venv, ``make venv-compat``):

    .venv-compat/bin/python -m tests.upgrade_fixture --write

tests/functional/test_checkpoint_upgrade.py loads them on the installed megatron-core
(0.19.2 in ``make test``, 0.16.1 in ``make test-compat``) and checks the same digests.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from typing import Dict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures", "mcore016")
LAUNCHER = os.path.join(ROOT, "launch", "pretrain_gpt_mtp.py")
SAVED_AT, TRAIN_ITERS = 4, 6
MODEL = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
         "--ffn-hidden-size", "64", "--seq-length", "32", "--micro-batch-size", "2",
         "--global-batch-size", "4", "--lr", "3e-3", "--lr-warmup-iters", "1",
         "--log-interval", "1", "--eval-iters", "0", "--mock-data", "--vocab-size", "200",
         "--make-vocab-size-divisible-by", "64", "--mtp-num-layers", "2",
         "--tensor-model-parallel-size", "2", "--train-iters", str(TRAIN_ITERS)]
CASES = {
    "fp32_tp2": [],
    "bf16_distopt_tp2": ["--bf16", "--use-distributed-optimizer"],
}


def tensor_digest(tensor) -> str:
    """sha256 of a tensor's dtype, shape and bytes (contiguous, on the CPU)."""
    import torch

    t = tensor.detach().to("cpu").contiguous()
    h = hashlib.sha256(f"{t.dtype}|{tuple(t.shape)}|".encode())
    h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def weights_digest(path: str) -> Dict[str, str]:
    """Every weight of the checkpoint at ``path``, loaded into a one-rank model, by key
    (megatron-core's sharded keys: the same on every version and layout)."""
    from mtp_megatron.inference.loading import load_for_generation, single_rank
    from mtp_megatron.model.weights import full_weights

    with single_rank() as device:
        model, _, _ = load_for_generation(path, device)
        return {k: tensor_digest(v) for k, v in sorted(full_weights([model]).items())}


def hf_digests(ck: str, work: str) -> Dict[str, Dict[str, str]]:
    """``hf export`` of ``ck`` (each file's tensors, config.json) and the weights ``hf
    import`` gives back from that export."""
    from safetensors.torch import load_file

    from mtp_megatron.hf.export import export
    from mtp_megatron.hf.importer import import_hf

    out = os.path.join(work, "hf")
    export(ck, out)
    files = {}
    for name in sorted(os.listdir(out)):
        path = os.path.join(out, name)
        if name.endswith(".safetensors"):
            files[name] = {k: tensor_digest(v) for k, v in sorted(load_file(path).items())}
        elif name.endswith(".json"):
            files[name] = hashlib.sha256(open(path, "rb").read()).hexdigest()
    imported = os.path.join(work, "imported")
    import_hf(out, imported, mtp_num_layers=2)
    return {"export": files, "import": weights_digest(imported)}


def _launch(args, output_dir: str) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           "2", LAUNCHER, *args, "--output-dir", output_dir]
    subprocess.run(cmd, check=True, cwd=ROOT, env=env)


def write() -> None:
    from mtp_megatron.runtime import mcore_compat

    version = mcore_compat.installed_version()
    if mcore_compat.line_of(version) != "0.16":
        sys.exit(f"the fixture is what megatron-core 0.16 saved; this is {version} "
                 "(use .venv-compat/bin/python)")
    for case, extra in CASES.items():
        target = os.path.join(FIXTURES, case)
        shutil.rmtree(target, ignore_errors=True)
        with tempfile.TemporaryDirectory() as work:
            ck = os.path.join(work, "ck")
            _launch(MODEL + extra + ["--save", ck, "--save-interval", str(SAVED_AT)],
                    os.path.join(work, "run"))
            os.makedirs(target)
            shutil.copytree(os.path.join(ck, f"iter_{SAVED_AT:07d}"),
                            os.path.join(target, "ck", f"iter_{SAVED_AT:07d}"))
            with open(os.path.join(target, "ck", "latest_checkpointed_iteration.txt"), "w") as fh:
                fh.write(str(SAVED_AT))
            shutil.copy(os.path.join(work, "run", "metrics.jsonl"), target)
            saved = os.path.join(target, "ck")
            digest = {"megatron_core": version, "flags": MODEL + extra,
                      "weights": weights_digest(saved), **hf_digests(saved, work)}
        with open(os.path.join(target, "digest.json"), "w") as fh:
            json.dump(digest, fh, indent=1, sort_keys=True)
            fh.write("\n")
        print(f"wrote {target}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--write", action="store_true", help="regenerate the fixtures")
    if parser.parse_args().write:
        write()

"""``python -m mtp_megatron.hf {export,import}``: Hugging Face transformers in and out.

    python -m mtp_megatron.hf export --load runs/x/checkpoints --out hf/x
    python -m mtp_megatron.hf import --hf path/to/llama --save ckpt/llama_mtp \
        --mtp-num-layers 1 --mtp-init last-layer

Errors (a missing package, an architecture with no HF class, a bad directory) end with
one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional, Sequence

from mtp_megatron.hf.deps import HFError

logger = logging.getLogger("mtp_megatron")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m mtp_megatron.hf", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    exp = sub.add_parser("export", help="checkpoint (any TP/PP layout) -> transformers dir")
    exp.add_argument("--load", required=True, help="save root or iter_N directory")
    exp.add_argument("--out", required=True, help="output directory (created)")
    exp.add_argument("--max-shard-size-gb", type=float, default=5.0,
                     help="shard model.safetensors above this size (default: 5)")
    imp = sub.add_parser("import", help="local Llama/GPT-NeoX dir -> checkpoint with MTP")
    imp.add_argument("--hf", required=True, help="local Hugging Face model directory")
    imp.add_argument("--save", required=True, help="checkpoint directory to write")
    imp.add_argument("--mtp-num-layers", type=int, default=1,
                     help="MTP depth D of the checkpoint (0: none; default: 1)")
    imp.add_argument("--mtp-init", choices=("random", "last-layer"), default="random",
                     help="fresh MTP transformer layers: megatron-core's init, or copies of "
                          "the last decoder layer (default: random)")
    imp.add_argument("--make-vocab-size-divisible-by", type=int, default=128,
                     help="pad the vocabulary to a multiple of this (x TP) (default: 128)")
    imp.add_argument("--seed", type=int, default=1234, help="seed of the fresh MTP layers")
    return parser


def _run(args: argparse.Namespace) -> None:
    if args.command == "export":
        if not args.max_shard_size_gb > 0:
            raise HFError(f"--max-shard-size-gb={args.max_shard_size_gb}: must be positive")
        from mtp_megatron.hf.export import export

        export(args.load, args.out, max_shard_bytes=int(args.max_shard_size_gb * 2**30))
        return
    if args.mtp_num_layers < 0:
        raise HFError(f"--mtp-num-layers={args.mtp_num_layers}: 0 (no MTP) or more")
    from mtp_megatron.hf.importer import import_hf

    import_hf(args.hf, args.save, mtp_num_layers=args.mtp_num_layers, mtp_init=args.mtp_init,
              seed=args.seed, make_vocab_size_divisible_by=args.make_vocab_size_divisible_by)


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")
    for noisy in ("megatron", "torch"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    args = build_parser().parse_args(argv)
    from mtp_megatron.checkpoint import CheckpointError
    from mtp_megatron.config import ConfigError

    try:
        _run(args)
    except (HFError, ConfigError, CheckpointError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0

"""Generate from a checkpoint saved by training: greedy or MTP self-speculative decoding.

One rank, whatever TP/PP layout the checkpoint was saved with:
    python -m mtp_megatron.generate --load runs/x/checkpoints --prompt "def main(" \\
        --mode mtp-speculative --draft-depth 2 --max-new-tokens 128
Prompts from a file (one per line) or stdin (--prompt-file -); report as JSON:
    python -m mtp_megatron.generate --load runs/x/checkpoints --prompt-file prompts.txt --json
With --mock-data checkpoints a prompt is token ids separated by spaces ("1 2 3").

Speculative mode also decodes the same prompts without drafts in the same process
(unless --no-baseline) and reports the speedup; greedy outputs must be identical. The
draft count adapts to the recent acceptance by default (--draft-depth auto). Sampling
and batches:
    python -m mtp_megatron.generate --load runs/x/checkpoints --prompt-file prompts.txt \
        --temperature 0.8 --top-p 0.95 --seed 1 --batch-size 4
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import List, Optional, Sequence

logger = logging.getLogger("mtp_megatron")

MODES = ("greedy", "mtp-speculative")


class UsageError(ValueError):
    """A bad flag value: printed as one line naming the flag, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m mtp_megatron.generate",
                                     description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--load", required=True,
                        help="A --save directory of a training run, or one iter_N directory.")
    parser.add_argument("--prompt", action="append", default=[],
                        help="A prompt (repeat for several).")
    parser.add_argument("--prompt-file",
                        help="A file with one prompt per line; '-' reads stdin.")
    parser.add_argument("--mode", choices=MODES, default="mtp-speculative")
    parser.add_argument("--draft-depth", default="auto",
                        help="Tokens drafted per step: 'auto' (chosen per step from the recent "
                             "acceptance and the measured costs, up to --mtp-num-layers of "
                             "the checkpoint) or a number from 1 to --mtp-num-layers.")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="0: greedy; > 0: sampling (speculative sampling keeps the "
                             "distribution exact).")
    parser.add_argument("--top-k", type=int, default=0,
                        help="Sample among the k most likely tokens (0: all).")
    parser.add_argument("--top-p", type=float, default=1.0,
                        help="Sample among the most likely tokens holding this probability.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the sampling.")
    parser.add_argument("--batch-size", type=int, default=1,
                        help="Prompts decoded together (ragged lengths, per-row acceptance).")
    parser.add_argument("--no-baseline", action="store_true",
                        help="Speculative mode: skip the run without drafts used for the "
                             "speedup.")
    parser.add_argument("--ignore-eod", action="store_true",
                        help="Do not stop at the end-of-document token.")
    parser.add_argument("--json", action="store_true", help="Print the report as JSON.")
    return parser


def read_prompts(args: argparse.Namespace) -> List[str]:
    prompts = list(args.prompt)
    if args.prompt_file:
        try:
            fh = sys.stdin if args.prompt_file == "-" else open(args.prompt_file,
                                                                 encoding="utf-8")
        except OSError as exc:
            raise UsageError(f"--prompt-file {args.prompt_file}: {exc.strerror}") from None
        try:
            with fh:
                prompts += [line.rstrip("\n") for line in fh if line.strip()]
        except UnicodeDecodeError:
            raise UsageError(f"--prompt-file {args.prompt_file}: not UTF-8 text (a binary "
                             "file?); give one prompt per line") from None
    if not prompts:
        raise UsageError("no prompt: give --prompt TEXT or --prompt-file FILE ('-' for stdin)")
    return prompts


def check_sampling(args: argparse.Namespace):
    """The ``Sampling`` the flags ask for (greedy unless --temperature > 0)."""
    from mtp_megatron.inference.sampling import Sampling

    if args.batch_size < 1:
        raise UsageError(f"--batch-size {args.batch_size}: must be at least 1")
    try:  # Sampling owns the rules of its flags
        sampling = Sampling(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                            seed=args.seed)
    except ValueError as err:
        raise UsageError(str(err)) from None
    if sampling.greedy and (args.top_k or args.top_p < 1):
        logger.warning("--top-k/--top-p have no effect with --temperature 0 (greedy)")
    return sampling


def check_args(args: argparse.Namespace, mtp_num_layers: int):
    """The draft depth to use (a number, or "auto"), after checking the flags against
    the checkpoint."""
    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens {args.max_new_tokens}: must be at least 1")
    if args.mode == "greedy":
        if args.draft_depth != "auto":
            logger.warning("--draft-depth has no effect with --mode greedy")
        return 0
    if mtp_num_layers == 0:
        raise UsageError("--mode mtp-speculative: the checkpoint has no MTP layers "
                         "(trained without --mtp-num-layers); use --mode greedy")
    if args.draft_depth == "auto":
        return "auto"
    try:
        depth = int(args.draft_depth)
    except ValueError:
        raise UsageError(f"--draft-depth {args.draft_depth}: must be 'auto' or a number "
                         f"from 1 to the checkpoint's --mtp-num-layers={mtp_num_layers}") from None
    if not 1 <= depth <= mtp_num_layers:
        raise UsageError(f"--draft-depth {depth}: must be between 1 and the checkpoint's "
                         f"--mtp-num-layers={mtp_num_layers} (or 'auto')")
    return depth


def encode(tokenizer, text: str, *, vocab_size: int, mock_data: bool = False) -> List[int]:
    """A prompt's token ids, all inside the checkpoint's vocabulary ``0 .. vocab_size-1``.

    A ``--mock-data`` checkpoint has no text tokenizer: its prompts are ids ("1 2 3").
    """
    if mock_data:
        try:
            ids = [int(word) for word in text.split()]
        except ValueError:
            raise UsageError(f"--prompt {text!r}: this checkpoint was trained with --mock-data, "
                             "so a prompt is token ids separated by spaces, e.g. '1 2 3'") from None
    else:
        ids = [int(i) for i in tokenizer.tokenize(text)]
    if not ids:
        raise UsageError(f"--prompt {text!r}: encodes to no tokens")
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise UsageError(f"--prompt {text[:60]!r}: token id {bad[0]} is outside the "
                         f"checkpoint's vocabulary (ids 0 to {vocab_size - 1})")
    return ids


def check_positions(ids: List[List[int]], args: argparse.Namespace, model) -> None:
    """Positions the decode reaches, against what the checkpoint was trained on.

    Decoding feeds positions up to ``len(prompt) + max_new_tokens - 2``. Learned absolute
    positions stop at ``--max-position-embeddings`` (an error past it); RoPE runs past the
    trained ``--seq-length`` but was never trained there (a warning).
    """
    longest = max(len(p) for p in ids)
    reach = longest + args.max_new_tokens - 1  # positions 0 .. reach - 1
    if model.position_embedding_type == "learned_absolute":
        limit = model.max_position_embeddings or model.seq_length
        if longest > limit:
            raise UsageError(f"--prompt: a prompt of {longest} tokens is longer than the "
                             f"{limit} learned positions of this checkpoint "
                             "(--position-embedding-type learned_absolute); shorten it")
        if reach > limit:
            raise UsageError(
                f"--max-new-tokens {args.max_new_tokens}: a {longest}-token prompt plus "
                f"{args.max_new_tokens} new tokens needs {reach} positions, this checkpoint "
                f"has {limit} (learned_absolute); use --max-new-tokens "
                f"{limit - longest + 1} or less")
    elif reach > model.seq_length:
        logger.warning(
            "warning: a %d-token prompt plus --max-new-tokens %d needs %d positions, more than the "
            "trained --seq-length %d: RoPE extrapolates past it and the output may degrade",
            longest, args.max_new_tokens, reach, model.seq_length)


def run(args: argparse.Namespace) -> dict:
    prompts = read_prompts(args)
    if not os.path.exists(args.load):
        raise UsageError(f"--load {args.load}: no such directory")
    from mtp_megatron.checkpoint import CheckpointError
    from mtp_megatron.config import ConfigError, build_config
    from mtp_megatron.data.tokenizers import decode
    from mtp_megatron.inference.loading import (
        build_tokenizer,
        load_for_generation,
        read_saved_config,
        single_rank,
        text_vocab_size,
    )
    from mtp_megatron.inference.report import decode_prompts
    from mtp_megatron.inference.runner import check_batch_size

    try:
        _, saved = read_saved_config(args.load)
        saved_cfg = build_config(saved)
        depth = check_args(args, saved_cfg.mtp.mtp_num_layers or 0)
        sampling = check_sampling(args)
        tokenizer = build_tokenizer(saved_cfg)
        vocab = text_vocab_size(saved_cfg, tokenizer)
        ids = [encode(tokenizer, p, vocab_size=vocab, mock_data=saved_cfg.data.mock_data)
               for p in prompts]
        check_positions(ids, args, saved_cfg.model)
        try:  # before the model is loaded
            check_batch_size(args.batch_size, saved_cfg.model.multi_latent_attention)
        except ValueError as err:
            raise UsageError(str(err)) from None
        with single_rank() as device:
            model, cfg, tokenizer = load_for_generation(args.load, device)
            return decode_prompts(
                model, ids, vocab_size=text_vocab_size(cfg, tokenizer),
                max_new_tokens=args.max_new_tokens, draft_depth=depth,
                eod=None if args.ignore_eod else tokenizer.eod,
                baseline=depth != 0 and not args.no_baseline,
                batch_size=args.batch_size, sampling=sampling,
                detokenize=lambda ids: decode(tokenizer, ids),  # whitespace kept
            )
    except (CheckpointError, ConfigError) as err:
        raise UsageError(str(err)) from None


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    for noisy in ("megatron", "torch"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    args = build_parser().parse_args(argv)
    try:
        report = run(args)
    except (UsageError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from mtp_megatron.inference.report import format_report, report_json

    print(report_json(report) if args.json else format_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())

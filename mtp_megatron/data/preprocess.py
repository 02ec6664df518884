"""Turn text into a Megatron indexed dataset (``<prefix>.bin`` + ``<prefix>.idx``).

    python -m mtp_megatron.data.preprocess --input corpus.jsonl --output-prefix data/corpus
    python -m mtp_megatron.data.preprocess --input books/ notes.txt --output-prefix data/mix \
        --tokenizer-type huggingface --tokenizer-model tok/tokenizer.json --workers 8
    python -m mtp_megatron.data.preprocess --input src/ --pattern '*.py' --output-prefix data/code

Inputs are files or directories (walked recursively in sorted order, filtered by
``--pattern``). ``.jsonl``/``.json`` files hold one JSON object per line with the text
under ``--json-key``; any other file is one document. Every document is tokenized
(byte-level unless ``--tokenizer-type`` says otherwise), followed by the tokenizer's
end-of-document token, and written with megatron-core's ``IndexedDatasetBuilder``.

Bad input (invalid JSON, a missing key, non-UTF-8 bytes, a lone surrogate such as
``"\\ud800"`` in a JSON string, an empty document) is reported as ``file:line: reason``;
it is skipped and counted, or with ``--strict`` it stops the run and nothing is written
(not even the output directory). Outputs are written under temporary names and renamed
at the end, so an existing dataset is never half-overwritten. A ``<prefix>.meta.json``
records the tokenizer and the largest id, which training checks against its vocabulary.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import logging
import multiprocessing as mp
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Iterable, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

from mtp_megatron.config.data import TOKENIZER_TYPES
from mtp_megatron.config.fields import ConfigError
from mtp_megatron.data.tokenizers import build_tokenizer, encode, token_dtype

logger = logging.getLogger(__name__)

JSON_SUFFIXES = (".jsonl", ".json")
MAX_REPORTED = 20


class PreprocessError(RuntimeError):
    """Bad input under ``--strict``, or no usable document at all."""


class Record(NamedTuple):
    source: str
    line: int  # 1-based; for whole-file documents, 1
    data: bytes
    is_json: bool


@dataclass
class Summary:
    """What a preprocessing run read and wrote."""

    output_prefix: str
    documents: int = 0
    tokens: int = 0
    bytes: int = 0
    skipped: int = 0
    skipped_by_reason: dict = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(self.skipped_by_reason.items()))
        return (
            f"wrote {self.output_prefix}.bin/.idx | documents {self.documents:,} | "
            f"tokens {self.tokens:,} | bytes {self.bytes:,} | skipped {self.skipped:,}"
            + (f" ({reasons})" if reasons else "")
            + f" | {self.seconds:.2f} s | {self.tokens_per_second:,.0f} tokens/s"
        )


# ----------------------------------------------------------------------------- reading


def iter_files(inputs: Sequence[str], pattern: str = "*") -> Iterator[str]:
    """Files named in ``inputs``; directories walked recursively in sorted order."""
    for path in inputs:
        if os.path.isdir(path):
            for root, dirs, files in os.walk(path):
                dirs.sort()
                for name in sorted(files):
                    if fnmatch.fnmatch(name, pattern):
                        yield os.path.join(root, name)
        elif os.path.isfile(path):
            yield path
        else:
            raise ConfigError("--input", path, "existing files or directories", "not found")


def iter_records(files: Iterable[str]) -> Iterator[Record]:
    """One record per JSON line of a ``.jsonl``/``.json`` file, one per other file."""
    for path in files:
        with open(path, "rb") as fh:
            if not path.endswith(JSON_SUFFIXES):
                yield Record(path, 1, fh.read(), False)
                continue
            for number, raw in enumerate(fh, start=1):
                if raw.strip():  # blank lines are not records
                    yield Record(path, number, raw, True)


# ----------------------------------------------------------------------------- tokenizing

_WORKER = {}


def _init_worker(tokenizer_type: str, tokenizer_model: Optional[str], json_key: str) -> None:
    _WORKER["tokenizer"] = build_tokenizer(tokenizer_type, tokenizer_model)
    _WORKER["json_key"] = json_key


def _decode(record: Record, json_key: str) -> Tuple[Optional[str], Optional[str], int]:
    """(text, problem, line of the problem) of one record."""
    try:
        text = record.data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = record.line + record.data.count(b"\n", 0, err.start)
        return None, f"non-UTF-8 bytes at byte {err.start}", line
    if record.is_json:
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as err:
            return None, f"invalid JSON ({err.msg})", record.line
        if not isinstance(obj, dict) or json_key not in obj:
            return None, f"missing key {json_key!r}", record.line
        text = obj[json_key]
        if not isinstance(text, str):
            return None, f"key {json_key!r} is not a string", record.line
    if not text.strip():
        return None, "empty document", record.line
    return text, None, record.line


def tokenize_record(record: Record):
    """Worker body: (record, token ids or None, problem or None, line, text bytes)."""
    text, problem, line = _decode(record, _WORKER["json_key"])
    if problem:
        return record.source, None, problem, line, 0
    try:
        ids = encode(_WORKER["tokenizer"], text)
    except UnicodeEncodeError as err:  # valid JSON can hold a lone surrogate ("\ud800")
        problem = f"lone surrogate (U+{ord(text[err.start]):04X} at character {err.start})"
        return record.source, None, problem, line, 0
    return record.source, ids, None, line, len(record.data)


def _tokenized(records: Iterator[Record], workers: int, init_args) -> Iterator[tuple]:
    if workers <= 1:
        _init_worker(*init_args)
        yield from map(tokenize_record, records)
        return
    with mp.get_context("spawn").Pool(workers, _init_worker, init_args) as pool:
        yield from pool.imap(tokenize_record, records, chunksize=32)


# ----------------------------------------------------------------------------- writing


def _reason_kind(problem: str) -> str:
    return problem.split(" (")[0].split(" at byte")[0]


def preprocess(
    inputs: Sequence[str], output_prefix: str, *, tokenizer_type: str = "byte-level",
    tokenizer_model: Optional[str] = None, json_key: str = "text", workers: int = 1,
    strict: bool = False, pattern: str = "*", progress: bool = True,
    files: Optional[List[str]] = None, report_skips: bool = True,
) -> Summary:
    """Tokenize ``inputs`` (or the explicit ``files``, in that order) into ``output_prefix``."""
    _check_output_prefix(output_prefix)
    tokenizer = build_tokenizer(tokenizer_type, tokenizer_model)
    dtype = token_dtype(tokenizer.vocab_size)
    eod = tokenizer.eod
    file_list = list(files) if files is not None else list(iter_files(inputs, pattern))
    file_list = _without_own_outputs(file_list, output_prefix)
    created = _make_dirs(os.path.dirname(os.path.abspath(output_prefix)))
    tmp = f"{output_prefix}.tmp{os.getpid()}"
    summary = Summary(output_prefix=output_prefix)
    start = time.perf_counter()
    try:
        builder = IndexedDatasetBuilder(tmp + ".bin", dtype=dtype)
    except BaseException:
        _remove_dirs(created)
        raise
    max_id, reported = -1, 0
    try:
        bar = _progress_bar(progress)
        results = _tokenized(iter_records(file_list), workers,
                             (tokenizer_type, tokenizer_model, json_key))
        for source, ids, problem, line, nbytes in results:
            if problem:
                where = f"{source}:{line}: {problem}"
                if strict:
                    raise PreprocessError(f"{where} (--strict stops at the first bad input)")
                summary.skipped += 1
                kind = _reason_kind(problem)
                summary.skipped_by_reason[kind] = summary.skipped_by_reason.get(kind, 0) + 1
                if report_skips and reported < MAX_REPORTED:
                    _report(bar, f"skipped {where}")
                    reported += 1
                continue
            doc = np.empty(len(ids) + 1, dtype=dtype)
            doc[:-1] = ids
            doc[-1] = eod
            builder.add_document(doc, [doc.size])
            if ids.size:
                max_id = max(max_id, int(ids.max()))
            summary.documents += 1
            summary.tokens += int(doc.size)
            summary.bytes += nbytes
            if bar is not None:
                bar.update(1)
                elapsed = time.perf_counter() - start
                bar.set_postfix_str(f"{summary.tokens / max(elapsed, 1e-9):,.0f} tokens/s",
                                    refresh=False)
        if bar is not None:
            bar.close()
        if summary.documents == 0:
            raise PreprocessError(
                f"no usable document in {len(file_list)} file(s) ({summary.skipped} skipped)")
        builder.finalize(tmp + ".idx")
        meta = {"tokenizer_type": tokenizer_type, "tokenizer_model": tokenizer_model,
                "vocab_size": tokenizer.vocab_size, "eod": eod, "max_token_id": max(max_id, eod),
                "documents": summary.documents, "tokens": summary.tokens}
        with open(tmp + ".meta.json", "w") as fh:
            json.dump(meta, fh, indent=2)
    except BaseException:
        builder.data_file.close()
        for suffix in (".bin", ".idx", ".meta.json"):
            if os.path.exists(tmp + suffix):
                os.remove(tmp + suffix)
        _remove_dirs(created)
        raise
    for suffix in (".bin", ".idx", ".meta.json"):
        os.replace(tmp + suffix, output_prefix + suffix)
    summary.seconds = time.perf_counter() - start
    return summary


OUTPUT_SUFFIXES = (".bin", ".idx", ".meta.json")


def _check_output_prefix(output_prefix: str) -> None:
    """A file prefix (``data/corpus``), not a directory: ``data/`` would write ``.bin``."""
    if output_prefix.endswith(("/", os.sep)) or os.path.isdir(output_prefix) \
            or not os.path.basename(output_prefix):
        raise ConfigError("--output-prefix", output_prefix,
                          "a file prefix such as data/corpus (writes data/corpus.bin, .idx "
                          "and .meta.json)", "it names a directory")


def _without_own_outputs(file_list: List[str], output_prefix: str) -> List[str]:
    """The inputs minus this run's own outputs (an earlier run's ``<prefix>.bin/.idx/
    .meta.json``, or temporaries, when the output is inside an input directory)."""
    own = {os.path.realpath(output_prefix + suffix) for suffix in OUTPUT_SUFFIXES}
    tmp = os.path.realpath(output_prefix) + ".tmp"
    kept = []
    for path in file_list:
        real = os.path.realpath(path)
        if real in own or real.startswith(tmp):
            logger.warning("leaving out %s: an output of --output-prefix %s", path,
                           output_prefix)
            continue
        kept.append(path)
    return kept


def _make_dirs(path: str) -> List[str]:
    """``os.makedirs(path)``; returns the directories it created, deepest first."""
    created = []
    while not os.path.isdir(path):
        created.append(path)
        path = os.path.dirname(path)
    os.makedirs(created[0] if created else path, exist_ok=True)
    return created


def _remove_dirs(created: List[str]) -> None:
    """Undo :func:`_make_dirs` after a failure: a failed run leaves nothing behind."""
    for path in created:
        try:
            os.rmdir(path)  # only if still empty (another writer may have used it)
        except OSError:
            return


def _report(bar, message: str) -> None:
    if bar is not None:
        bar.write(message, file=sys.stderr)
    else:
        logger.warning(message)


def _progress_bar(enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(unit=" docs", desc="preprocess", dynamic_ncols=True, mininterval=0.5)


# ----------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m mtp_megatron.data.preprocess",
        description="Tokenize text into a Megatron indexed dataset (<prefix>.bin/.idx).",
    )
    parser.add_argument("--input", nargs="+", required=True,
                        help="JSONL files, text files or directories of them.")
    parser.add_argument("--output-prefix", required=True, help="Writes <prefix>.bin and .idx.")
    parser.add_argument("--json-key", default="text", help="Key of the text in JSONL lines.")
    parser.add_argument("--pattern", default="*",
                        help="Only files matching this glob inside directories (e.g. '*.py').")
    parser.add_argument("--tokenizer-type", default="byte-level", choices=TOKENIZER_TYPES)
    parser.add_argument("--tokenizer-model", default=None,
                        help="Local tokenizer.json (huggingface) or .model (sentencepiece).")
    parser.add_argument("--workers", type=int, default=1,
                        help="Tokenizer processes (1: in this process).")
    parser.add_argument("--strict", action="store_true",
                        help="Fail on the first bad line instead of skipping it.")
    parser.add_argument("--no-progress", action="store_true", help="No progress bar.")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    args = build_parser().parse_args(argv)
    try:
        summary = preprocess(
            args.input, args.output_prefix, tokenizer_type=args.tokenizer_type,
            tokenizer_model=args.tokenizer_model, json_key=args.json_key,
            workers=max(1, args.workers), strict=args.strict, pattern=args.pattern,
            progress=not args.no_progress,
        )
    except (ConfigError, PreprocessError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(summary.line())
    print(json.dumps({"summary": {**asdict(summary),
                                  "tokens_per_second": summary.tokens_per_second}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

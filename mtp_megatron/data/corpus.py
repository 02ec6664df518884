"""The embedded default corpus: the Python standard library of the running interpreter.

Every machine that runs us has it, it is real text (code, docstrings, comments), and it
is big enough (about 10 MB) to train a small model on. With neither ``--data-path`` nor
``--mock-data`` the run trains on it: the ``*.py`` files under
``sysconfig.get_paths()["stdlib"]``, without ``site-packages`` (not the standard
library), test suites and generated tables (``encodings``, ``pydoc_data``). The file
order is shuffled with a fixed seed, so the validation split (the last documents) is a
random sample of modules rather than the alphabetical tail.

It is tokenized byte-level once, into ``<cache>/corpus/<key>/stdlib.bin/.idx`` where
``<cache>`` is ``--data-cache-path`` or ``$XDG_CACHE_HOME/mtp_megatron``
(``~/.cache/mtp_megatron``) and ``<key>`` changes with the Python version and the file
list. Concurrent ranks take a file lock: the first builds, the others wait and reuse.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import random
import sys
import sysconfig
from typing import List, Optional

from mtp_megatron.data.preprocess import preprocess

logger = logging.getLogger(__name__)

EXCLUDED_DIRS = frozenset({
    "site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test",
    "encodings", "pydoc_data",
})
CORPUS_VERSION = 1  # bump when the selection or the tokenization changes
SHUFFLE_SEED = 1234


def default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "mtp_megatron")


def stdlib_files(root: Optional[str] = None) -> List[str]:
    """The corpus files, in their (seeded, shuffled) document order."""
    root = root or sysconfig.get_paths()["stdlib"]
    found = []
    for dirpath, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in EXCLUDED_DIRS)
        found.extend(os.path.join(dirpath, f) for f in sorted(files) if f.endswith(".py"))
    found.sort()
    random.Random(SHUFFLE_SEED).shuffle(found)
    return found


def _key(files: List[str], root: str) -> str:
    digest = hashlib.sha1(f"v{CORPUS_VERSION}".encode())
    for path in files:
        digest.update(f"{os.path.relpath(path, root)}:{os.path.getsize(path)}\n".encode())
    return f"stdlib-py{sys.version_info.major}.{sys.version_info.minor}-{digest.hexdigest()[:12]}"


def ensure_stdlib_corpus(cache_dir: Optional[str] = None) -> str:
    """Build the corpus once (under a lock) and return its dataset prefix."""
    root = sysconfig.get_paths()["stdlib"]
    files = stdlib_files(root)
    directory = os.path.join(cache_dir or default_cache_dir(), "corpus", _key(files, root))
    prefix = os.path.join(directory, "stdlib")
    if _complete(prefix):
        return prefix
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not _complete(prefix):
                summary = preprocess([], prefix, files=files, progress=False,
                                     report_skips=False)
                logger.info("embedded corpus (Python %s standard library, %d files): %s",
                            sys.version.split()[0], len(files), summary.line())
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return prefix


def _complete(prefix: str) -> bool:
    return all(os.path.exists(prefix + s) for s in (".bin", ".idx", ".meta.json"))


def corpus_snippets(files: List[str], count: int, length: int, seed: int) -> List[str]:
    """``count`` prompts of ``length`` bytes, each starting at a line of one of ``files``
    (chosen with ``random.Random(seed)``); files too short for a snippet are skipped."""
    rng = random.Random(seed)
    prompts, tries = [], 0
    while len(prompts) < count and tries < 100 * count:
        tries += 1
        with open(rng.choice(files), "rb") as fh:
            lines = fh.read().splitlines(keepends=True)
        if len(lines) < 20:
            continue
        start = rng.randrange(len(lines) - 10)
        text = b"".join(lines[start:start + 10])[:length].decode("utf-8", "ignore")
        if len(text.strip()) >= length // 2:
            prompts.append(text)
    return prompts

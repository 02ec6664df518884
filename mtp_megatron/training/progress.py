"""Progress for slow one-off phases (data index build, the first step), so a quiet
terminal never looks like a hang.

    with phase("building datasets", log=log_last_rank):
        datasets = build_datasets(...)

prints ``building datasets ...`` at once, ``building datasets: still running (30 s)``
every ``every`` seconds while it lasts, and ``building datasets: done in 41.2 s``.
"""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Callable, Iterator

HEARTBEAT_SECONDS = 30.0


@contextlib.contextmanager
def phase(what: str, *, log: Callable[[str], None],
          every: float = HEARTBEAT_SECONDS) -> Iterator[None]:
    """Log the start, a heartbeat every ``every`` seconds, and the duration of ``what``."""
    start = time.perf_counter()
    done = threading.Event()

    def heartbeat() -> None:
        while not done.wait(every):
            log(f"{what}: still running ({time.perf_counter() - start:.0f} s)")

    log(f"{what} ...")
    thread = threading.Thread(target=heartbeat, name=f"progress: {what}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
    log(f"{what}: done in {time.perf_counter() - start:.1f} s")

"""Where a step's time goes: data, forward-backward, optimizer, eval, checkpoint.

    timers = StepTimers(timing_log_level=0)
    with timers("forward-backward"):
        ...
    timers.per_iteration(steps=10)   # {"data": 0.4, "forward-backward": 80.1, ...} (ms)

``--timing-log-level 0`` (default): host wall clock only, no device synchronisation, so
the hot loop gains no sync (on a GPU a phase then shows the time to *queue* its kernels;
the step total stays right because the step ends in a host sync anyway).
``--timing-log-level 1`` or more: megatron-core's ``Timers``, which synchronise the
device at every start and stop (exact per-phase times, at the price of those syncs).
"""

from __future__ import annotations

import contextlib
import time
from typing import Dict

PHASES = ("data", "forward-backward", "optimizer", "eval", "checkpoint")


class StepTimers:
    """Accumulates milliseconds per phase until :meth:`per_iteration` resets them."""

    def __init__(self, timing_log_level: int = 0):
        self.synchronize = timing_log_level > 0
        self.totals: Dict[str, float] = {name: 0.0 for name in PHASES}
        self._mcore = None
        if self.synchronize:
            from megatron.core.timers import Timers

            self._mcore = Timers(log_level=timing_log_level, log_option="minmax")

    @contextlib.contextmanager
    def __call__(self, name: str):
        if self._mcore is not None:
            timer = self._mcore(name, log_level=0)
            timer.start()
            try:
                yield
            finally:
                timer.stop()
                self.totals[name] += timer.elapsed(reset=True) * 1000.0
            return
        start = time.perf_counter()
        try:
            yield
        finally:
            self.totals[name] += (time.perf_counter() - start) * 1000.0

    def per_iteration(self, steps: int) -> Dict[str, float]:
        """Milliseconds per iteration by phase over the last ``steps`` steps; resets."""
        out = {name: total / max(steps, 1) for name, total in self.totals.items()}
        self.totals = {name: 0.0 for name in PHASES}
        return out

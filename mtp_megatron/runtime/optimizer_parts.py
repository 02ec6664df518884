"""The parts of a megatron-core optimizer, for the modules that look inside it.

``get_megatron_optimizer`` returns a ``ChainedOptimizer`` (one sub-optimizer per kind of
parameter group: dense, expert, MTP with ``--mtp-detach-heads``...) or, for one kind, the
optimizer itself. The NaN/Inf check (``training/faults.py``) and the checkpoint code
(``checkpoint/``) both need the parts; they import them from here, so neither imports the
other's internals.

    for sub in sub_optimizers(optimizer):
        sub.optimizer.param_groups
"""

from __future__ import annotations

from typing import Any, List


def sub_optimizers(optimizer: Any) -> List[Any]:
    """The optimizers inside megatron-core's ``ChainedOptimizer`` (one per parameter
    group kind), or ``[optimizer]`` when it is not chained."""
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))

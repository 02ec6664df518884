"""The optimizer's and the LR scheduler's saved state, put back on resume.

The LR schedule follows Megatron-LM: the checkpoint's scheduler state (its step, and the
values it was built with) is compared with this run's flags, and a difference is refused
unless ``--override-opt-param-scheduler`` (this run's --lr, --min-lr, warmup, decay, weight
decay; the step count is the checkpoint's) or ``--use-checkpoint-opt-param-scheduler``
(the checkpoint's values) says which wins:

    changes = check_schedule(scheduler, saved, override=False, use_checkpoint=False,
                             where="ck/iter_0000008")   # checkpoint/compat.py: names both flags
    align_saved_groups(optimizer, saved_optimizer_state)  # before optimizer.load_state_dict
    restore_schedule(scheduler, optimizer, saved, override=False)
"""

from __future__ import annotations

from typing import Any, Dict, Iterator, List

from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from mtp_megatron.runtime.optimizer_parts import sub_optimizers

# What each optimizer param group carries for the scheduler (megatron-core reads a
# group's own max_lr/min_lr before the scheduler's).
GROUP_SCHEDULE_KEYS = ("max_lr", "min_lr")


def restore_schedule(scheduler: OptimizerParamScheduler, optimizer, saved: Dict[str, Any], *,
                     override: bool) -> None:
    """Load the scheduler state: its step always, its values unless ``override``; then
    give the optimizer's param groups the values that won (our groups carry no per-group
    LR multipliers: every group's max_lr/min_lr is the scheduler's)."""
    scheduler.override_opt_param_scheduler = override
    scheduler.use_checkpoint_opt_param_scheduler = not override
    scheduler.load_state_dict(saved)
    for group in optimizer.param_groups:
        group.update({key: getattr(scheduler, key) for key in GROUP_SCHEDULE_KEYS
                      if key in group})
    scheduler.step(increment=0)  # the current lr, from the values that won


def align_saved_groups(optimizer, state_dict: Dict[str, Any]) -> None:
    """Give the saved param groups this run's schedule values before a load.

    megatron-core 0.19 pairs saved and current param groups by a key that includes
    ``max_lr``/``min_lr``, so a changed --lr would fail the load ("Could not find
    parameter group"), and 0.16 silently restores the saved values; :func:`restore_schedule`
    then sets the values that won. Groups are paired in order (the same code built both).
    """
    saved = list(_param_group_lists(state_dict))
    current = [sub.optimizer.param_groups for sub in sub_optimizers(optimizer)
               if hasattr(sub, "optimizer") and hasattr(sub.optimizer, "param_groups")]
    for saved_groups, groups in zip(saved, current):
        if len(saved_groups) != len(groups):
            continue  # megatron-core reports the mismatch
        for theirs, mine in zip(saved_groups, groups):
            theirs.update({key: mine[key] for key in GROUP_SCHEDULE_KEYS
                           if key in mine and key in theirs})


def _param_group_lists(node) -> Iterator[List[Dict[str, Any]]]:
    """Every ``param_groups`` list in a (nested) optimizer state dict, in order."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "param_groups" and isinstance(value, list):
                yield value
            else:
                yield from _param_group_lists(value)
    elif isinstance(node, (list, tuple)):
        for value in node:
            yield from _param_group_lists(value)

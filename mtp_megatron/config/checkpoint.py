"""Saving, loading and exit flags (``checkpoint:`` in YAML)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

from mtp_megatron.config.fields import (
    ConfigError,
    check_float,
    check_int,
    check_types,
    option,
)

logger = logging.getLogger(__name__)

EXIT_SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2")


@dataclass(frozen=True)
class CheckpointConfig:
    """Saving, loading and leaving cleanly (megatron-core dist_checkpointing, torch_dist)."""

    save: Optional[str] = option(
        None, "Save checkpoints here (and resume from here when --load is not given).", type=str
    )
    load: Optional[str] = option(
        None, "Resume from the latest complete checkpoint in this directory.", type=str
    )
    save_interval: Optional[int] = option(None, "Save every N iterations.", type=int)
    ckpt_keep_last: Optional[int] = option(
        None, "After each save keep only the N most recent checkpoints under --save (never "
        "the one latest_checkpointed_iteration.txt names); default: keep all.", type=int
    )
    no_load_optim: bool = option(
        False, "Load the model but not the optimizer and LR scheduler states.", type=bool
    )
    no_load_rng: bool = option(False, "Do not restore the RNG states.", type=bool)
    override_opt_param_scheduler: bool = option(
        False, "On resume, take the LR schedule's values (--lr, --min-lr, warmup, decay, "
        "weight decay) from this run's flags, not the checkpoint's (the step count is the "
        "checkpoint's). Without it or --use-checkpoint-opt-param-scheduler a schedule that "
        "differs from the checkpoint's is refused.", type=bool,
    )
    use_checkpoint_opt_param_scheduler: bool = option(
        False, "On resume, keep the checkpoint's LR schedule values; this run's --lr, "
        "--min-lr, warmup, decay and weight decay flags then have no effect.", type=bool,
    )
    finetune: bool = option(
        False, "Load only the model; start at iteration 0 with a fresh optimizer.", type=bool
    )
    exit_signal_handler: bool = option(
        False, "On --exit-signal: finish the iteration, save, exit 0.", type=bool
    )
    exit_signal: str = option(
        "SIGTERM", "The signal --exit-signal-handler catches.", type=str, choices=EXIT_SIGNALS
    )
    exit_duration_in_mins: Optional[float] = option(
        None, "Save and exit after this many minutes of training.", type=float
    )
    exit_interval: Optional[int] = option(
        None, "Save and exit when the iteration is a multiple of this.", type=int
    )

    async_save: bool = option(
        False, "Write checkpoints in the background (GPU only: megatron-core's async "
        "dist_checkpointing); training continues while the files are written.", type=bool,
    )

    def __post_init__(self):
        check_types(self)
        if self.async_save and not self.save:
            raise ConfigError("--async-save", True, "only together with --save DIR")
        check_int("--save-interval", self.save_interval, 1, allow_none=True)
        check_int("--exit-interval", self.exit_interval, 1, allow_none=True)
        check_int("--ckpt-keep-last", self.ckpt_keep_last, 1, allow_none=True)
        check_float("--exit-duration-in-mins", self.exit_duration_in_mins, 0.0, allow_none=True)
        if self.override_opt_param_scheduler and self.use_checkpoint_opt_param_scheduler:
            raise ConfigError("--use-checkpoint-opt-param-scheduler", True,
                              "not together with --override-opt-param-scheduler",
                              "choose which LR schedule wins on resume")
        if self.finetune and (self.override_opt_param_scheduler
                              or self.use_checkpoint_opt_param_scheduler):
            logger.warning("--override-opt-param-scheduler/--use-checkpoint-opt-param-"
                           "scheduler have no effect with --finetune (a fresh schedule)")
        if self.save_interval and not self.save:
            raise ConfigError("--save-interval", self.save_interval,
                              "only together with --save DIR")
        if self.ckpt_keep_last and not self.save:
            raise ConfigError("--ckpt-keep-last", self.ckpt_keep_last,
                              "only together with --save DIR")
        exits = self.exit_signal_handler or self.exit_duration_in_mins or self.exit_interval
        if exits and not self.save:
            logger.warning("--exit-signal-handler/--exit-duration-in-mins/--exit-interval "
                           "without --save: the run will stop but save nothing.")

    @property
    def resume_from(self) -> Optional[str]:
        """Where to look for a checkpoint: --load, else --save (auto-resume)."""
        return self.load or self.save

"""The launcher's body: parse and validate, then plan (--dry-run) or train.

User mistakes and run failures end with one clear line on stderr and a distinct exit
code, never a traceback: ConfigError 2, CheckpointError 3, NonFiniteStepError 4, Ctrl-C
without --exit-signal-handler 130 (the table is in mtp_megatron/exit_codes.py). Under a
launcher every rank exits non-zero, but the line is printed once: a config error (the
same on every rank) by global rank 0, a machine check that failed (preflight: paths,
GPU, libraries) by each node's local rank 0. The silent ranks linger a few seconds
before exiting (see :func:`_report`) so that torchrun, which stops every worker at the
first failure it sees, cannot kill the reporting rank before it has printed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import time
from typing import NoReturn, Optional, Sequence

from mtp_megatron.config import ConfigError, load_config
from mtp_megatron.exit_codes import ExitCode

logger = logging.getLogger("mtp_megatron")


def _setup_logging() -> None:
    from mtp_megatron.runtime.launch_env import reported_rank

    rank = reported_rank(os.environ)
    logging.basicConfig(
        level=logging.INFO, stream=sys.stdout,
        format=f"[%(asctime)s rank{rank}] %(message)s", datefmt="%H:%M:%S",
    )
    for noisy in ("megatron", "torch"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from mtp_megatron.runtime.mcore_compat import quiet_import_notices

    quiet_import_notices()


# How long a silent rank waits before exiting: the reporting rank parses the same argv
# at the same time, so it prints well within this even on a loaded machine; a launcher
# that stops the job at the first failure (torchrun, srun --kill-on-bad-exit) ends the
# wait at once, so it never delays the exit of a job.
SILENT_RANK_GRACE_S = 10.0


def _report(err: Exception, *, per_node: bool = False) -> None:
    """Print a user error on one rank (global rank 0, or each node's local rank 0 with
    ``per_node``), not once per process. When the
    variable is not a rank number (``LOCAL_RANK=-1``: usually the error itself) no rank
    can be sure another prints, so each prints.

    The other ranks wait up to :data:`SILENT_RANK_GRACE_S` before returning: a silent
    rank that exited first would be the "first failure" torchrun acts on, and torchrun
    would SIGTERM the reporting rank before its line reached stderr.
    """
    from mtp_megatron.runtime.launch_env import reported_rank

    rank = reported_rank(os.environ, local=per_node)
    if rank == "0" or not rank.isdigit():  # a broken rank variable: no rank is sure to print
        print(f"error: {err}", file=sys.stderr, flush=True)
    else:  # a non-zero rank: there is a reporting rank to wait for
        time.sleep(SILENT_RANK_GRACE_S)


def main(argv: Optional[Sequence[str]] = None) -> int:
    _setup_logging()
    try:
        from mtp_megatron.runtime.launch_env import launcher_world_size

        cfg, options = load_config(argv, *launcher_world_size(os.environ))
        from mtp_megatron.runtime.mcore_compat import check_config

        check_config(cfg)  # what the installed megatron-core release can run
    except ConfigError as err:
        _report(err)
        return ExitCode.CONFIG
    try:
        if options.dry_run:
            from mtp_megatron.plan import dry_run

            return dry_run(cfg, gpu_memory_gb=options.gpu_memory_gb, mfu=options.mfu)
        from mtp_megatron.training.faults import catch_exit_signal

        # Before the slow part (checks, rendezvous, model, loading): a scheduler's exit
        # signal during start-up then stops the run cleanly instead of killing it.
        catch_exit_signal(cfg.checkpoint)
        from mtp_megatron.runtime.preflight import preflight

        launch, transformer_impl = preflight(cfg)
        from mtp_megatron.runtime.cuda_env import apply_cuda_env

        apply_cuda_env(cfg)  # before CUDA is initialised (the Trainer does it)
    except ConfigError as err:
        _report(err, per_node=True)
        return ExitCode.CONFIG
    from mtp_megatron.checkpoint import CheckpointError
    from mtp_megatron.training.faults import NonFiniteStepError, ignore_exit_signal
    from mtp_megatron.training.trainer import Trainer

    trainer = None
    previous = None
    if not cfg.checkpoint.exit_signal_handler:  # with it, faults.catch_exit_signal has SIGINT
        previous = signal.signal(signal.SIGINT, _interrupt_once)
    try:
        trainer = Trainer(cfg, launch, transformer_impl)
        trainer.train()
    except (ConfigError, CheckpointError, NonFiniteStepError) as err:
        print(f"error: {err}", file=sys.stderr)
        return exit_code(err)
    except KeyboardInterrupt:
        where = f" during iteration {trainer.iteration + 1}" if trainer is not None else ""
        print(f"error: interrupted (SIGINT){where}; nothing saved since the last checkpoint "
              "(with --exit-signal-handler, Ctrl-C finishes the iteration and saves)",
              file=sys.stderr)
        _leave_interrupted(trainer)
    finally:
        if trainer is not None:
            trainer.close()
        else:
            from mtp_megatron.runtime.distributed import shutdown

            shutdown()
        ignore_exit_signal()
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    return ExitCode.OK


def _leave_interrupted(trainer) -> NoReturn:
    """Exit 130 now. A collective cut short by the interrupt cannot be torn down (gloo
    waits at exit for a peer that will never answer, until torchrun kills the worker 30 s
    later), so only what another run would see is put in order: the metrics file and
    ``--save``'s lock."""
    if trainer is not None:
        with contextlib.suppress(Exception):
            trainer.metrics.close()
        if trainer.save_lock is not None:
            trainer.save_lock.release()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(ExitCode.INTERRUPTED)


def _interrupt_once(signum, frame) -> None:
    """Ctrl-C without --exit-signal-handler: one KeyboardInterrupt (reported in one line),
    then SIGINT is ignored, since torchrun forwards a second one to its workers while they
    shut down."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise KeyboardInterrupt


def exit_code(err: BaseException) -> ExitCode:
    """The exit code for an error the launcher reports in one line."""
    from mtp_megatron.checkpoint import CheckpointError
    from mtp_megatron.training.faults import NonFiniteStepError

    if isinstance(err, ConfigError):
        return ExitCode.CONFIG
    if isinstance(err, CheckpointError):
        return ExitCode.CHECKPOINT
    if isinstance(err, NonFiniteStepError):
        return ExitCode.NON_FINITE
    return ExitCode.UNEXPECTED

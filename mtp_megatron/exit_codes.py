"""The launcher's exit codes, one per kind of failure (documented in README "Exit codes").

    0  the run finished (or stopped cleanly on --exit-signal-handler / --exit-interval /
       --exit-duration-in-mins, after saving)
    1  an unexpected error (a traceback; also what torchrun returns when any rank fails)
    2  a configuration error: a flag, YAML key or launch variable (ConfigError)
    3  a checkpoint error: cannot load, cannot save (disk full, read-only), or --save is
       in use by another run (CheckpointError); the last good checkpoint is intact
    4  a NaN/Inf loss or gradient without --skip-nan-steps (NonFiniteStepError); nothing
       was saved after the last good checkpoint
  130  interrupted by Ctrl-C (SIGINT) without --exit-signal-handler: nothing saved after
       the last good checkpoint (with it, Ctrl-C saves and the code is 0)

A scheduler can requeue on 0, and should not on 2 or 4 without a change to the job.
"""

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    UNEXPECTED = 1
    CONFIG = 2
    CHECKPOINT = 3
    NON_FINITE = 4
    INTERRUPTED = 130  # 128 + SIGINT, the shell's code for a Ctrl-C

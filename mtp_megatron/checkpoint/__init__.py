"""Checkpoints: megatron-core dist_checkpointing, atomic commits, resharding on load."""

from mtp_megatron.checkpoint.compat import check_compatible
from mtp_megatron.checkpoint.dist_ckpt import (
    TrainState,
    load_checkpoint,
    load_model_weights,
    save_checkpoint,
    save_model_weights,
)
from mtp_megatron.checkpoint.layout import CheckpointError, read_tracker, resolve_load_dir

__all__ = [
    "CheckpointError", "TrainState", "check_compatible", "load_checkpoint", "load_model_weights",
    "read_tracker", "resolve_load_dir", "save_checkpoint", "save_model_weights",
]

"""Configuration: sectioned frozen dataclasses, YAML + CLI loading, validation."""

from mtp_megatron.config.fields import ConfigError
from mtp_megatron.config.loader import build_config, load_config, read_yaml, save_config, to_dict
from mtp_megatron.config.sections import (
    CheckpointConfig,
    DataConfig,
    LoggingConfig,
    ModelConfig,
    MTPConfig,
    ParallelConfig,
    RunConfig,
    TrainingConfig,
    padded_vocab_size,
)

__all__ = [
    "CheckpointConfig", "ConfigError", "DataConfig", "LoggingConfig", "MTPConfig", "ModelConfig",
    "ParallelConfig", "RunConfig", "TrainingConfig", "build_config", "load_config",
    "padded_vocab_size", "read_yaml", "save_config", "to_dict",
]

"""Configuration: sectioned frozen dataclasses, YAML + CLI loading, validation.

One module per section (``model``, ``parallel``, ``mtp``, ``training``, ``data``,
``checkpoint``, ``logs``), each validating itself in ``__post_init__``; ``run`` composes
them and owns the rules that span sections. Each section validates itself, every rule
raises :class:`ConfigError` naming the flag, the value and what is allowed, before any
process group or model exists, so all of it is testable as plain Python.
"""

from mtp_megatron.config.checkpoint import CheckpointConfig
from mtp_megatron.config.data import DataConfig
from mtp_megatron.config.fields import ConfigError
from mtp_megatron.config.loader import build_config, load_config, read_yaml, save_config, to_dict
from mtp_megatron.config.logs import LoggingConfig
from mtp_megatron.config.model import ModelConfig, padded_vocab_size
from mtp_megatron.config.mtp import MTPConfig
from mtp_megatron.config.parallel import ParallelConfig
from mtp_megatron.config.run import SECTIONS, RunConfig
from mtp_megatron.config.training import TrainingConfig

__all__ = [
    "SECTIONS", "CheckpointConfig", "ConfigError", "DataConfig", "LoggingConfig", "MTPConfig",
    "ModelConfig", "ParallelConfig", "RunConfig", "TrainingConfig", "build_config",
    "load_config", "padded_vocab_size", "read_yaml", "save_config", "to_dict",
]

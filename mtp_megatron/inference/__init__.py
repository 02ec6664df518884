"""Generation from a trained checkpoint: greedy and MTP self-speculative decoding."""

from mtp_megatron.inference.decoding import Generation, generate
from mtp_megatron.inference.runner import KVCachedRunner
from mtp_megatron.inference.stats import DecodeStats

__all__ = ["DecodeStats", "Generation", "KVCachedRunner", "generate"]

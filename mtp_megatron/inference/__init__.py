"""Generation from a trained checkpoint: plain (greedy or sampled) and MTP
self-speculative decoding, one prompt or a batch."""

from mtp_megatron.inference.decoding import Generation, generate, generate_batch
from mtp_megatron.inference.runner import KVCachedRunner
from mtp_megatron.inference.sampling import Sampling
from mtp_megatron.inference.stats import DecodeStats

__all__ = ["DecodeStats", "Generation", "KVCachedRunner", "Sampling", "generate",
           "generate_batch"]

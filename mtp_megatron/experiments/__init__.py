"""Experiments built on the launcher: ``python -m mtp_megatron.experiments.compare``
trains a baseline and MTP runs like for like and reports what MTP buys (docs/results.md).
"""

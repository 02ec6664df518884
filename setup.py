"""mtp_megatron: GPT pretraining with multi-token prediction on megatron-core."""

from setuptools import find_packages, setup

HF = ["transformers>=5", "safetensors"]

setup(
    name="mtp_megatron",
    version="0.1.0",
    description="Pretrain GPT models with Multi-Token Prediction on NVIDIA megatron-core",
    packages=find_packages(include=["mtp_megatron", "mtp_megatron.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch==2.13.0",
        "megatron-core==0.16.1",
        "pyyaml",
        "psutil",
        "numpy",
        "tqdm",
    ],
    extras_require={
        "test": ["pytest"],
        # Transformer Engine's PyTorch extension builds from source against the local
        # CUDA toolkit: GPU machines only. NVIDIA apex is never a dependency (the PyPI
        # package of that name is unrelated); it is detected at run time in NGC images.
        "te": ["transformer_engine[pytorch]"],
        "tensorboard": ["tensorboard"],
        "plot": ["matplotlib"],  # the benchmarks' and experiments.compare's PNGs
        # python -m mtp_megatron.hf export/import (docs/hf.md); dev includes it for the tests.
        "hf": HF,
        "dev": ["pytest", "ruff", "matplotlib", *HF],  # matplotlib: tests/unit/test_compare.py
    },
)

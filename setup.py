"""mtp_megatron: GPT pretraining with multi-token prediction on megatron-core."""

from setuptools import find_packages, setup

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
        # The range megatron-core 0.16.1 is tested with (its own "dev" extra pins
        # transformer-engine>=2.9.0a0,<2.12.0); NGC pytorch:25.11-py3 ships one in it.
        "te": ["transformer_engine[pytorch]>=2.9.0a0,<2.12.0"],
        "tensorboard": ["tensorboard"],
        "plot": ["matplotlib"],  # benchmarks/speculative_decoding.py's PNG
        "dev": ["pytest", "ruff"],
    },
)

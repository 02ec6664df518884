"""mtp_megatron: GPT pretraining with multi-token prediction on megatron-core.

Install requirements are the ranges the code supports, so ``pip install .`` keeps the
torch, Transformer Engine and apex that an NGC PyTorch image ships. The exact versions
CI tests are in constraints.txt (the Makefile's venv: ``pip install -c constraints.txt``).
"""

from setuptools import find_packages, setup

setup(
    name="mtp_megatron",
    version="0.1.0",
    description="Pretrain GPT models with Multi-Token Prediction on NVIDIA megatron-core",
    packages=find_packages(include=["mtp_megatron", "mtp_megatron.*"]),
    # CI (make test) runs 3.11; NGC PyTorch 25.x images, where the GPU tests run
    # (scripts/ngc_tests.sh), ship 3.12. Nothing else is tested.
    python_requires=">=3.11,<3.13",
    install_requires=[
        # megatron-core 0.16's own floor; CI runs 2.13.0. No upper bound: NGC images
        # ship their own torch build and must keep it.
        "torch>=2.6",
        # The CPU bridge and the checkpoint code patch and call megatron-core internals
        # as they are in 0.16.x; runtime/cpu_bridge.py refuses other versions.
        "megatron-core>=0.16.1,<0.17",
        "pyyaml>=6",
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
        "wandb": ["wandb"],
        "plot": ["matplotlib"],  # python -m mtp_megatron.plot, benchmarks/*.py
        # python -m mtp_megatron.hf export/import (docs/hf.md).
        "hf": ["transformers>=5", "safetensors"],
        # CI installs .[dev]: the optional writers, the plot and the HF round trip are tested.
        "dev": ["pytest", "ruff", "wandb", "matplotlib", "transformers>=5",
                "safetensors"],
    },
    entry_points={
        "console_scripts": [
            "mtp-pretrain = mtp_megatron.cli:main",
            "mtp-generate = mtp_megatron.generate:main",
            "mtp-preprocess = mtp_megatron.data.preprocess:main",
        ],
    },
)

"""mtp_megatron: GPT pretraining with multi-token prediction on megatron-core.

Install requirements are the ranges the code supports, so ``pip install .`` keeps the
torch, Transformer Engine and apex that an NGC PyTorch image ships. The exact versions
CI tests are in constraints.txt (the main stack, Python 3.12: ``make``'s .venv) and
constraints-compat.txt (the megatron-core 0.16.1 floor on Python 3.11: .venv-compat).
"""

from setuptools import find_packages, setup

setup(
    name="mtp_megatron",
    version="0.1.0",
    description="Pretrain GPT models with Multi-Token Prediction on NVIDIA megatron-core",
    packages=find_packages(include=["mtp_megatron", "mtp_megatron.*"]),
    # CI runs both: 3.12 with megatron-core 0.19 (the main stack, `make test`) and 3.11
    # with megatron-core 0.16.1 (the floor, `make test-compat`). Nothing else is tested.
    python_requires=">=3.11,<3.13",
    install_requires=[
        # megatron-core's own floor; CI runs 2.13.0. No upper bound: NGC images ship their
        # own torch build and must keep it.
        "torch>=2.6",
        # Exactly the release lines CI tests (runtime/mcore_compat.py owns every
        # difference between them and refuses other versions with a message):
        # 0.19.x from 0.19.2 on Python 3.12, 0.16.x from 0.16.1 on Python 3.11.
        "megatron-core>=0.19.2,<0.20; python_version >= '3.12'",
        "megatron-core>=0.16.1,<0.17; python_version < '3.12'",
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
        # The TE that each megatron-core line declares: 0.19.2's own `te` extra
        # (transformer-engine[pytorch,core_cu13], no version bound; its CI builds TE
        # 2.17.1), and 0.16.1's dev range (>=2.9.0a0,<2.12.0). docs/gpu.md has the NGC
        # image that ships them.
        "te": [
            "transformer-engine[pytorch,core_cu13]; python_version >= '3.12'",
            "transformer_engine[pytorch]>=2.9.0a0,<2.12.0; python_version < '3.12'",
        ],
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

"""Test tiers: pure config -> multi-rank CPU (gloo) -> @pytest.mark.gpu -> functional torchrun.

Every process a test starts runs in strict device mode (``MTP_MEGATRON_STRICT_DEVICE=1``:
package tensors made without ``device=`` are on ``meta``, see
``mtp_megatron/runtime/strict_device.py``). Tests not marked ``gpu`` hide CUDA from the
processes they start (``CUDA_VISIBLE_DEVICES=""``, set before each such test), so on a
GPU machine the CPU tiers still take the gloo path; ``gpu`` tests see the GPUs.
"""

import os
import sys
import warnings

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from mtp_megatron.runtime.strict_device import STRICT_ENV  # noqa: E402

warnings.filterwarnings("ignore", category=UserWarning)

os.environ[STRICT_ENV] = "1"
_VISIBLE = os.environ.get("CUDA_VISIBLE_DEVICES")  # as the user started pytest


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """Before the test's fixtures start anything: hide CUDA unless it is a gpu test."""
    if "gpu" not in item.keywords:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    elif _VISIBLE is None:
        os.environ.pop("CUDA_VISIBLE_DEVICES", None)
    else:
        os.environ["CUDA_VISIBLE_DEVICES"] = _VISIBLE

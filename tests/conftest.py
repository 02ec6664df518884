"""Test tiers: pure config -> multi-rank CPU (gloo) -> @pytest.mark.gpu -> functional torchrun.

``make test-fast`` runs the tests with none of the ``multirank``, ``functional`` and
``gpu`` markers. A test that starts a process (``subprocess``, ``multiprocessing``:
spawned ranks, torchrun, scripts) must carry ``multirank`` or ``functional``: here any
other test that tries fails at once, naming the marker to add.

Every process a test starts runs in strict device mode (``MTP_MEGATRON_STRICT_DEVICE=1``:
package tensors made without ``device=`` are on ``meta``, see
``mtp_megatron/runtime/strict_device.py``). Tests not marked ``gpu`` hide CUDA from the
processes they start (``CUDA_VISIBLE_DEVICES=""``, set before each such test), so on a
GPU machine the CPU tiers still take the gloo path; ``gpu`` tests see the GPUs.
"""

import contextlib
import multiprocessing.process
import os
import subprocess
import sys
import warnings

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from mtp_megatron.runtime.strict_device import STRICT_ENV  # noqa: E402

warnings.filterwarnings("ignore", category=UserWarning)

SPAWNING_MARKERS = ("multirank", "functional", "slurm")
os.environ[STRICT_ENV] = "1"
_VISIBLE = os.environ.get("CUDA_VISIBLE_DEVICES")  # as the user started pytest


def pytest_configure(config):
    """Imports that start a process, done here before any test, or the first unmarked test
    that triggers one is refused for starting a process: matplotlib builds its font cache
    on first import (``fc-list``; a fresh CI machine has none), megatron-core 0.19 asks
    ``git rev-parse`` for its version, and a CUDA build of torch finds its libraries with
    ``ldconfig -p`` (cuda.pathfinder) when megatron-core first loads them."""
    with contextlib.suppress(ImportError):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.font_manager  # noqa: F401
    with contextlib.suppress(ImportError):
        import megatron.core.parallel_state  # noqa: F401


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


class UnmarkedSpawnError(RuntimeError):
    pass


@contextlib.contextmanager
def _processes_refused(item):
    """Inside ``item`` (setup and call), starting a process raises unless it is marked."""
    if any(item.get_closest_marker(m) for m in SPAWNING_MARKERS):
        yield
        return

    def refuse(*args, **kwargs):
        raise UnmarkedSpawnError(
            f"{item.nodeid} starts a process but is not marked "
            f"{' or '.join(SPAWNING_MARKERS)}: add @pytest.mark.multirank (spawned ranks) "
            "or @pytest.mark.functional (launchers, scripts) so `make test-fast` leaves it out")

    saved = subprocess.Popen, multiprocessing.process.BaseProcess.start
    subprocess.Popen = refuse
    multiprocessing.process.BaseProcess.start = refuse
    try:
        yield
    finally:
        subprocess.Popen, multiprocessing.process.BaseProcess.start = saved


def _hide_cuda_unless_gpu(item) -> None:
    """Before the test's fixtures start anything: hide CUDA unless it is a gpu test."""
    if "gpu" not in item.keywords:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    elif _VISIBLE is None:
        os.environ.pop("CUDA_VISIBLE_DEVICES", None)
    else:
        os.environ["CUDA_VISIBLE_DEVICES"] = _VISIBLE


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item):
    _hide_cuda_unless_gpu(item)  # a hook wrapper runs before any fixture is set up
    with _processes_refused(item):
        yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    with _processes_refused(item):
        yield

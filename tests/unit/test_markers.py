"""The tiers stay honest: a test that starts a process without a marker fails."""

import subprocess
import sys

import pytest

from tests.conftest import UnmarkedSpawnError


def test_an_unmarked_test_cannot_start_a_process():
    with pytest.raises(UnmarkedSpawnError, match="test_markers.py.*not marked multirank"):
        subprocess.run([sys.executable, "-c", "pass"])


def test_an_unmarked_test_cannot_spawn_ranks():
    from tests.dist_utils import spawn

    with pytest.raises(UnmarkedSpawnError, match="@pytest.mark.multirank"):
        spawn(1, print)


@pytest.mark.functional
def test_a_marked_test_can():
    assert subprocess.run([sys.executable, "-c", "pass"]).returncode == 0

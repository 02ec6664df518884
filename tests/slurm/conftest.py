"""The ``slurm`` tier: a real two-node Slurm cluster for the session (tests/slurm/cluster.py).

The cluster starts on first use and is torn down by PID at the end of the session, also
when a test fails or the session is interrupted. Without root or without the Debian
packages (``.ci/install_slurm.sh`` installs them) every test here skips, naming what is
missing; a cluster that is installed but fails to start is an error.

Against a site's own Slurm instead, see docs/cluster.md ("Testing on your cluster").
"""

from __future__ import annotations

import pytest

from tests.slurm.cluster import Cluster, missing_requirements
from tests.slurm.jobs import Slurm


@pytest.fixture(scope="session")
def cluster(request):
    why = missing_requirements()
    if why:
        pytest.skip(f"no Slurm test cluster: {why}")
    started = Cluster.start()
    request.addfinalizer(started.stop)
    return started


@pytest.fixture(scope="session")
def slurm(cluster, tmp_path_factory):
    return Slurm(cluster, workdir=str(tmp_path_factory.mktemp("submit")),
                 runs=str(tmp_path_factory.mktemp("runs")))

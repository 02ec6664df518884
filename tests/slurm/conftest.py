"""The ``slurm`` tier: a real two-node Slurm cluster for the session (tests/slurm/cluster.py).

The cluster starts on first use and is torn down by PID at the end of the session, also
when a test fails or the session is interrupted. Without root or without the Debian
packages (``.ci/install_slurm.sh`` installs them) every test here skips, naming what is
missing; a cluster that is installed but fails to start is an error.

``MTP_SLURM_TEST_SITE=1`` runs the same tests against a site's own Slurm instead (see
docs/cluster.md, "Testing on your cluster").
"""

from __future__ import annotations

import os
import tempfile

import pytest

from tests.slurm.cluster import (
    SITE_ENV,
    Cluster,
    ClusterUnavailable,
    SiteCluster,
    missing_requirements,
)
from tests.slurm.jobs import Slurm


@pytest.fixture(scope="session")
def cluster(request):
    if os.environ.get(SITE_ENV) == "1":
        try:
            return SiteCluster()
        except ClusterUnavailable as err:
            pytest.fail(str(err), pytrace=False)  # asked for, so not a skip
    why = missing_requirements()
    if why:
        pytest.skip(f"no Slurm test cluster: {why}")
    started = Cluster.start()
    request.addfinalizer(started.stop)
    return started


@pytest.fixture(scope="session")
def slurm(cluster, tmp_path_factory):
    if isinstance(cluster, SiteCluster):  # the nodes must see the runs: not /tmp
        base = tempfile.mkdtemp(prefix="mtp-slurm-tests-", dir=cluster.root)
        os.makedirs(os.path.join(base, "submit"))
        os.makedirs(os.path.join(base, "runs"))
        return Slurm(cluster, workdir=os.path.join(base, "submit"),
                     runs=os.path.join(base, "runs"))
    return Slurm(cluster, workdir=str(tmp_path_factory.mktemp("submit")),
                 runs=str(tmp_path_factory.mktemp("runs")))

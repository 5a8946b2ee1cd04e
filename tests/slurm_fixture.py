"""Session-scoped pytest fixture: a real two-node SLURM cluster.

    from slurm_fixture import slurm_cluster  # noqa: F401  (registers the fixture)

    def test_x(slurm_cluster):
        job = slurm_cluster.submit(script, sbatch_opts=["-N", "2"])
        slurm_cluster.wait_state(job, "COMPLETED", timeout=60)

Skips (with the reason) where SLURM cannot run: binaries missing or not root.
Set SLURM_TEST_KEEP_DIR=1 to keep the cluster directory (logs) after the session.
"""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from slurm_cluster import SlurmCluster, SlurmClusterError, slurm_available  # noqa: E402

__all__ = ["slurm_cluster", "SlurmCluster", "SlurmClusterError", "slurm_available"]


@pytest.fixture(scope="session")
def slurm_cluster():
    ok, reason = slurm_available()
    if not ok:
        pytest.skip(reason)
    cluster = SlurmCluster()
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()

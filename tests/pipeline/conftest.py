"""One local Ray cluster for the pipeline tests (``tiny_shards`` and ``tiny_config`` are in tests/conftest.py)."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster (2 CPUs) for every test that needs one."""
    import os

    import ray

    from pipeline.cluster import start_local_cluster
    from pipeline.tune import TRIAL_DRIVER_RESOURCE

    # Ray Train gives a worker group 60 s to start; a loaded 2-core CI machine can need more.
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "300")

    # A new cluster on 127.0.0.1 alone, as run.py's own (see pipeline.cluster.start_local_cluster).
    start_local_cluster(num_cpus=2, resources={TRIAL_DRIVER_RESOURCE: 1000}, include_dashboard=True,
                        log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()

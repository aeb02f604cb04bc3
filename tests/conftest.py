import os

import pytest

os.environ.setdefault("RAY_DEDUP_LOGS", "0")


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray cluster for the whole test session (ray.init takes ~10 s here). More logical CPUs than
    cores, so that several actors fit."""
    import ray

    ray.init(address="local", num_cpus=16, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()

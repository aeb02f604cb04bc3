"""Test tiers, one folder each, selected with `pytest -m <tier>`:

- unit: no Ray cluster and no transformers model; runs in under a minute.
- parity: our outputs against transformers' Llama 4 on checkpoints it writes itself.
- ray: the engine on a real local Ray cluster (one per session).
- e2e: the real Serve HTTP and gRPC servers, real clients, the CLI, Ray Jobs and the helm chart.
"""

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
TESTS = Path(__file__).resolve().parent
TIERS = ("unit", "parity", "ray", "e2e")
sys.path.insert(0, str(TESTS))  # hf_reference, shared by every tier


def pytest_collection_modifyitems(items):
    for item in items:
        tier = Path(item.fspath).resolve().relative_to(TESTS).parts[0]
        if tier in TIERS:
            item.add_marker(getattr(pytest.mark, tier))


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray cluster for the whole test session (ray.init takes ~10 s here). More logical CPUs than
    cores, so that several actors fit. Serve's transport settings are those `llama4serve serve` runs with."""
    import ray

    from llama4serve.cluster.serving import serve_env

    serve_env.apply()
    ray.init(address="local", num_cpus=16, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()

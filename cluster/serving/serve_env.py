"""The Ray Serve transport settings `llama4serve serve` runs with (docs/benchmarks.md, issue 21).

Serve's proxies reach the Ingress over Ray's object-returning streaming calls unless `RAY_SERVE_PROXY_USE_GRPC`
is set, in which case they use the gRPC server every replica runs for inter-deployment calls: each streamed SSE
event then costs the proxy and the Ingress about half the CPU. Proxies read it when they start, so it must be in
the environment of the Ray processes: `apply()` sets it before a local `ray.init` (the CLI and the benchmark do
this); on a cluster it is set in the pods' environment (the Helm chart does). The Ingress's own calls to the
Engine take the same path through their handle options (`engine_client.py`).
"""

from __future__ import annotations

import os

SERVE_ENV = {"RAY_SERVE_PROXY_USE_GRPC": "1"}


def apply() -> None:
    """Sets SERVE_ENV in this process's environment (what a local Ray cluster started next inherits), unless
    already set."""
    for name, value in SERVE_ENV.items():
        os.environ.setdefault(name, value)

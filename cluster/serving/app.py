"""The Ray Serve application: `build_app(args) -> Application` for `serve run`, `serve deploy`, KubeRay
`serveConfigV2` (`import_path: llama4serve.cluster.app:build_app`) and `llama4serve serve`.

Two deployments: `Ingress` (`ingress.py`: HTTP and gRPC, torch-free) and `Engine` (`engine_deployment.py`: one
replica = one model instance with its data-plane actors). `build_app` runs in the driver (or in Serve's
application build task), never in a replica: it is the one serving function that may make a preset's random
checkpoint, through `with_checkpoint`, which imports the checkpoint maker only when `model` is unset.
"""

from __future__ import annotations

from pathlib import Path

from ray.serve import Application

from llama4serve.cluster.serving.engine_deployment import Engine
from llama4serve.cluster.serving.ingress import Ingress
from llama4serve.cluster.serving.serve_config import ServeConfig

CHANNEL_CALLS = 16  # Ingress replicas one Engine replica streams to at once


def with_checkpoint(config: ServeConfig) -> ServeConfig:
    """`config` with `model` set: when unset, the random checkpoint of `preset`, written once into `cache_dir`
    on this node (the replicas then read that directory; across nodes, make it in every pod first, as the Helm
    chart's init container does, and set `model`)."""
    if config.model is not None:
        return config
    from llama4serve.cluster.cli.generate_cmd import resolve_model  # the driver only: imports the maker

    path = resolve_model(None, config.preset, Path(config.cache_dir))
    return config.model_copy(update={"model": str(path)})


def build_app(args: dict | ServeConfig | None = None) -> Application:
    """The application for `args` (ServeConfig fields; unknown fields are an error)."""
    config = args if isinstance(args, ServeConfig) else ServeConfig(**(args or {}))
    config = with_checkpoint(config)
    # Serve's default of 5 ongoing requests per replica would queue requests in front of our own limits; each
    # Ingress replica also holds one streaming channel call per Engine replica (CHANNEL_CALLS allows for them).
    engine = Engine.options(
        num_replicas=config.num_replicas,
        max_ongoing_requests=config.max_num_seqs * config.attention_actors + config.max_queued_requests
        + CHANNEL_CALLS,
    ).bind(config)
    return Ingress.options(max_ongoing_requests=config.max_queued_requests + 16).bind(engine, config)

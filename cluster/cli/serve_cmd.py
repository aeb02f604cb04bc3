"""`llama4serve serve`: start (or join) a Ray cluster, deploy the app, print the URLs, serve until stopped."""

from __future__ import annotations

import argparse
import os
import signal
import threading
from pathlib import Path

from llama4serve.cluster.serving import serve_env
from llama4serve.cluster.serving.serve_config import API_KEY_ENV, ServeConfig

APP_NAME = "llama4serve"
GRPC_SERVICERS = [
    "llama4serve.protos.llama4serve_pb2_grpc.add_Llama4ServeServicer_to_server",
    "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server",
]
# CLI flag -> ServeConfig field, for the flags that override the config file when given.
_FLAGS = ("model", "preset", "attention_actors", "expert_actors", "dtype", "max_model_len", "num_replicas",
          "http_port", "grpc_port", "served_model_name")


def add_serve_subcommand(subparsers) -> None:
    p = subparsers.add_parser("serve", help="serve a model over OpenAI-compatible HTTP and gRPC (Ray Serve)")
    p.add_argument("--model", help="checkpoint directory (default: a random checkpoint of --preset)")
    p.add_argument("--preset", help="preset made when --model is not given (default tiny-maverick)")
    p.add_argument("--attention-actors", type=int)
    p.add_argument("--expert-actors", type=int)
    p.add_argument("--dtype")
    p.add_argument("--max-model-len", type=int)
    p.add_argument("--num-replicas", type=int, help="independent model instances")
    p.add_argument("--served-model-name")
    p.add_argument("--http-port", type=int, help="default 8000")
    p.add_argument("--grpc-port", type=int, help="default 9000")
    p.add_argument("--host", default="127.0.0.1", help="interface the HTTP and gRPC proxies listen on (0.0.0.0: all)")
    p.add_argument("--address", help="Ray cluster to join: 'auto' or ray://host:10001 (default: start a local one)")
    p.add_argument("--dashboard-port", type=int, default=8265, help="Ray dashboard port of a local cluster")
    p.add_argument("--config", type=Path, help="YAML file of ServeConfig fields; flags given override it")
    p.set_defaults(func=main_serve)


def config_from_args(args: argparse.Namespace) -> ServeConfig:
    overrides = {k: getattr(args, k) for k in _FLAGS if getattr(args, k) is not None}
    if args.config is not None:
        return ServeConfig.from_yaml(args.config, **overrides)
    return ServeConfig(**overrides)


def start_serve(config: ServeConfig, host: str = "127.0.0.1") -> None:
    """Starts Serve's HTTP and gRPC proxies on `host` and deploys the app (Ray must be initialized).

    Serve's gRPC proxy has no host option; HostgRPCOptions makes it listen where the HTTP proxy does (see
    grpc_bind.py).
    """
    from ray import serve

    from llama4serve.cluster.serving.app import build_app
    from llama4serve.cluster.serving.grpc.bind import HostgRPCOptions

    serve.start(
        http_options={"host": host, "port": config.http_port},
        grpc_options=HostgRPCOptions(host=host, port=config.grpc_port, grpc_servicer_functions=GRPC_SERVICERS),
    )
    serve.run(build_app(config), name=APP_NAME, route_prefix="/", blocking=False)


def main_serve(args: argparse.Namespace) -> int:
    import ray
    from ray import serve

    from llama4serve.cluster.serving.app import with_checkpoint
    from llama4serve.cluster.serving.grpc.bind import host_port

    # The default checkpoint (a random one of --preset) is made here, before anything is deployed.
    config = with_checkpoint(config_from_args(args))
    local = args.address is None
    if local:
        serve_env.apply()  # before ray.init: the proxies read it when they start
        # Logical CPUs for every data-plane actor of every replica (they mostly wait on each other).
        actors = (config.attention_actors + config.expert_actors) * config.num_replicas
        ray.init(address="local", num_cpus=max(os.cpu_count() or 1, actors + 4), include_dashboard=True,
                 dashboard_port=args.dashboard_port)
    else:
        ray.init(address=args.address)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):  # Ctrl-C, `ray job stop`, a pod's termination
        signal.signal(sig, lambda *_: stop.set())
    try:
        start_serve(config, args.host)
        key = "set" if config.resolved_api_key() else f"none (set {API_KEY_ENV} to require one)"
        http, grpc = host_port(args.host, config.http_port), host_port(args.host, config.grpc_port)
        print(f"llama4serve: serving {config.model_name()!r}", flush=True)
        print(f"  OpenAI HTTP  http://{http}/v1  (health: /health, docs: /docs)", flush=True)
        print(f"  gRPC         {grpc}  (llama4serve.v1.Llama4Serve, grpc.health.v1)", flush=True)
        print(f"  API key      {key}", flush=True)
        if local:
            print(f"  dashboard    http://127.0.0.1:{args.dashboard_port}", flush=True)
        print("Ctrl-C to stop.", flush=True)
        stop.wait()
    finally:
        serve.delete(APP_NAME)  # the Engine replicas release their actors and placement groups
        print(f"llama4serve: application {APP_NAME!r} deleted", flush=True)
        if local:
            serve.shutdown()
            ray.shutdown()
    return 0

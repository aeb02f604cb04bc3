"""gRPC options that make Ray Serve's gRPC proxy listen on one host, as its HTTP proxy does (`--host`).

Ray Serve 2.60 has no such option: `grpc_util.start_grpc_server` always listens on `[::]:<port>` (every
interface) through `default_impl.add_grpc_address`, which it imports when it runs. `HostgRPCOptions` is
Serve's `gRPCOptions` plus `host`; the controller hands it to each proxy actor as an argument, so unpickling it
in the proxy's process (before that proxy starts its gRPC server) wraps `add_grpc_address` to put `host` in
place of `[::]` (every interface stays Serve's own `[::]`). It also installs `policy.QuietClientErrors` there,
so the proxy logs client errors of streaming RPCs in one INFO line. If Serve no longer binds that way, a proxy
asked for one host fails to start (fail closed) rather than listening everywhere.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field
from ray.serve.config import gRPCOptions

from llama4serve.cluster.serving.policy import quiet_client_errors

_ALL_INTERFACES = "[::]:"
EVERY_INTERFACE = ("0.0.0.0", "::", "")
_state: dict[str, Any] = {"host": None, "serve_add_grpc_address": None}


def host_port(host: str, port: int | str) -> str:
    """`host:port` (IPv6 literals in brackets), as gRPC addresses and URLs spell it."""
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def _add_grpc_address(server, address: str):
    host = _state["host"]
    if host and address.startswith(_ALL_INTERFACES):
        address = host_port(host, address.removeprefix(_ALL_INTERFACES))
    return _state["serve_add_grpc_address"](server, address)


def bind_grpc_host(host: str) -> None:
    """Makes Serve's gRPC servers started later in this process listen on `host` instead of every interface."""
    from ray.serve._private import default_impl, grpc_util

    quiet_client_errors()
    if host in EVERY_INTERFACE:
        _state["host"] = None
        return
    code = getattr(grpc_util.start_grpc_server, "__code__", None)
    if code is None or "add_grpc_address" not in code.co_varnames or not hasattr(default_impl, "add_grpc_address"):
        raise RuntimeError(
            f"this Ray Serve no longer binds its gRPC port through default_impl.add_grpc_address, so llama4serve "
            f"cannot make it listen on {host!r} only; serve with --host 0.0.0.0 (every interface) or pin ray 2.60"
        )
    if _state["serve_add_grpc_address"] is None:
        _state["serve_add_grpc_address"] = default_impl.add_grpc_address
        default_impl.add_grpc_address = _add_grpc_address
    _state["host"] = host


class HostgRPCOptions(gRPCOptions):
    """Serve's gRPCOptions plus the interface to listen on."""

    host: str = Field(description="Interface the gRPC proxy listens on (the HTTP proxy's host).")

    def __setstate__(self, state) -> None:  # unpickled in the controller and in each proxy actor
        super().__setstate__(state)
        bind_grpc_host(self.host)

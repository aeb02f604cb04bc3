"""The context object Ray Serve passes to a gRPC method as `grpc_context`, built around a stand-in of the
server's own context (the unit and e2e tests call the servicer methods directly with it)."""

from __future__ import annotations

from types import SimpleNamespace

from ray.serve.grpc_util import RayServegRPCContext


def context(metadata=()) -> RayServegRPCContext:
    raw = SimpleNamespace(
        auth_context=dict, code=lambda: None, details=lambda: None, invocation_metadata=lambda: list(metadata),
        peer=lambda: "ipv4:127.0.0.1:50000", peer_identities=lambda: None, peer_identity_key=lambda: None,
        trailing_metadata=list,
    )
    return RayServegRPCContext(raw)

"""The Engine deployment's rejections, the ingress-side EngineClient (deadline, rejections), and the gRPC host
binding, in process with stand-ins for the AsyncEngine, the DeploymentHandle and gRPC's server (no Ray cluster).
The real servers are exercised in tests/e2e/test_serve_errors.py and test_serve_e2e.py."""

from __future__ import annotations

import asyncio
import logging
import pickle

import pytest

from llama4serve.cluster.serving.grpc import bind as grpc_bind
from llama4serve.cluster.serving.engine_client import EngineClient, Rejected
from llama4serve.cluster.serving.engine_deployment import Engine
from llama4serve.cluster.outputs import RequestOutput
from llama4serve.cluster.serving.policy import DEADLINE, ServingError

DONE = RequestOutput("r", [1], [5], "a", True, "length", num_generated_tokens=1)


class StubAsyncEngine:
    def __init__(self, error=None):
        self.error = error

    async def generate(self, prompt, params, request_id):
        if self.error is not None:
            raise self.error
        yield DONE

    def shutdown(self):
        pass


def engine_replica(error=None):
    replica = Engine.func_or_class.__new__(Engine.func_or_class)  # the deployment's class, without Ray
    replica.engine = StubAsyncEngine(error)
    return replica


async def collect(stream):
    return [item async for item in stream]


def test_engine_replica_returns_a_rejection_logged_in_one_info_line(caplog):
    message = "prompt has 9000 tokens; this deployment accepts at most 8192 (max_model_len)"
    serve_logger = logging.getLogger("ray.serve")  # Ray makes it not propagate: capture it directly
    serve_logger.addHandler(caplog.handler)
    propagate, serve_logger.propagate = serve_logger.propagate, False
    try:
        with caplog.at_level(logging.INFO, logger="ray.serve"):
            items = asyncio.run(collect(engine_replica(ValueError(message)).generate("p", None, "req-1")))
    finally:
        serve_logger.removeHandler(caplog.handler)
        serve_logger.propagate = propagate
    assert items == [Rejected(message)]
    assert [(r.levelname, r.getMessage(), r.exc_info) for r in caplog.records] == \
        [("INFO", f"request req-1 rejected: {message}", None)]
    assert pickle.loads(pickle.dumps(items[0])) == items[0]  # it crosses to the ingress
    with pytest.raises(RuntimeError):  # a fault is raised, for Serve to log with its traceback
        asyncio.run(collect(engine_replica(RuntimeError("kaboom")).generate("p", None, "req-2")))
    assert asyncio.run(collect(engine_replica().generate("p", None, "req-3"))) == [DONE]


class StubStream:
    """What a streaming DeploymentHandle call returns: an async iterator with cancel()."""

    def __init__(self, items, hang=False):
        self.items, self.hang, self.cancelled = list(items), hang, False

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self.items:
            await asyncio.sleep(0)
            return self.items.pop(0)
        if self.hang:
            await asyncio.Event().wait()
        raise StopAsyncIteration

    def cancel(self):
        self.cancelled = True


class StubHandle:
    def __init__(self, stream):
        self.stream = stream
        self.generate = self

    def options(self, **_):
        return self

    def remote(self, *args):
        return self.stream


def test_engine_client_raises_rejections_and_deadlines():
    rejected = StubStream([Rejected("top_k is -5; allowed -1 or more")])
    with pytest.raises(ValueError, match="top_k is -5"):
        asyncio.run(collect(EngineClient(StubHandle(rejected)).generate("p", None, "a")))
    assert not rejected.cancelled  # nothing runs in the engine: nothing to cancel

    hung = StubStream([RequestOutput("b", [1], [5], "a")], hang=True)
    client = EngineClient(StubHandle(hung), request_timeout_s=0.2)
    outputs = []

    async def read():
        async for out in client.generate("p", None, "b"):
            outputs.append(out)

    with pytest.raises(ServingError) as err:
        asyncio.run(read())
    assert err.value.kind is DEADLINE and "0.2 s (request_timeout_s)" in err.value.message
    assert len(outputs) == 1 and hung.cancelled  # the engine request is cancelled

    done = StubStream([DONE])
    assert asyncio.run(collect(EngineClient(StubHandle(done), 5).generate("p", None, "c"))) == [DONE]
    assert not done.cancelled


class RecordingServer:
    def __init__(self):
        self.addresses = []

    def add_insecure_port(self, address):
        self.addresses.append(address)


@pytest.fixture
def restore_grpc_bind():
    from ray.serve._private import default_impl

    original, state = default_impl.add_grpc_address, dict(grpc_bind._state)
    yield default_impl
    default_impl.add_grpc_address = original
    grpc_bind._state.update(state)


def test_grpc_options_bind_the_proxy_to_the_http_host(restore_grpc_bind):
    default_impl = restore_grpc_bind
    options = grpc_bind.HostgRPCOptions(host="127.0.0.1", port=9123, grpc_servicer_functions=[])
    server = RecordingServer()
    default_impl.add_grpc_address(server, "[::]:9123")
    assert server.addresses == ["[::]:9123"]  # nothing changes until the options reach a proxy's process
    received = pickle.loads(pickle.dumps(options))  # what the proxy actor's process does with its argument
    assert isinstance(received, grpc_bind.HostgRPCOptions) and received.host == "127.0.0.1"
    # Serve's start_grpc_server imports add_grpc_address when it runs and adds "[::]:<port>".
    from ray.serve._private.default_impl import add_grpc_address

    add_grpc_address(server, f"[::]:{received.port}")
    assert server.addresses[-1] == "127.0.0.1:9123"
    grpc_bind.bind_grpc_host("::1")
    add_grpc_address(server, "[::]:9123")
    assert server.addresses[-1] == "[::1]:9123"
    assert grpc_bind.host_port("0.0.0.0", 8000) == "0.0.0.0:8000"

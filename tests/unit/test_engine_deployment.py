"""The Engine deployment's rejections, the ingress-side EngineClient (deadline, rejections), and the gRPC host
binding, in process with stand-ins for the AsyncEngine, the DeploymentHandle and gRPC's server (no Ray cluster).
The real servers are exercised in tests/e2e/test_serve_errors.py and test_serve_e2e.py."""

from __future__ import annotations

import asyncio
import logging
import pickle
import time

import pytest

from llama4serve.cluster.serving.grpc import bind as grpc_bind
from llama4serve.cluster.serving.engine_client import EngineClient, Rejected
from llama4serve.cluster.serving.engine_deployment import Engine
from llama4serve.cluster.outputs import RequestOutput
from llama4serve.cluster.serving.policy import DEADLINE, ServingError
from llama4serve.cluster.engine.async_engine import LoopTimes
from llama4serve.cluster.errors import DataPlaneError
from llama4serve.cluster.serving.engine_streams import StreamHub
from llama4serve.cluster.serving.stream_wire import Attached, ChannelOpened, Switched, merge

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
    """A handle to the Engine deployment: `submit` calls get `lifetime`, `channel` calls get `channel`."""

    def __init__(self, lifetime, channel=None):
        self.lifetime, self.channels = lifetime, [channel] if channel is not None else []
        self.submit = self.Method(lambda: self.lifetime)
        self.channel = self.Method(lambda: self.channels.pop(0))

    class Method:
        def __init__(self, make):
            self.make = make

        def remote(self, *args):
            return self.make()

    def options(self, **_):
        return self


def test_engine_client_raises_rejections_and_deadlines():
    rejected = StubStream([Rejected("top_k is -5; allowed -1 or more")])
    with pytest.raises(ValueError, match="top_k is -5"):
        asyncio.run(collect(EngineClient(StubHandle(rejected)).generate("p", None, "a")))
    assert not rejected.cancelled  # nothing runs in the engine: nothing to cancel

    hung = StubStream([Attached("e1", False), Switched()], hang=True)
    channel = StubStream([ChannelOpened("e1"), [RequestOutput("b", [1], [5], "a")]], hang=True)
    client = EngineClient(StubHandle(hung, channel), request_timeout_s=0.2)
    outputs = []

    async def read():
        async for out in client.generate("p", None, "b"):
            outputs.append(out)

    with pytest.raises(ServingError) as err:
        asyncio.run(read())
    assert err.value.kind is DEADLINE and "0.2 s (request_timeout_s)" in err.value.message
    assert len(outputs) == 1 and hung.cancelled  # the engine request is cancelled

    done = StubStream([Attached("e1", False), Switched()])
    channel = StubStream([ChannelOpened("e1"), [DONE]])
    assert asyncio.run(collect(EngineClient(StubHandle(done, channel), 5).generate("p", None, "r"))) == [DONE]
    assert not done.cancelled


def test_engine_client_demultiplexes_one_channel_and_coalesces_what_is_ready():
    def out(rid, ids, text, finished=False, prompt=()):
        return RequestOutput(rid, list(prompt), ids, text, finished, "length" if finished else None,
                             num_generated_tokens=len(ids))

    batches = [[out("x", [1], "a", prompt=[7, 8]), out("y", [2], "b", prompt=[9])],
               [out("x", [3], "c"), out("y", [4], "d", True)], [out("x", [5], "e", True)]]
    channel = StubStream([ChannelOpened("e1")] + batches)
    handle = StubHandle(None, channel)
    handle.submit = StubHandle.Method(lambda: StubStream([Attached("e1", True)], hang=True))
    client = EngineClient(handle, request_timeout_s=5)

    async def run():
        return await asyncio.gather(collect(client.generate("p", None, "x")), collect(client.generate("p", None, "y")))

    xs, ys = asyncio.run(run())
    assert [o.token_ids for o in xs] in ([[1], [3], [5]], [[1], [3, 5]], [[1, 3], [5]], [[1, 3, 5]])
    assert "".join(o.text for o in xs) == "ace" and xs[-1].finished and xs[-1].num_generated_tokens == 1
    assert "".join(o.text for o in ys) == "bd" and ys[-1].finish_reason == "length"
    assert all(o.prompt_token_ids == [7, 8] for o in xs) and all(o.prompt_token_ids == [9] for o in ys)
    assert merge([out("x", [1], "a", prompt=[7]), out("x", [3], "c", True)]).token_ids == [1, 3]


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


class FakeStream:
    def __init__(self, notify):
        self.notify, self.pending, self.started, self.released = notify, [], False, None
        self.arrival, self.wake = time.monotonic(), asyncio.Event()

    finished = property(lambda self: any(o.finished for o in self.pending))
    num_unsent = property(lambda self: sum(len(o.token_ids) for o in self.pending))


class FakeAsyncEngine:
    """The AsyncEngine surface StreamHub uses: add / take / release, and core.failure / check_alive."""

    def __init__(self):
        self.streams, self.core = {}, self
        self.failure = None
        self.loop_times = LoopTimes()

    async def add(self, prompt, params, request_id, notify):
        if prompt == "bad":
            raise ValueError("prompt is bad")
        stream = self.streams[request_id] = FakeStream(notify)
        return stream

    def take(self, stream):
        if not stream.pending:
            return None
        stream.started, pending, stream.pending = True, stream.pending, []
        return merge(pending)  # AsyncEngine.take hands out everything new in one delta

    def release(self, stream, status="abort"):
        stream.released = status

    def check_alive(self):
        if self.failure:
            raise DataPlaneError(self.failure)

    def emit(self, request_id, ids, finished=False):
        stream = self.streams[request_id]
        stream.pending.append(RequestOutput(request_id, [1, 2], ids, "t", finished, "length" if finished else None))
        stream.wake.set()  # what AsyncEngine's loop does after a step
        stream.notify()


def test_stream_hub_batches_one_ingress_requests_and_aborts_a_closed_lifetime():
    async def run():
        engine = FakeAsyncEngine()
        hub = StreamHub(engine, linger_s=0.05)
        a, b = hub.submit("p", None, "a", "ing"), hub.submit("p", None, "b", "ing")
        assert await anext(a) == Attached(hub.replica_id, False)  # no channel yet
        channel = hub.channel("ing")
        assert await anext(channel) == ChannelOpened(hub.replica_id)
        assert await anext(hub.channel("ing")) == ChannelOpened(hub.replica_id, duplicate=True)
        assert await anext(b) == Attached(hub.replica_id, True)
        engine.emit("a", [5])
        engine.emit("b", [6])
        first = await asyncio.wait_for(anext(channel), 5)
        assert [(o.request_id, o.token_ids, o.prompt_token_ids) for o in first] == [("b", [6], [1, 2])]
        assert await asyncio.wait_for(anext(a), 5) == Switched()  # a hands over to the channel
        engine.emit("b", [8])
        second = await asyncio.wait_for(anext(channel), 5)  # one message for both requests
        assert [(o.request_id, o.token_ids, o.prompt_token_ids) for o in second] == [("a", [5], [1, 2]),
                                                                                      ("b", [8], [])]
        engine.emit("a", [7], finished=True)
        third = await asyncio.wait_for(anext(channel), 5)
        assert [(o.token_ids, o.prompt_token_ids, o.finished) for o in third] == [([7], [], True)]
        with pytest.raises(StopAsyncIteration):  # a's lifetime ends once its final delta went out
            await asyncio.wait_for(anext(a), 5)
        await b.aclose()  # the Ingress cancelled b: the engine must abort it
        assert engine.streams["b"].released == "abort" and "ing" in hub.outboxes
        with pytest.raises(StopAsyncIteration):  # no requests left: the channel ends after linger_s
            await asyncio.wait_for(anext(channel), 5)
        stats = hub.stats()
        assert "ing" not in hub.outboxes and (stats["messages"], stats["deltas"], stats["num_first"]) == (3, 4, 2)
        alone = hub.submit("p", None, "c", "ing")  # no channel: the request streams through its own call
        assert await anext(alone) == Attached(hub.replica_id, False)
        engine.emit("c", [9], finished=True)
        out = await asyncio.wait_for(anext(alone), 5)
        assert (out.token_ids, out.prompt_token_ids, out.finished) == ([9], [1, 2], True)
        with pytest.raises(StopAsyncIteration):
            await asyncio.wait_for(anext(alone), 5)
        with pytest.raises(ValueError, match="prompt is bad"):
            await anext(hub.submit("bad", None, "d", "ing"))

    asyncio.run(run())


def test_stream_interval_sends_the_first_token_at_once_then_groups_and_the_last_at_once():
    async def run():
        engine = FakeAsyncEngine()
        hub = StreamHub(engine, linger_s=0.05, stream_interval=3)
        channel, lifetime, sent = hub.channel("ing"), hub.submit("p", None, "a", "ing"), []
        await anext(channel)
        assert await anext(lifetime) == Attached(hub.replica_id, True)
        for step, ids in enumerate([[5], [6], [7], [8], [9], [10]]):
            engine.emit("a", ids, finished=step == 5)
            if step in (0, 3, 5):  # the first token, then 6 7 8 once three are unsent, then the last at once
                sent.append([(o.token_ids, o.finished) for o in await asyncio.wait_for(anext(channel), 5)])
        assert sent == [[([5], False)], [([6, 7, 8], False)], [([9, 10], True)]]
        assert hub.stats()["messages"] == 3

    asyncio.run(run())

"""Batched streaming through the real Serve app: the tokens of concurrent streams cross the Engine -> Ingress
handle together (one channel message per engine step), each client still gets exactly its own text, and a client
that leaves aborts its request in the Engine replica."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from openai import AsyncOpenAI, OpenAI

from llama4serve.cluster.checkpoints.maker import write_checkpoint
from llama4serve.cluster.cli.serve_cmd import APP_NAME, start_serve
from llama4serve.cluster.serving.serve_config import ServeConfig
from llama4serve.protos import llama4serve_pb2 as pb, llama4serve_pb2_grpc as pb_grpc
from serve_helpers import free_port

MODEL = "tiny-scout"


@pytest.fixture(scope="module")
def server(ray_session, tmp_path_factory):
    from ray import serve

    model = write_checkpoint(tmp_path_factory.mktemp("batched") / MODEL, MODEL)
    config = ServeConfig(model=str(model), dtype="float32", http_port=free_port(), grpc_port=free_port())
    start_serve(config)
    yield config, serve.get_deployment_handle("Engine", APP_NAME)
    serve.delete(APP_NAME)
    serve.shutdown()


def _wait_until(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"{what} within {timeout_s} s")


def test_concurrent_streams_share_channel_messages_and_keep_their_own_text(server):
    config, engine = server
    url = f"http://127.0.0.1:{config.http_port}/v1"
    prompts = [f"{i} little llamas" for i in range(12)]
    plain = OpenAI(base_url=url, api_key="x", max_retries=0)
    expected = [plain.completions.create(model=MODEL, prompt=p, max_tokens=16, temperature=0, timeout=60,
                                         extra_body={"ignore_eos": True}).choices[0].text for p in prompts]
    before = engine.stream_stats.remote().result(timeout_s=30)
    client = AsyncOpenAI(base_url=url, api_key="x", max_retries=0)

    async def one(prompt):
        stream = await client.completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0,
                                                 stream=True, extra_body={"ignore_eos": True}, timeout=60)
        chunks = [c async for c in stream]
        return "".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason

    async def run():
        return await asyncio.gather(*(one(p) for p in prompts))

    results = asyncio.run(run())
    assert [text for text, _ in results] == expected
    assert all(reason == "length" for _, reason in results)
    after = engine.stream_stats.remote().result(timeout_s=30)
    messages, deltas = after["messages"] - before["messages"], after["deltas"] - before["deltas"]
    assert deltas >= 12 and messages * 3 <= deltas, (messages, deltas)  # 12 streams: many deltas per message


def _running(engine) -> int:
    return engine.stats.remote().result(timeout_s=30)["num_requests_running"]


def test_a_client_that_leaves_aborts_its_request_in_the_engine(server):
    config, engine = server
    long = {"max_tokens": 3000, "extra_body": {"ignore_eos": True}}  # far longer than the test waits

    async def leave_http():
        client = AsyncOpenAI(base_url=f"http://127.0.0.1:{config.http_port}/v1", api_key="x", max_retries=0)
        stream = await client.completions.create(model=MODEL, prompt="Go on", stream=True, timeout=60, **long)
        async for _ in stream:
            break
        await stream.close()

    asyncio.run(leave_http())
    _wait_until(lambda: _running(engine) == 0, 20, "the HTTP request was not aborted")

    stub = pb_grpc.Llama4ServeStub(grpc.insecure_channel(f"127.0.0.1:{config.grpc_port}"))
    call = stub.GenerateStream(pb.GenerateRequest(text="Go on", max_tokens=3000, ignore_eos=True), timeout=60)
    next(call)
    assert _running(engine) == 1
    call.cancel()
    _wait_until(lambda: _running(engine) == 0, 20, "the gRPC request was not aborted")
    # the channel still serves new requests after the aborts
    reply = stub.Generate(pb.GenerateRequest(text="Go on", max_tokens=4, ignore_eos=True), timeout=60)
    assert len(reply.token_ids) == 4


def test_two_engine_replicas_serve_every_stream_with_or_without_a_channel_there(server):
    config, engine = server
    url = f"http://127.0.0.1:{config.http_port}/v1"
    prompts = [f"{i} alpacas" for i in range(8)]
    plain = OpenAI(base_url=url, api_key="x", max_retries=0)
    expected = [plain.completions.create(model=MODEL, prompt=p, max_tokens=8, temperature=0, timeout=60).choices[0].text
                for p in prompts]
    start_serve(config.model_copy(update={"num_replicas": 2}))  # redeploys the app in place, now with 2 Engines
    _wait_until(lambda: _engine_replicas() == 2, 300, "the second Engine replica did not start")
    client = AsyncOpenAI(base_url=url, api_key="x", max_retries=0)

    async def one(prompt):
        stream = await client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0,
                                                 stream=True, timeout=120)
        return "".join([c.choices[0].text async for c in stream])

    async def run():
        return await asyncio.gather(*(one(p) for p in prompts * 2))

    assert asyncio.run(run()) == expected * 2


def _engine_replicas() -> int:
    from ray import serve

    status = serve.status().applications[APP_NAME]
    return status.deployments["Engine"].replica_states.get("RUNNING", 0) if status.status == "RUNNING" else 0


def test_stream_interval_sends_the_first_token_alone_then_groups_with_the_same_text(server):
    """stream_interval 3 (redeployed with one Engine replica): SSE events of 1, 3, 3, 3 tokens, text and
    logprobs alike, and the text of the same request without streaming."""
    config, _ = server
    plain = OpenAI(base_url=f"http://127.0.0.1:{config.http_port}/v1", api_key="x", max_retries=0)
    request = dict(model=MODEL, prompt="3 little llamas", max_tokens=10, temperature=0, logprobs=1, timeout=120,
                   extra_body={"ignore_eos": True})
    expected = plain.completions.create(**request).choices[0]
    start_serve(config.model_copy(update={"stream_interval": 3}))
    _wait_until(lambda: _engine_replicas() == 1, 300, "the redeployed Engine replica did not start")
    chunks = [c.choices[0] for c in plain.completions.create(stream=True, **request) if c.choices]
    assert [len(c.logprobs.tokens) for c in chunks] == [1, 3, 3, 3]
    assert "".join(c.text for c in chunks) == expected.text and chunks[-1].finish_reason == "length"
    assert [t for c in chunks for t in c.logprobs.tokens] == expected.logprobs.tokens

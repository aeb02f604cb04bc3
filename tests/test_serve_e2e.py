"""The Serve application end to end: real Ray Serve HTTP and gRPC proxies on loopback, the official `openai`
client, gRPC stubs built from the .proto, an API key, and the same tokens as `LLM.generate`."""

from __future__ import annotations

import asyncio
import json
import socket

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from openai import AsyncOpenAI, AuthenticationError, BadRequestError, NotFoundError, OpenAI

from llama4serve.cluster import LLM, SamplingParams
from llama4serve.cluster.checkpoint_maker import write_checkpoint
from llama4serve.cluster.serve_cli import APP_NAME, start_serve
from llama4serve.cluster.serve_config import ServeConfig
from llama4serve.protos import llama4serve_pb2 as pb, llama4serve_pb2_grpc as pb_grpc

KEY = "test-key-123"
PROMPT = "The quick brown fox"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(ray_session, tmp_path_factory):
    from ray import serve

    model = write_checkpoint(tmp_path_factory.mktemp("serve") / "tiny-maverick", "tiny-maverick")
    with LLM(model, dtype="float32") as llm:
        greedy = llm.generate(PROMPT, SamplingParams(max_tokens=12, temperature=0))[0]
        scored = llm.generate(PROMPT, SamplingParams(max_tokens=0, prompt_logprobs=True))[0]
    config = ServeConfig(model=str(model), dtype="float32", api_key=KEY, http_port=_free_port(),
                         grpc_port=_free_port(), max_request_bytes=16384, max_model_len=1024)
    start_serve(config)
    yield config, greedy, scored
    serve.delete(APP_NAME)
    serve.shutdown()


def _openai(config: ServeConfig, key: str = KEY) -> OpenAI:
    return OpenAI(base_url=f"http://127.0.0.1:{config.http_port}/v1", api_key=key, max_retries=0)


def _stub(config: ServeConfig) -> pb_grpc.Llama4ServeStub:
    return pb_grpc.Llama4ServeStub(grpc.insecure_channel(f"127.0.0.1:{config.grpc_port}"))


AUTH = [("authorization", f"Bearer {KEY}")]


def test_completions_match_llm_generate(server):
    config, greedy, _ = server
    client = _openai(config)
    out = client.completions.create(model="tiny-maverick", prompt=PROMPT, max_tokens=12, temperature=0)
    assert out.choices[0].text == greedy.text
    assert out.usage.prompt_tokens == len(greedy.prompt_token_ids) and out.usage.completion_tokens == 12
    streamed = client.completions.create(model="tiny-maverick", prompt=PROMPT, max_tokens=12, temperature=0,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed) == greedy.text


def test_chat_streaming_and_not(server):
    config, _, _ = server
    client = _openai(config)
    messages = [{"role": "user", "content": "Hello there"}]
    whole = client.chat.completions.create(model="tiny-maverick", messages=messages, max_tokens=10, temperature=0)
    chunks = list(client.chat.completions.create(model="tiny-maverick", messages=messages, max_tokens=10,
                                                 temperature=0, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content and whole.choices[0].message.role == "assistant"
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_echo_scoring_returns_prompt_logprobs(server):
    config, _, scored = server
    out = _openai(config).completions.create(model="tiny-maverick", prompt=PROMPT, echo=True, logprobs=1,
                                             max_tokens=0)
    got = out.choices[0].logprobs.token_logprobs
    assert got[0] is None and len(got) == len(scored.prompt_logprobs)
    assert got[1:] == pytest.approx(scored.prompt_logprobs[1:], abs=1e-5)


def test_grpc_unary_streaming_and_health(server):
    config, greedy, _ = server
    stub = _stub(config)
    request = pb.GenerateRequest(text=PROMPT, max_tokens=12, temperature=0)
    reply = stub.Generate(request, metadata=AUTH, timeout=60)
    assert list(reply.token_ids) == greedy.token_ids and reply.text == greedy.text
    deltas = list(stub.GenerateStream(request, metadata=AUTH, timeout=60))
    assert [t for d in deltas for t in d.token_ids] == greedy.token_ids
    health = health_pb2_grpc.HealthStub(grpc.insecure_channel(f"127.0.0.1:{config.grpc_port}"))
    assert health.Check(health_pb2.HealthCheckRequest(), timeout=30).status == health_pb2.HealthCheckResponse.SERVING


def test_32_concurrent_streaming_clients_complete(server):
    config, greedy, _ = server
    client = AsyncOpenAI(base_url=f"http://127.0.0.1:{config.http_port}/v1", api_key=KEY, max_retries=0)

    async def one(i):
        stream = await client.completions.create(model="tiny-maverick", prompt=PROMPT if i % 2 == 0 else f"{i} x",
                                                 max_tokens=12, temperature=0, stream=True)
        return i, "".join([c.choices[0].text async for c in stream])

    async def run():
        return await asyncio.gather(*(one(i) for i in range(32)))

    results = asyncio.run(run())
    assert all(text == greedy.text for i, text in results if i % 2 == 0)
    assert all(text for _, text in results)


def _raw(config: ServeConfig, body, headers=None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json", **(headers or {})}
    data = body if isinstance(body, (str, bytes)) else json.dumps(body)
    return httpx.post(f"http://127.0.0.1:{config.http_port}/v1/completions", content=data, headers=headers, timeout=60)


@pytest.mark.parametrize("body, headers, status, words", [
    ("{not json", None, 400, "JSON"),
    ({"model": "tiny-maverick", "prompt": "x", "max_tokens": "ten"}, None, 400, "max_tokens"),
    ({"model": "nope", "prompt": "x"}, None, 404, "nope"),
    ({"model": "tiny-maverick", "prompt": "x", "max_tokens": -1}, None, 400, "max_tokens"),
    ({"model": "tiny-maverick", "prompt": "x", "temperature": -0.5}, None, 400, "temperature"),
    ({"model": "tiny-maverick", "prompt": "x", "n": 1000}, None, 400, "n"),
    ({"model": "tiny-maverick", "prompt": [7] * 70000}, None, 413, "bytes"),
    ({"model": "tiny-maverick", "prompt": "x"}, {"Authorization": "Bearer wrong"}, 401, "API key"),
])
def test_bad_http_input_gets_a_clear_4xx_and_the_server_keeps_serving(server, body, headers, status, words):
    config, greedy, _ = server
    response = _raw(config, body, headers)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) >= {"message", "type", "param", "code"} and words.lower() in error["message"].lower()
    ok = _openai(config).completions.create(model="tiny-maverick", prompt=PROMPT, max_tokens=12, temperature=0)
    assert ok.choices[0].text == greedy.text


def test_prompt_too_long_and_missing_key_through_the_openai_client(server):
    config, _, _ = server
    client = _openai(config)
    with pytest.raises(BadRequestError, match="max_model_len"):
        client.completions.create(model="tiny-maverick", prompt=[5] * 1500, max_tokens=1)
    with pytest.raises(BadRequestError, match="messages"):
        client.chat.completions.create(model="tiny-maverick", messages=[])
    with pytest.raises(BadRequestError, match="role"):
        client.chat.completions.create(model="tiny-maverick", messages=[{"role": "wizard", "content": "x"}])
    with pytest.raises(NotFoundError):
        client.completions.create(model="other", prompt="x")
    with pytest.raises(AuthenticationError):
        _openai(config, key="not-the-key").completions.create(model="tiny-maverick", prompt="x")
    missing = httpx.post(f"http://127.0.0.1:{config.http_port}/v1/completions", json={"model": "tiny-maverick",
                         "prompt": "x"}, timeout=60)
    assert missing.status_code == 401 and KEY not in missing.text


def test_grpc_bad_input_is_invalid_argument(server):
    config, greedy, _ = server
    stub = _stub(config)
    with pytest.raises(grpc.RpcError) as missing:
        stub.Generate(pb.GenerateRequest(max_tokens=4), metadata=AUTH, timeout=30)
    assert missing.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "text, token_ids, messages" in missing.value.details()
    with pytest.raises(grpc.RpcError) as bad:
        stub.Generate(pb.GenerateRequest(text="x", temperature=-1), metadata=AUTH, timeout=30)
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "temperature" in bad.value.details()
    with pytest.raises(grpc.RpcError) as unauthenticated:
        stub.Generate(pb.GenerateRequest(text="x"), timeout=30)
    assert unauthenticated.value.code() == grpc.StatusCode.UNAUTHENTICATED
    reply = stub.Generate(pb.GenerateRequest(text=PROMPT, max_tokens=12, temperature=0), metadata=AUTH, timeout=60)
    assert list(reply.token_ids) == greedy.token_ids

"""The Serve application end to end: real Ray Serve HTTP and gRPC proxies on loopback, the official `openai`
client, gRPC stubs built from the .proto, an API key, and the same tokens as `LLM.generate`."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import time

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from openai import AsyncOpenAI, AuthenticationError, BadRequestError, NotFoundError, OpenAI

from llama4serve.cluster import LLM, SamplingParams
from llama4serve.cluster.checkpoints.maker import write_checkpoint
from llama4serve.cluster.cli.serve_cmd import APP_NAME, start_serve
from llama4serve.cluster.serving.serve_config import ServeConfig
from llama4serve.protos import llama4serve_pb2 as pb, llama4serve_pb2_grpc as pb_grpc
from serve_helpers import listening_hosts, log_offsets, logs_since, non_loopback_ip

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


LOOPBACK = {"127.0.0.1", "::ffff:127.0.0.1"}


def test_grpc_listens_on_the_http_host_only(server):
    """start_serve's host (127.0.0.1 by default) binds gRPC as it binds HTTP: not reachable from the network."""
    config, _, _ = server
    for port in (config.grpc_port, config.http_port):
        hosts = listening_hosts(port)
        assert hosts and hosts <= LOOPBACK, (port, hosts)
    ip = non_loopback_ip()
    if ip is not None:  # this machine's own network address
        for port in (config.grpc_port, config.http_port):
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection((ip, port), timeout=10).close()
    health = health_pb2_grpc.HealthStub(grpc.insecure_channel(f"127.0.0.1:{config.grpc_port}"))
    assert health.Check(health_pb2.HealthCheckRequest(), timeout=30).status == health_pb2.HealthCheckResponse.SERVING


def test_client_errors_are_logged_in_one_info_line(server):
    """Serve's logs (Engine and Ingress replicas, proxy) get no ERROR and no traceback for client mistakes that
    the engine detects (a too-long prompt) or the ingress does (a bad temperature), over HTTP and gRPC."""
    config, _, _ = server
    stub = _stub(config)
    offsets = log_offsets()
    too_long = pb.GenerateRequest(token_ids=pb.TokenIds(ids=[5] * 1500), max_tokens=1)
    assert _raw(config, {"model": "tiny-maverick", "prompt": [5] * 1500, "max_tokens": 1}).status_code == 400
    for request in (too_long, pb.GenerateRequest(text="x", temperature=5)):
        for call in (stub.Generate, lambda *a, **k: list(stub.GenerateStream(*a, **k))):
            with pytest.raises(grpc.RpcError) as info:
                call(request, metadata=AUTH, timeout=60)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    time.sleep(2)  # let the replicas' and the proxy's log handlers write
    logs = logs_since(offsets)
    text = "\n".join(logs.values())
    assert not re.search(r"^(ERROR|WARNING)|Traceback", text, re.M), text[-3000:]
    engine = "".join(t for name, t in logs.items() if "Engine" in name)
    assert len(re.findall(r"^INFO .* rejected: prompt has 1500 tokens; .*at most 1024", engine, re.M)) == 3
    assert re.search(r"^INFO .*INVALID_ARGUMENT: temperature is 5; allowed 0\.\.2", text, re.M)

"""Errors and limits through the real servers: Ray Serve's HTTP and gRPC proxies on loopback, httpx for raw JSON,
the generated gRPC stubs. Each row of the error table (policy.ERRORS) answers the same over both protocols: bad
input 400 / INVALID_ARGUMENT, unknown model 404 / NOT_FOUND, a full server 429 / RESOURCE_EXHAUSTED (one bound
for both), request_timeout_s 504 / DEADLINE_EXCEEDED, a killed data-plane actor 503 / UNAVAILABLE (last: it takes
the instance down)."""

from __future__ import annotations

import base64
import json
from concurrent.futures import ThreadPoolExecutor

import grpc
import httpx
import pytest
import ray

from llama4serve.cluster.checkpoints.maker import write_checkpoint
from llama4serve.cluster.cli.serve_cmd import APP_NAME, start_serve
from llama4serve.cluster.serving.serve_config import ServeConfig
from llama4serve.protos import llama4serve_pb2 as pb, llama4serve_pb2_grpc as pb_grpc
from serve_helpers import free_port

MODEL = "tiny-maverick"
KEY = "errors-key"
AUTH = [("authorization", f"Bearer {KEY}")]
TIMEOUT_S = 8.0  # request_timeout_s: ordinary requests here take well under a second
MAX_MODEL_LEN = 8192
LONG = 8000  # tokens: two at once take 52 s on this 2-core machine (2000 took 9.6 s: too close to TIMEOUT_S)


@pytest.fixture(scope="module")
def server(ray_session, tmp_path_factory):
    from ray import serve

    model = write_checkpoint(tmp_path_factory.mktemp("serve-errors") / MODEL, MODEL)
    config = ServeConfig(model=str(model), dtype="float32", api_key=KEY, http_port=free_port(), grpc_port=free_port(),
                         max_model_len=MAX_MODEL_LEN, max_queued_requests=2, request_timeout_s=TIMEOUT_S,
                         collective_timeout_s=30, max_actor_restarts=0)  # a killed actor takes it down
    start_serve(config)
    yield config
    serve.delete(APP_NAME)
    serve.shutdown()


def post(config, path: str, body, timeout: float = 60) -> httpx.Response:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(f"http://127.0.0.1:{config.http_port}{path}", content=data, timeout=timeout,
                      headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})


def stub(config) -> pb_grpc.Llama4ServeStub:
    return pb_grpc.Llama4ServeStub(grpc.insecure_channel(f"127.0.0.1:{config.grpc_port}"))


def rpc_error(call, *args, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        result = call(*args, metadata=AUTH, timeout=60, **kwargs)
        list(result) if not isinstance(result, pb.GenerateResponse) else result
    return info.value


def assert_one_clean_line(message: str) -> None:
    assert message and "\n" not in message, message
    for leak in ("\x1b", "pid=", "Traceback", 'File "', "object at 0x"):
        assert leak not in message, message


CHAT = [{"role": "user", "content": "hi"}]
LIMITS = [  # (HTTP path, JSON fields, the same over gRPC, the message both send)
    ("/v1/completions", {"temperature": 100}, pb.GenerateRequest(text="x", temperature=100), "temperature is 100"),
    ("/v1/completions", {"top_p": 1.5}, pb.GenerateRequest(text="x", top_p=1.5), "top_p is 1.5; allowed (0, 1]"),
    ("/v1/completions", {"max_tokens": 2**31 - 1}, pb.GenerateRequest(text="x", max_tokens=2**31 - 1),
     "max_tokens is 2147483647; this deployment accepts at most 8192 (max_model_len, prompt included)"),
    ("/v1/completions", {"stop": ["s"] * 1000}, pb.GenerateRequest(text="x", stop=["s"] * 1000),
     "stop has 1000 strings; at most 16 are allowed"),
    ("/v1/completions", {"logprobs": 21}, pb.GenerateRequest(text="x", logprobs=21), "logprobs is 21"),
    ("/v1/completions", {"repetition_penalty": 11}, pb.GenerateRequest(text="x", repetition_penalty=11),
     "repetition_penalty is 11; allowed (0, 10] (1 is off)"),
    ("/v1/chat/completions", {"messages": [{"role": "function", "content": "x"}]},
     pb.GenerateRequest(messages=[pb.ChatMessage(role="function", content="x")]), "messages[0].role is 'function'"),
]


@pytest.mark.parametrize("path, fields, request_, words", LIMITS, ids=[c[3].split(";")[0] for c in LIMITS])
def test_same_bad_value_same_message_over_http_and_grpc(server, path, fields, request_, words):
    base = {"model": MODEL, **({"messages": CHAT} if "chat" in path else {"prompt": "x"})}
    reply = post(server, path, {**base, **fields})
    assert reply.status_code == 400, reply.text
    message = reply.json()["error"]["message"]
    assert message.startswith(words)
    for call in (stub(server).Generate, stub(server).GenerateStream):
        error = rpc_error(call, request_)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and error.details() == message


def test_unknown_model_and_missing_key_over_both(server):
    missing = post(server, "/v1/completions", {"model": "gpt-4", "prompt": "x"})
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
    assert rpc_error(stub(server).Generate, pb.GenerateRequest(text="x", model="gpt-4")).code() == \
        grpc.StatusCode.NOT_FOUND
    no_key = httpx.post(f"http://127.0.0.1:{server.http_port}/v1/completions", json={"model": MODEL, "prompt": "x"})
    assert no_key.status_code == 401 and KEY not in no_key.text
    with pytest.raises(grpc.RpcError) as info:
        list(stub(server).GenerateStream(pb.GenerateRequest(text="x"), timeout=60))
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED and KEY not in info.value.details()


SURROGATES = [
    ("/v1/completions", b'{"model": "tiny-maverick", "prompt": "\\ud800"}', "prompt"),
    ("/v1/completions", b'{"model": "tiny-maverick", "prompt": ["fine", "x\\udc00"]}', "prompt[1]"),
    ("/v1/chat/completions", b'{"model": "tiny-maverick", "messages": [{"role": "user", "content": "\\ud800"}]}',
     "messages[0].content"),
]


@pytest.mark.parametrize("path, body, param", SURROGATES, ids=[s[2] for s in SURROGATES])
def test_lone_surrogate_is_400_naming_the_field(server, path, body, param):
    reply = post(server, path, body)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["param"] == param and error["message"].startswith(f"{param} contains a lone surrogate")
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"


def test_whole_number_floats_are_integers(server):
    ints = {"model": MODEL, "prompt": "Hello", "temperature": 0, "seed": 1, "top_k": 0, "max_tokens": 4, "n": 1,
            "logprobs": 2}
    floats = {**ints, "seed": 1.0, "top_k": 0.0, "max_tokens": 4.0, "n": 1.0, "logprobs": 2.0}
    a, b = post(server, "/v1/completions", ints), post(server, "/v1/completions", floats)
    assert a.status_code == b.status_code == 200, b.text
    assert a.json()["choices"][0]["text"] == b.json()["choices"][0]["text"]
    assert len(b.json()["choices"][0]["logprobs"]["top_logprobs"][0]) == 2
    for field, value in [("seed", 1.5), ("max_tokens", True)]:
        bad = post(server, "/v1/completions", {**ints, field: value})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == field, bad.text


def test_bad_image_names_the_part_without_object_reprs(server):
    corrupt = b"\xff\xd8\xff" + bytes(64)  # a JPEG signature, then nothing Pillow can read
    for request_, where in [
        (pb.GenerateRequest(text="<|image|>What is it?", images=[pb.Image(data=corrupt)]), "images[0]"),
        (pb.GenerateRequest(messages=[pb.ChatMessage(role="user", parts=[
            pb.ContentPart(text="What is it?"), pb.ContentPart(image=pb.Image(data=corrupt))])]),
         "messages[0].parts[1]"),
    ]:
        error = rpc_error(stub(server).Generate, request_)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error.details().startswith(f"{where}: the JPEG data is corrupt or truncated"), error.details()
        assert_one_clean_line(error.details())
    url = "data:image/jpeg;base64," + base64.b64encode(corrupt).decode()
    reply = post(server, "/v1/chat/completions", {"model": MODEL, "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]})
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "messages[0].content[0]"
    assert_one_clean_line(reply.json()["error"]["message"])


def long_body(stream: bool) -> dict:
    return {"model": MODEL, "prompt": "Once", "max_tokens": LONG, "ignore_eos": True, "temperature": 0,
            "stream": stream}


LONG_RPC = pb.GenerateRequest(text="Once", max_tokens=LONG, ignore_eos=True, temperature=0)


def test_one_admission_bound_then_the_deadline_over_both(server):
    grpc_stream = stub(server).GenerateStream(LONG_RPC, metadata=AUTH, timeout=120)
    assert next(grpc_stream).token_ids  # admitted and generating
    with httpx.stream("POST", f"http://127.0.0.1:{server.http_port}/v1/completions", json=long_body(True),
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as http_stream:
        lines = http_stream.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
        # max_queued_requests=2 are in flight (one per protocol): both protocols refuse a third at once
        full = post(server, "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 1})
        assert full.status_code == 429 and full.headers["Retry-After"] == "1", full.text
        error = rpc_error(stub(server).Generate, pb.GenerateRequest(text="x", max_tokens=1))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and error.details() == full.json()["error"]["message"]
        # past request_timeout_s the streams end with the deadline row: an error event, DEADLINE_EXCEEDED
        events = [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["code"] == "timeout", events[-3:]
    with pytest.raises(grpc.RpcError) as info:
        list(grpc_stream)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and "request_timeout_s" in info.value.details()
    assert post(server, "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 1}).status_code == 200


def test_unary_requests_past_the_deadline(server):
    with ThreadPoolExecutor(2) as pool:
        http_reply = pool.submit(post, server, "/v1/completions", long_body(False), 120)
        rpc_reply = pool.submit(rpc_error, stub(server).Generate, LONG_RPC)
        reply, error = http_reply.result(), rpc_reply.result()
    assert reply.status_code == 504 and reply.json()["error"]["type"] == "server_error", reply.text
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED and error.details() == reply.json()["error"]["message"]
    assert f"{TIMEOUT_S:g} s (request_timeout_s)" in error.details()


def test_killed_data_plane_actor_is_503_and_unavailable(server):
    """Last in this module: the instance is down afterwards (Serve replaces the replica within a health check)."""
    actors = [a for a in ray.util.list_named_actors(all_namespaces=True)
              if a["name"] == "attention-0" and a["namespace"].startswith("llama4serve-")]
    assert len(actors) == 1, actors
    ray.kill(ray.get_actor("attention-0", namespace=actors[0]["namespace"]))
    with ThreadPoolExecutor(2) as pool:  # both at once, before Serve's health check replaces the replica
        http_reply = pool.submit(post, server, "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 4})
        rpc_reply = pool.submit(rpc_error, stub(server).Generate, pb.GenerateRequest(text="x", max_tokens=4))
        reply, error = http_reply.result(), rpc_reply.result()
    assert reply.status_code == 503, reply.text
    assert error.code() == grpc.StatusCode.UNAVAILABLE, error.details()
    for message in (reply.json()["error"]["message"], error.details()):
        assert message.startswith("the model instance is unavailable (") and "retry later" in message
        assert_one_clean_line(message)

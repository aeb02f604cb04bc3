"""The one error table and the one limits table, from both protocols, in process (no Ray cluster): the FastAPI
app through httpx, the gRPC servicer methods the way Serve's proxy calls them. The same failure or bad value
must give the same one-line message over HTTP and gRPC; real servers are in test_serve_errors.py."""

from __future__ import annotations

import asyncio
import base64
import logging
import traceback

import grpc
import httpx
import pytest
from ray.exceptions import ActorDiedError, RayTaskError
from ray.serve.exceptions import BackPressureError, gRPCStatusError

from grpc_context import context

from llama4serve.cluster.errors import DataPlaneError
from llama4serve.cluster.serving.grpc.service import GrpcIngressMixin
from llama4serve.cluster.serving.openai.api import build_fastapi_app
from llama4serve.cluster.outputs import RequestOutput
from llama4serve.cluster.serving.policy import (BAD_INPUT, DEADLINE, UNAVAILABLE, Admission, QuietClientErrors,
                                                ServingError, one_line)
from llama4serve.protos import llama4serve_pb2 as pb

MODEL = "tiny"


class Server(GrpcIngressMixin):
    """One ingress for both protocols, as cluster/serving/ingress.py's: a ServingContext and a GrpcIngressHost."""

    model_name, max_model_len, tokenizer, max_request_bytes, max_n = MODEL, 64, None, 1 << 20, 4
    max_images_per_request, max_image_bytes = 2, 1 << 16

    def __init__(self, error: BaseException | None = None, api_key: str | None = None, limit: int = 4):
        self.error, self.api_key, self.calls = error, api_key, []
        self.admission = Admission(limit)
        self.max_queued_requests = limit
        self.engine = self

    async def generate(self, prompt, params, request_id):
        self.calls.append((prompt, params))
        if self.error is not None:
            raise self.error
        lps = [-0.5] if params.logprobs is not None else None
        top = [[(5, -0.5)] * params.logprobs] if params.logprobs else None
        yield RequestOutput(request_id, [1, 2], [5], "a", True, "length", lps, top, None, 1)

    async def abort(self, request_id):
        pass

    async def check_health(self):
        pass


def http(server: Server, path: str, body, key: str | None = None) -> httpx.Response:
    async def go():
        transport = httpx.ASGITransport(app=build_fastapi_app(server))
        headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.post(path, content=body if isinstance(body, bytes) else None,
                                     json=None if isinstance(body, bytes) else body, headers=headers)
    return asyncio.run(go())


def rpc(server: Server, request: pb.GenerateRequest, metadata=(), stream=False):
    """(code, details) of one Generate or GenerateStream call."""
    ctx = context(metadata)

    async def go():
        if stream:
            with pytest.raises(ServingError):
                _ = [m async for m in server.GenerateStream(request, ctx)]
        else:
            assert await server.Generate(request, ctx) == pb.GenerateResponse()
    asyncio.run(go())
    return ctx.code(), ctx.details()


def remote(error: Exception) -> Exception:
    """`error` as a DeploymentHandle raises it from another replica: a RayTaskError with a coloured traceback."""
    try:
        raise error
    except Exception as e:
        wrapped = RayTaskError("Engine.generate", traceback.format_exc(), e, proctitle="ray::Engine", pid=4321,
                               ip="10.1.2.3")
    return wrapped.as_instanceof_cause()


DOWN = DataPlaneError("data-plane actor failed: The actor died unexpectedly before finishing this task.\n"
                      "\tclass_name: AttentionActor\n\tpid: 4321\n\tip: 10.1.2.3")
ROWS = [  # (case, exception out of the engine, HTTP status, gRPC code, words of the one-line message)
    ("bad input", ValueError("prompt has 90 tokens; this deployment accepts at most 64 (max_model_len)"), 400,
     "INVALID_ARGUMENT", "prompt has 90 tokens"),
    ("remote bad input", remote(ValueError("prompt has 90 tokens")), 400, "INVALID_ARGUMENT", "prompt has 90"),
    ("bad image", remote(ValueError("images[0]: the JPEG data is corrupt or truncated (cannot identify image "
                                    "file <_io.BytesIO object at 0x7f3ddc4138d0>)")), 400, "INVALID_ARGUMENT",
     "images[0]: the JPEG data is corrupt or truncated (cannot identify image file)"),
    ("server full", BackPressureError(num_queued_requests=9, max_queued_requests=9), 429, "RESOURCE_EXHAUSTED",
     "queue is full"),
    ("instance down", remote(DOWN), 503, "UNAVAILABLE", "data-plane actor failed: The actor died unexpectedly"),
    ("replica died", ActorDiedError(), 503, "UNAVAILABLE", "actor died"),
    ("deadline", ServingError(DEADLINE, "the request did not finish within 5 s (request_timeout_s)"), 504,
     "DEADLINE_EXCEEDED", "request_timeout_s"),
    ("timeout", TimeoutError("step timed out"), 504, "DEADLINE_EXCEEDED", "step timed out"),
    ("bug", remote(RuntimeError("kaboom")), 500, "INTERNAL", "RuntimeError: kaboom"),
]


@pytest.mark.parametrize("case, error, status, code, words", ROWS, ids=[r[0] for r in ROWS])
def test_each_row_of_the_error_table_over_both_protocols(case, error, status, code, words):
    reply = http(Server(error), "/v1/completions", {"model": MODEL, "prompt": [1, 2]})
    assert reply.status_code == status, reply.text
    body = reply.json()["error"]
    assert body["type"] == ("server_error" if status >= 500 else "rate_limit_error" if status == 429
                            else "invalid_request_error")
    for stream in (False, True):
        got_code, details = rpc(Server(error), pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, 2])), stream=stream)
        assert got_code == grpc.StatusCode[code] and details == body["message"]
    message = body["message"]
    assert words in message and message == one_line(message)
    for leak in ("\x1b", "pid=", "4321", "10.1.2.3", "Traceback", "File ", "object at 0x"):
        assert leak not in message, message


def test_api_key_and_one_admission_bound_for_both_protocols():
    server = Server(api_key="sk-1", limit=1)
    missing = http(server, "/v1/completions", {"model": MODEL, "prompt": [1]})
    assert missing.status_code == 401 and missing.headers["WWW-Authenticate"] == "Bearer"
    assert rpc(server, pb.GenerateRequest(text="x"))[0] == grpc.StatusCode.UNAUTHENTICATED
    assert http(server, "/v1/completions", {"model": MODEL, "prompt": [1]}, key="sk-1").status_code == 200
    assert server.admission.try_admit()  # one request in flight (either protocol) fills this server
    full = http(server, "/v1/completions", {"model": MODEL, "prompt": [1]}, key="sk-1")
    assert full.status_code == 429 and full.headers["Retry-After"] == "1"
    code, details = rpc(server, pb.GenerateRequest(text="x"), [("authorization", "Bearer sk-1")])
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and details == full.json()["error"]["message"]
    assert "max_queued_requests" in details and server.admission.in_flight == 1


G = pb.GenerateRequest
LIMITS = [  # (JSON fields, the same over gRPC, the message both must send)
    ({"temperature": 2.5}, G(temperature=2.5), "temperature is 2.5; allowed 0..2 (0 is greedy)"),
    ({"temperature": 100}, G(temperature=100), "temperature is 100; allowed 0..2 (0 is greedy)"),
    ({"top_p": 0}, G(top_p=0), "top_p is 0; allowed (0, 1]"),
    ({"top_k": -2}, G(top_k=-2), "top_k is -2; allowed an integer >= -1 (-1 or 0 is off)"),
    ({"max_tokens": -1}, G(max_tokens=-1), "max_tokens is -1; allowed an integer >= 0"),
    ({"max_tokens": 2**31 - 1}, G(max_tokens=2**31 - 1),
     "max_tokens is 2147483647; this deployment accepts at most 64 (max_model_len, prompt included)"),
    ({"logprobs": 21}, G(logprobs=21), "logprobs is 21; allowed an integer 0..20"),
    ({"seed": -1}, G(seed=-1), "seed is -1; allowed an integer 0..9223372036854775807"),
    ({"presence_penalty": 3}, G(presence_penalty=3), "presence_penalty is 3; allowed -2..2"),
    ({"frequency_penalty": -2.5}, G(frequency_penalty=-2.5), "frequency_penalty is -2.5; allowed -2..2"),
    ({"repetition_penalty": 0}, G(repetition_penalty=0), "repetition_penalty is 0; allowed (0, 10] (1 is off)"),
    ({"stop": ["s"] * 1000}, G(stop=["s"] * 1000), "stop has 1000 strings; at most 16 are allowed"),
    ({"stop": ["a", ""]}, G(stop=["a", ""]), "stop[1] is an empty string; stop strings must not be empty"),
    ({"stop_token_ids": [3, -1]}, G(stop_token_ids=[3, -1]), "stop_token_ids[1] is -1; allowed an integer >= 0"),
    ({"messages": [{"role": "function", "content": "x"}]}, G(messages=[pb.ChatMessage(role="function", content="x")]),
     "messages[0].role is 'function'; allowed 'system', 'developer', 'user', 'assistant', 'tool', 'ipython'"),
]


@pytest.mark.parametrize("fields, request_, message", LIMITS, ids=[c[2].split(";")[0] for c in LIMITS])
def test_same_bad_value_same_message_over_both_protocols(fields, request_, message):
    chat = "messages" in fields
    body = {"model": MODEL, **({} if chat else {"prompt": "x"}), **fields}
    reply = http(Server(), "/v1/chat/completions" if chat else "/v1/completions", body)
    assert reply.status_code == 400 and reply.json()["error"]["message"] == message, reply.text
    assert reply.json()["error"]["param"] == message.split(" ")[0]
    if not chat:
        request_.text = "x"
    assert rpc(Server(), request_) == (grpc.StatusCode.INVALID_ARGUMENT, message)


PNG = b"\x89PNG\r\n\x1a\n"  # the engine decodes images; these checks come first


def test_images_one_count_bound_and_mime_check_for_both_protocols():
    url = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(PNG).decode()}}
    body = {"model": MODEL, "messages": [{"role": "user", "content": [url] * 3}]}
    reply = http(Server(), "/v1/chat/completions", body)
    message = "the request has 3 images; this server accepts at most 2 (max_images_per_request)"
    assert reply.status_code == 400 and reply.json()["error"]["message"] == message, reply.text
    part = pb.ContentPart(image=pb.Image(data=PNG, mime_type="image/png"))
    request = G(messages=[pb.ChatMessage(role="user", parts=[part] * 3)])
    assert rpc(Server(), request) == (grpc.StatusCode.INVALID_ARGUMENT, message)

    gif = {"type": "image_url", "image_url": {"url": "data:image/gif;base64," + base64.b64encode(PNG).decode()}}
    reply = http(Server(), "/v1/chat/completions", {**body, "messages": [{"role": "user", "content": [gif]}]})
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "messages[0].content[0]", reply.text
    assert "'image/gif'; send image/png, image/jpeg or image/webp" in reply.json()["error"]["message"]
    request = G(messages=[pb.ChatMessage(role="user", parts=[pb.ContentPart(image=pb.Image(data=PNG,
                                                                                           mime_type="image/gif"))])])
    code, details = rpc(Server(), request)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("messages[0].parts[0].mime_type")
    assert "'image/gif'; send image/png, image/jpeg or image/webp" in details


def test_whole_number_floats_are_integers_and_booleans_are_not():
    server = Server()
    body = {"model": MODEL, "prompt": [1, 2.0], "seed": 1.0, "top_k": 0.0, "max_tokens": 16.0, "n": 1.0,
            "logprobs": 2.0, "best_of": 1.0, "stop_token_ids": [7.0]}
    assert http(server, "/v1/completions", body).status_code == 200
    prompt, params = server.calls[0]
    assert prompt == [1, 2] and (params.seed, params.top_k, params.max_tokens, params.logprobs) == (1, 0, 16, 2)
    assert all(type(v) is int for v in (params.seed, params.top_k, params.max_tokens, params.logprobs, *prompt))
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 3.0,
            "logprobs": True, "top_logprobs": 1.0}
    assert http(server, "/v1/chat/completions", chat).status_code == 200 and server.calls[1][1].max_tokens == 3
    for field, value, words in [("seed", 1.5, "fractional part (got 1.5)"), ("n", True, "not a boolean"),
                                ("max_tokens", False, "not a boolean"), ("top_k", 2.25, "fractional")]:
        reply = http(server, "/v1/completions", {"model": MODEL, "prompt": "x", field: value})
        error = reply.json()["error"]
        assert reply.status_code == 400 and error["param"] == field and words in error["message"], error
        assert error["message"].startswith(f"{field}: Input should be a valid integer")


SURROGATES = [  # raw JSON bodies: the openai client cannot send lone surrogates
    ("/v1/completions", b'{"model": "tiny", "prompt": "ab\\ud800"}', "prompt", "U+D800 at character 2"),
    ("/v1/completions", b'{"model": "tiny", "prompt": ["ok", "\\udfff"]}', "prompt[1]", "U+DFFF"),
    ("/v1/completions", b'{"model": "tiny", "prompt": "x", "stop": ["\\ud800"]}', "stop[0]", "surrogate"),
    ("/v1/chat/completions", b'{"model": "tiny", "messages": [{"role": "user", "content": "\\ud800"}]}',
     "messages[0].content", "lone surrogate"),
    ("/v1/chat/completions", b'{"model": "tiny", "messages": [{"role": "user", "content": [{"type": "text", '
                             b'"text": "\\ud83d"}]}]}', "messages[0].content[0].text", "U+D83D"),
]


@pytest.mark.parametrize("path, body, param, words", SURROGATES, ids=[s[2] for s in SURROGATES])
def test_lone_surrogates_are_400_naming_the_field(path, body, param, words):
    server = Server()
    reply = http(server, path, body)
    error = reply.json()["error"]
    assert reply.status_code == 400 and error["param"] == param and error["message"].startswith(param + " "), error
    assert words in error["message"] and server.calls == []
    assert http(server, path, body.replace(b"\\ud83d", b"\\ud83d\\ude00").replace(b"\\ud800", b"a")
                .replace(b"\\udfff", b"b")).status_code == 200  # a valid pair, plain text: served


def test_client_errors_in_serves_log_become_one_info_line(caplog):
    log = logging.getLogger("test_policy.serve")
    log.addFilter(QuietClientErrors())

    def fail(error: BaseException, wrap: bool):
        try:
            raise error
        except Exception as e:  # Serve's proxy sees the RpcError inside a gRPCStatusError
            exc = gRPCStatusError(e, grpc.StatusCode.INVALID_ARGUMENT, str(e)) if wrap else e
            try:
                raise exc
            except Exception:
                log.exception("Request failed.")

    with caplog.at_level(logging.INFO, logger="test_policy.serve"):
        fail(ServingError(BAD_INPUT, "temperature is 3; allowed 0..2"), wrap=True)
        fail(ServingError(BAD_INPUT, "top_p is 0; allowed (0, 1]"), wrap=False)
        fail(ServingError(UNAVAILABLE, "the model instance is unavailable"), wrap=True)
        fail(RuntimeError("kaboom"), wrap=False)
    quiet, loud = caplog.records[:2], caplog.records[2:]
    assert [r.levelname for r in quiet] == ["INFO", "INFO"] and not any(r.exc_info for r in quiet)
    assert quiet[0].getMessage() == "Request failed. INVALID_ARGUMENT: temperature is 3; allowed 0..2"
    assert all("Traceback" not in caplog.handler.format(r) for r in quiet)
    assert [r.levelname for r in loud] == ["ERROR", "ERROR"] and all(r.exc_info for r in loud)

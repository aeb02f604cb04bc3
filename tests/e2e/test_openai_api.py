"""Unit tier of the OpenAI-compatible HTTP API: the FastAPI app over a fake engine, in process (no Ray).

The fake engine answers every prompt with the same reply (multi-byte text, then <|eot|>), honours max_tokens,
stop strings, logprobs and prompt logprobs, and records aborts. The real tokenizer of the random checkpoints is
used, so token strings, bytes and text offsets are real. The `openai` client talks to the app through
`httpx.ASGITransport`. End-to-end tests over Ray Serve live elsewhere.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest

from llama4serve.cluster.serving.openai.api import build_fastapi_app
from llama4serve.cluster.outputs import RequestOutput
from llama4serve.cluster.inputs.tokenizer import Tokenizer
from llama4serve.cluster.checkpoints.tokenizer_files import write_tokenizer_files

MODEL = "tiny-test"
REPLY = "Héllo wörld, 你好 🙂! Done."
API_KEY = "sk-test-123"


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Tokenizer:
    root = tmp_path_factory.mktemp("tok")
    write_tokenizer_files(root, 64)
    return Tokenizer.from_dir(root)


class FakeServing:
    """A ServingContext with a deterministic in-process engine."""

    model_name = MODEL
    max_model_len = 64
    max_queued_requests = 4
    max_request_bytes = 4096
    max_n = 4

    def __init__(self, tokenizer: Tokenizer, api_key: str | None = None):
        self.tokenizer, self.api_key = tokenizer, api_key
        self.calls: list[tuple] = []
        self.aborted: list[str] = []
        self.closed_early: list[str] = []
        self.gate: asyncio.Event | None = None  # when set, tokens wait for it
        self.delay = 0.0
        self.failure: Exception | None = None
        self.healthy = True

    async def check_health(self) -> None:
        if not self.healthy:
            raise RuntimeError("attention-0 died")

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    def _ids(self, prompt) -> list[int]:
        tok = self.tokenizer
        if isinstance(prompt, str):
            return tok.encode(prompt)
        if prompt and isinstance(prompt[0], dict):
            return tok.encode(tok.apply_chat_template(prompt), add_special_tokens=False)
        return list(prompt)

    async def generate(self, prompt, params, request_id):
        self.calls.append((prompt, params, request_id))
        ids = self._ids(prompt)
        if len(ids) > self.max_model_len:
            raise ValueError(f"prompt has {len(ids)} tokens; this deployment accepts at most {self.max_model_len} "
                             "(max_model_len)")
        if self.failure is not None:
            raise self.failure
        tok = self.tokenizer
        reply = tok.encode(REPLY, add_special_tokens=False) + [tok.token_to_id("<|eot|>")]
        prompt_lps = [None] + [-0.5 - 0.01 * i for i in range(len(ids) - 1)] if params.prompt_logprobs else None
        budget = min(params.max_tokens, self.max_model_len - len(ids))
        detok, text, finished = tok.detokenizer(), "", False
        want = params.logprobs is not None
        try:
            if budget == 0:
                finished = True
                yield RequestOutput(request_id, ids, [], "", True, "length", [] if want else None,
                                    [] if params.logprobs else None, prompt_lps, 0)
                return
            for k in range(budget):
                if self.gate is not None:
                    await self.gate.wait()
                await asyncio.sleep(self.delay)
                token = reply[k % len(reply)]
                delta = detok.add([token])
                reason = "length" if k + 1 == budget else None
                if token == reply[-1] and not params.ignore_eos:
                    delta, reason = delta + detok.flush(), "stop"
                for stop in params.stop:
                    if stop in text + delta:
                        delta, reason = (text + delta)[: (text + delta).index(stop)][len(text):], "stop"
                if reason == "length":
                    delta += detok.flush()
                text += delta
                lp = -0.1 * (k + 1)
                top = [[(token, lp)] + [((token + j) % 500, lp - j) for j in range(1, params.logprobs)]] \
                    if params.logprobs else None
                finished = reason is not None
                yield RequestOutput(request_id, ids, [token], delta, finished, reason, [lp] if want else None, top,
                                    prompt_lps if k == 0 else None, k + 1)
                if finished:
                    return
        finally:
            if not finished:
                self.closed_early.append(request_id)


def run(coro):
    return asyncio.run(coro)


def make_client(app, api_key: str | None = None) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test", headers=headers)


def make_openai(app, api_key: str = API_KEY) -> openai.AsyncOpenAI:
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app))
    return openai.AsyncOpenAI(base_url="http://test/v1", api_key=api_key, http_client=http, max_retries=0)


def sse_events(text: str) -> list:
    events = [block.removeprefix("data: ") for block in text.split("\n\n") if block]
    assert events[-1] == "[DONE]", events[-3:]
    return [json.loads(e) for e in events[:-1]]


@pytest.fixture
def serving(tokenizer) -> FakeServing:
    return FakeServing(tokenizer, api_key=API_KEY)


@pytest.fixture
def app(serving):
    return build_fastapi_app(serving)


def reply_prefix(tokenizer, n: int) -> str:
    return tokenizer.decode(tokenizer.encode(REPLY, add_special_tokens=False)[:n])


# ---------------------------------------------------------------- happy paths through the openai client


def test_completion_with_openai_client(app, serving, tokenizer):
    async def go():
        client = make_openai(app)
        result = await client.completions.create(model=MODEL, prompt="Hello", max_tokens=5, temperature=0)
        streamed = await client.completions.create(model=MODEL, prompt="Hello", max_tokens=5, temperature=0,
                                                   stream=True, stream_options={"include_usage": True})
        return result, [chunk async for chunk in streamed]

    result, chunks = run(go())
    prompt_tokens = len(tokenizer.encode("Hello"))
    assert result.object == "text_completion" and result.model == MODEL
    assert result.choices[0].text == reply_prefix(tokenizer, 5)
    assert result.choices[0].finish_reason == "length" and result.choices[0].logprobs is None
    assert (result.usage.prompt_tokens, result.usage.completion_tokens) == (prompt_tokens, 5)
    assert result.usage.total_tokens == prompt_tokens + 5
    assert "".join(c.choices[0].text for c in chunks if c.choices) == result.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5
    assert serving.calls[0][1].temperature == 0 and serving.calls[0][1].max_tokens == 5


def test_completion_shapes_validate_against_openai_types(app, tokenizer):
    async def go():
        async with make_client(app, API_KEY) as client:
            body = {"model": MODEL, "prompt": "Hi", "max_tokens": 40, "logprobs": 2}
            return (await client.post("/v1/completions", json=body)).json()

    data = run(go())
    completion = openai.types.Completion.model_validate(data)
    choice = completion.choices[0]
    assert choice.text == REPLY and choice.finish_reason == "stop"  # the reply ends with <|eot|>
    lp = choice.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset)
    assert lp.tokens[-1] == "<|eot|>" and lp.text_offset[-1] == len(REPLY)  # special tokens add no text
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    assert all(len(top) == 2 and tok in top for tok, top in zip(lp.tokens, lp.top_logprobs))
    assert any(t.startswith("bytes:\\x") for t in lp.tokens)  # a token holding part of a multi-byte character
    assert completion.usage.completion_tokens == len(lp.tokens)


def test_chat_with_openai_client(app, serving, tokenizer):
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]}]

    async def go():
        client = make_openai(app)
        result = await client.chat.completions.create(model=MODEL, messages=messages, n=2, seed=7,
                                                      logprobs=True, top_logprobs=3)
        streamed = await client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, stream=True,
                                                        stream_options={"include_usage": True})
        return result, [chunk async for chunk in streamed]

    result, chunks = run(go())
    prompt_ids = tokenizer.encode(tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."},
         {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]}]),
        add_special_tokens=False)
    assert result.object == "chat.completion" and len(result.choices) == 2
    assert [c.index for c in result.choices] == [0, 1]
    assert [serving.calls[i][1].seed for i in range(2)] == [7, 8]
    for choice in result.choices:
        assert choice.message.role == "assistant" and choice.message.content == REPLY
        assert choice.finish_reason == "stop"
        content = choice.logprobs.content
        assert b"".join(bytes(e.bytes) for e in content).decode() == REPLY + "<|eot|>"
        assert all(len(e.top_logprobs) == 3 for e in content)
    assert result.usage.prompt_tokens == len(prompt_ids)  # counted once
    assert result.usage.completion_tokens == 2 * len(result.choices[0].logprobs.content)

    assert chunks[0].object == "chat.completion.chunk"
    assert chunks[0].choices[0].delta.role == "assistant"
    with_choices = [c for c in chunks if c.choices]
    assert with_choices[-1].choices[0].finish_reason == "length"
    assert all(c.choices[0].finish_reason is None for c in with_choices[:-1])
    assert "".join(c.choices[0].delta.content or "" for c in with_choices) == reply_prefix(tokenizer, 4)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 4
    assert chunks[-1].usage.prompt_tokens == len(prompt_ids)


def test_echo_logprobs_scoring(app, serving, tokenizer):
    prompt = "The llama 🦙 eats"

    async def go():
        client = make_openai(app)
        return await client.completions.create(model=MODEL, prompt=prompt, echo=True, logprobs=1, max_tokens=0)

    result = run(go())
    ids = tokenizer.encode(prompt)
    choice = result.choices[0]
    assert serving.calls[0][1].prompt_logprobs == 1  # echo + logprobs=1: one alternative per prompt position
    assert choice.text == prompt and choice.finish_reason == "length"
    lp = choice.logprobs
    assert len(lp.tokens) == len(ids) and lp.tokens[0] == "<|begin_of_text|>"
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.token_logprobs[1:] == pytest.approx([-0.5 - 0.01 * i for i in range(len(ids) - 1)])
    assert lp.text_offset[0] == 0 and lp.text_offset[1] == 0 and max(lp.text_offset) < len(prompt)
    assert (result.usage.prompt_tokens, result.usage.completion_tokens) == (len(ids), 0)


def test_echo_streaming_and_token_id_prompts(app, tokenizer):
    ids = tokenizer.encode("Hello there")

    async def go():
        async with make_client(app, API_KEY) as client:
            body = {"model": MODEL, "prompt": [ids, ids[1:]], "echo": True, "max_tokens": 3, "stream": True, "n": 2}
            return (await client.post("/v1/completions", json=body)).text

    events = sse_events(run(go()))
    texts: dict[int, str] = {}
    for event in events:
        openai.types.Completion.model_validate({**event, "choices": [
            {**c, "finish_reason": c["finish_reason"] or "stop"} for c in event["choices"]]})
        for c in event["choices"]:
            texts[c["index"]] = texts.get(c["index"], "") + c["text"]
    assert sorted(texts) == [0, 1, 2, 3]  # prompt p, choice i -> index p * n + i
    assert texts[0] == texts[1] == "Hello there" + reply_prefix(tokenizer, 3)


def test_batch_prompts_usage_and_stop(app, serving, tokenizer):
    async def go():
        client = make_openai(app)
        return await client.completions.create(model=MODEL, prompt=["a b", "c d e"], n=2, max_tokens=30,
                                               stop=["ld"])

    result = run(go())
    assert len(result.choices) == 4
    assert [(c.text, c.finish_reason) for c in result.choices] == [("Héllo wör", "stop")] * 4
    prompt_tokens = len(tokenizer.encode("a b")) + len(tokenizer.encode("c d e"))
    assert result.usage.prompt_tokens == prompt_tokens  # each prompt once, not once per choice
    assert result.usage.completion_tokens == 4 * len(tokenizer.encode("Héllo wörld", add_special_tokens=False))
    assert [call[0] for call in serving.calls] == ["a b", "a b", "c d e", "c d e"]


def test_models_health_openapi(app, serving):
    async def go():
        client = make_openai(app)
        models = await client.models.list()
        async with make_client(app) as plain:  # no key: /health and /openapi.json are open
            health = await plain.get("/health")
            spec = (await plain.get("/openapi.json")).json()
            serving.healthy = False
            sick = await plain.get("/health")
        return models, health, spec, sick

    models, health, spec, sick = run(go())
    assert [m.id for m in models.data] == [MODEL]
    assert health.status_code == 200 and health.json() == {"status": "ok"}
    assert sick.status_code == 503 and "attention-0 died" in sick.json()["error"]["message"]
    for path in ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health"):
        assert path in spec["paths"]
    schemas = spec["components"]["schemas"]
    assert {"CompletionRequest", "ChatCompletionRequest", "ChatMessage", "ErrorResponse"} <= set(schemas)
    assert spec["paths"]["/v1/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"] == \
        {"$ref": "#/components/schemas/CompletionRequest"}


# ---------------------------------------------------------------- the bad-input table

CHAT = "/v1/chat/completions"
CMPL = "/v1/completions"
USER = [{"role": "user", "content": "hi"}]
BAD_INPUTS = [
    # (case, path, json body or raw bytes, status, param, words in the message)
    ("malformed JSON", CMPL, b'{"model": "tiny-test", "prompt": ', 400, None, ["not valid JSON"]),
    ("body not an object", CMPL, b"[1, 2]", 400, None, ["JSON object"]),
    ("empty body", CMPL, b"", 400, None, ["empty"]),
    ("missing prompt", CMPL, {"model": MODEL}, 400, "prompt", ["prompt is required"]),
    ("missing model", CHAT, {"messages": USER}, 400, "model", ["model is required"]),
    ("wrong type max_tokens", CMPL, {"model": MODEL, "prompt": "x", "max_tokens": "ten"}, 400, "max_tokens",
     ["valid integer", "'ten'"]),
    ("bool for int", CMPL, {"model": MODEL, "prompt": "x", "max_tokens": True}, 400, "max_tokens", ["integer"]),
    ("wrong type temperature", CHAT, {"model": MODEL, "messages": USER, "temperature": "hot"}, 400, "temperature",
     ["number"]),
    ("wrong type prompt", CMPL, {"model": MODEL, "prompt": {"text": "x"}}, 400, "prompt",
     ["string", "token ids"]),
    ("messages not a list", CHAT, {"model": MODEL, "messages": "hi"}, 400, "messages", ["valid list"]),
    ("unknown model", CMPL, {"model": "gpt-4", "prompt": "x"}, 404, "model", ["'gpt-4'", MODEL]),
    ("unknown model chat", CHAT, {"model": "gpt-4", "messages": USER}, 404, "model", ["does not exist"]),
    ("negative max_tokens", CMPL, {"model": MODEL, "prompt": "x", "max_tokens": -1}, 400, "max_tokens",
     ["max_tokens is -1; allowed an integer >= 0"]),
    ("huge max_tokens", CMPL, {"model": MODEL, "prompt": "x", "max_tokens": 10**9}, 400, "max_tokens",
     ["1000000000", "64", "max_model_len"]),
    ("huge max_completion_tokens", CHAT, {"model": MODEL, "messages": USER, "max_completion_tokens": 65}, 400,
     "max_completion_tokens", ["65", "64"]),
    ("zero max_tokens chat", CHAT, {"model": MODEL, "messages": USER, "max_tokens": 0}, 400, "max_tokens",
     ["max_tokens is 0; allowed an integer >= 1"]),
    ("temperature < 0", CMPL, {"model": MODEL, "prompt": "x", "temperature": -0.5}, 400, "temperature",
     ["temperature is -0.5; allowed 0..2"]),
    ("temperature > 2", CHAT, {"model": MODEL, "messages": USER, "temperature": 2.5}, 400, "temperature",
     ["temperature is 2.5; allowed 0..2"]),
    ("top_p 0", CMPL, {"model": MODEL, "prompt": "x", "top_p": 0}, 400, "top_p", ["top_p is 0; allowed (0, 1]"]),
    ("n too large", CMPL, {"model": MODEL, "prompt": "x", "n": 5}, 400, "n", ["n is 5", "at most 4", "max_n"]),
    ("n zero", CHAT, {"model": MODEL, "messages": USER, "n": 0}, 400, "n", ["n is 0; allowed an integer >= 1"]),
    ("logprobs too large", CMPL, {"model": MODEL, "prompt": "x", "logprobs": 21}, 400, "logprobs",
     ["logprobs is 21; allowed an integer 0..20"]),
    ("top_logprobs too large", CHAT, {"model": MODEL, "messages": USER, "logprobs": True, "top_logprobs": 21},
     400, "top_logprobs", ["20"]),
    ("top_logprobs without logprobs", CHAT, {"model": MODEL, "messages": USER, "top_logprobs": 2}, 400,
     "top_logprobs", ["logprobs"]),
    ("penalty out of range", CMPL, {"model": MODEL, "prompt": "x", "presence_penalty": 3}, 400,
     "presence_penalty", ["2"]),
    ("empty messages", CHAT, {"model": MODEL, "messages": []}, 400, "messages", ["at least 1"]),
    ("unknown role", CHAT, {"model": MODEL, "messages": [{"role": "robot", "content": "hi"}]}, 400,
     "messages[0].role", ["'system'", "'user'", "'assistant'", "'robot'"]),
    ("function role", CHAT, {"model": MODEL, "messages": [{"role": "function", "content": "x"}]}, 400,
     "messages[0].role", ["'function'", "'tool'"]),
    ("remote image url", CHAT, {"model": MODEL, "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]}]}, 400,
     "messages[0].content[0]", ["not fetched", "data:image/png;base64"]),
    ("audio part", CHAT, {"model": MODEL, "messages": [
        {"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}]}]},
     400, "messages[0].content", ["'input_audio'", "'text' and 'image_url'"]),
    ("missing content", CHAT, {"model": MODEL, "messages": [{"role": "user"}]}, 400, "messages[0].content",
     ["required"]),
    ("empty prompt", CMPL, {"model": MODEL, "prompt": ""}, 400, "prompt", ["empty"]),
    ("empty prompt list", CMPL, {"model": MODEL, "prompt": []}, 400, "prompt", ["empty"]),
    ("negative token id", CMPL, {"model": MODEL, "prompt": [1, -2]}, 400, "prompt[1]", ["prompt[1] is -2", ">= 0"]),
    ("empty stop", CMPL, {"model": MODEL, "prompt": "x", "stop": ""}, 400, "stop", ["empty"]),
    ("top_k invalid", CMPL, {"model": MODEL, "prompt": "x", "top_k": -5}, 400, "top_k", ["-1"]),
    ("logit_bias", CHAT, {"model": MODEL, "messages": USER, "logit_bias": {"1": 5}}, 400, "logit_bias",
     ["not supported"]),
    ("best_of", CMPL, {"model": MODEL, "prompt": "x", "best_of": 3}, 400, "best_of", ["best_of is 3"]),
    ("prompt too long", CMPL, {"model": MODEL, "prompt": "word " * 80}, 400, "prompt",
     ["prompt has", "at most 64", "max_model_len"]),
    ("prompt too long chat", CHAT, {"model": MODEL, "messages": [{"role": "user", "content": "word " * 80}]}, 400,
     "prompt", ["at most 64"]),
    ("prompt too long streaming", CMPL, {"model": MODEL, "prompt": "word " * 80, "stream": True}, 400, "prompt",
     ["at most 64"]),
]


@pytest.mark.parametrize("case, path, body, status, param, words", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input(app, case, path, body, status, param, words):
    async def go():
        async with make_client(app, API_KEY) as client:
            if isinstance(body, bytes):
                bad = await client.post(path, content=body, headers={"Content-Type": "application/json"})
            else:
                bad = await client.post(path, json=body)
            good = await client.post(CMPL, json={"model": MODEL, "prompt": "x", "max_tokens": 2})
            return bad, good

    bad, good = run(go())
    assert bad.status_code == status, bad.text
    error = bad.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["param"] == param, error
    for word in words:
        assert word in error["message"], error["message"]
    assert good.status_code == 200 and good.json()["choices"][0]["finish_reason"] == "length"


def test_wrong_content_type_and_unknown_routes(app):
    async def go():
        async with make_client(app, API_KEY) as client:
            text = await client.post(CMPL, content=b'{"model": "tiny-test", "prompt": "x"}',
                                     headers={"Content-Type": "text/plain"})
            missing = await client.get("/v1/embeddings")
            method = await client.get(CMPL)
            return text, missing, method

    text, missing, method = run(go())
    assert text.status_code == 400 and "Content-Type: application/json" in text.json()["error"]["message"]
    assert missing.status_code == 404 and "/v1/embeddings" in missing.json()["error"]["message"]
    assert method.status_code == 405 and set(method.json()["error"]) == {"message", "type", "param", "code"}


def test_api_key(app):
    async def go():
        async with make_client(app) as client:
            missing = await client.post(CMPL, json={"model": MODEL, "prompt": "x"})
            wrong = await client.post(CMPL, json={"model": MODEL, "prompt": "x"},
                                      headers={"Authorization": "Bearer nope"})
            models = await client.get("/v1/models")
            good = await client.post(CMPL, json={"model": MODEL, "prompt": "x"},
                                     headers={"Authorization": f"Bearer {API_KEY}"})
        with pytest.raises(openai.AuthenticationError):
            await make_openai(app, api_key="nope").models.list()
        return missing, wrong, models, good

    missing, wrong, models, good = run(go())
    for response in (missing, wrong, models):
        assert response.status_code == 401
        error = response.json()["error"]
        assert error["type"] == "authentication_error" and error["code"] == "invalid_api_key"
        assert API_KEY not in response.text
    assert "Authorization: Bearer" in missing.json()["error"]["message"]
    assert good.status_code == 200


def test_oversize_body(app):
    big = {"model": MODEL, "prompt": "x" * 5000}

    async def chunks():
        data = json.dumps(big).encode()
        for i in range(0, len(data), 1000):
            yield data[i:i + 1000]

    async def go():
        async with make_client(app, API_KEY) as client:
            declared = await client.post(CMPL, json=big)
            streamed = await client.post(CMPL, content=chunks(), headers={"Content-Type": "application/json"})
            good = await client.post(CMPL, json={"model": MODEL, "prompt": "x"})
            return declared, streamed, good

    declared, streamed, good = run(go())
    for response in (declared, streamed):
        assert response.status_code == 413, response.text
        assert "4096" in response.json()["error"]["message"] and "max_request_bytes" in response.text
    assert good.status_code == 200


def test_queue_full_gets_429_at_once(app, serving):
    async def go():
        serving.gate = asyncio.Event()
        async with make_client(app, API_KEY) as client:
            body = {"model": MODEL, "prompt": "x", "max_tokens": 2}
            held = [asyncio.create_task(client.post(CMPL, json=body)) for _ in range(serving.max_queued_requests)]
            while len(serving.calls) < serving.max_queued_requests:
                await asyncio.sleep(0.01)
            rejected = await asyncio.wait_for(client.post(CHAT, json={"model": MODEL, "messages": USER}), 5)
            serving.gate.set()
            finished = await asyncio.gather(*held)
            after = await client.post(CMPL, json=body)
            return rejected, finished, after

    rejected, finished, after = run(go())
    assert rejected.status_code == 429 and rejected.json()["error"]["type"] == "rate_limit_error"
    assert "max_queued_requests" in rejected.json()["error"]["message"]
    assert [r.status_code for r in finished] == [200] * 4 and after.status_code == 200


@pytest.mark.parametrize("failure, status", [(RuntimeError("kaboom"), 500), (ValueError("top_k is bad"), 400)])
def test_engine_failures_keep_the_error_shape(app, serving, failure, status):
    async def go():
        async with make_client(app, API_KEY) as client:
            serving.failure = failure
            bad = await client.post(CMPL, json={"model": MODEL, "prompt": "x"})
            serving.failure = None
            good = await client.post(CMPL, json={"model": MODEL, "prompt": "x"})
            return bad, good

    bad, good = run(go())
    assert bad.status_code == status and str(failure) in bad.json()["error"]["message"]
    assert good.status_code == 200


# ---------------------------------------------------------------- clients that go away


async def call_asgi(app, path: str, body: dict, disconnect_after: float | None, cancel_after: float | None):
    """Run one request on the raw ASGI app; the client disconnects (or the task is cancelled, as Ray Serve
    does when its proxy loses the client) after the given time. Returns the messages sent and the duration."""
    data, sent, body_sent = json.dumps(body).encode(), [], False

    async def receive():
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": data, "more_body": False}
        await asyncio.sleep(disconnect_after if disconnect_after is not None else 3600)
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
               (b"authorization", f"Bearer {API_KEY}".encode())]
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": path, "raw_path": path.encode(), "root_path": "",
             "query_string": b"", "headers": headers, "client": ("127.0.0.1", 5000), "server": ("test", 80)}
    loop = asyncio.get_running_loop()
    start = loop.time()
    task = asyncio.create_task(app(scope, receive, send))
    if cancel_after is not None:
        await asyncio.sleep(cancel_after)
        task.cancel()
    try:
        await asyncio.wait_for(task, 10)
    except asyncio.CancelledError:
        pass
    elapsed = loop.time() - start
    await asyncio.sleep(0.05)  # let the spawned aborts run
    return sent, elapsed


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
@pytest.mark.parametrize("how", ["disconnect", "cancel"])
def test_client_that_leaves_aborts_its_requests(app, serving, stream, how):
    serving.delay = 0.05  # 50 tokens take 2.5 s

    async def go():
        body = {"model": MODEL, "prompt": "x", "max_tokens": 50, "n": 2, "stream": stream, "ignore_eos": True}
        return await call_asgi(app, CMPL, body, 0.3 if how == "disconnect" else None,
                               0.3 if how == "cancel" else None)

    sent, elapsed = run(go())
    assert elapsed < 2.0
    request_ids = sorted(call[2] for call in serving.calls)
    assert len(request_ids) == 2
    assert sorted(serving.closed_early) == request_ids  # the engine streams were closed mid-way
    assert sorted(serving.aborted) == request_ids
    if stream and how == "disconnect":
        assert sent[0]["status"] == 200 and b"data: " in b"".join(m.get("body", b"") for m in sent[1:])
    assert app.state.openai_server.inflight == 0


def test_chat_shapes_validate_against_openai_types(app):
    body = {"model": MODEL, "messages": [{"role": "developer", "content": "x"}, *USER], "max_tokens": 6,
            "logprobs": True, "top_logprobs": 2}

    async def go():
        async with make_client(app, API_KEY) as client:
            plain = (await client.post(CHAT, json=body)).json()
            stream = (await client.post(CHAT, json={**body, "stream": True, "n": 2})).text
            return plain, stream

    plain, stream = run(go())
    completion = openai.types.chat.ChatCompletion.model_validate(plain)
    assert completion.choices[0].logprobs.content[0].top_logprobs[0].logprob == pytest.approx(-0.1)
    events = sse_events(stream)
    chunks = [openai.types.chat.ChatCompletionChunk.model_validate(e) for e in events]
    for index in (0, 1):
        mine = [c.choices[0] for c in chunks if c.choices[0].index == index]
        assert mine[0].delta.role == "assistant" and mine[-1].finish_reason == "length"
        assert sum(len(c.logprobs.content) for c in mine if c.logprobs) == 6

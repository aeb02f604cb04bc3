"""Request handling behind the OpenAI routes: engine requests of one HTTP request, streaming, disconnects.

One HTTP request becomes `len(prompts) * n` engine requests (choice i gets `seed + i`), run concurrently by an
`EngineRun`; the answer is built by the formatters of `formatters.py`. A client that leaves (disconnect, or the
ASGI task being cancelled, which is what Ray Serve does) aborts every unfinished engine request.
`ServingContext` is what the routes need from the server (the Ingress implements it): the engine interface
(`engine_client.EngineProtocol`, shared with gRPC) and the limits.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import uuid
from dataclasses import replace
from typing import AsyncIterator, Callable, Protocol

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from llama4serve.cluster.outputs import RequestOutput
from llama4serve.cluster.sampling_params import SamplingParams
from llama4serve.cluster.serving import limits
from llama4serve.cluster.serving.engine_client import EngineProtocol
from llama4serve.cluster.serving.openai.errors import APIError
from llama4serve.cluster.serving.openai.formatters import ChatFormatter, CompletionFormatter
from llama4serve.cluster.serving.openai.images import engine_messages
from llama4serve.cluster.serving.openai.protocol import (DEFAULT_COMPLETION_MAX_TOKENS, ChatCompletionRequest,
                                                         CompletionRequest)
from llama4serve.cluster.serving.policy import BAD_INPUT, NOT_FOUND, Admission, ServingError, classify

logger = logging.getLogger(__name__)

GENERATION_PATHS = ("/v1/completions", "/v1/chat/completions")


class ServingContext(EngineProtocol, Protocol):
    """What the HTTP routes need from the server; attributes are read per request.

    `generate` streams `RequestOutput` deltas and raises ValueError (its text is sent to the client as a 400)
    before the first output on bad input (a Ray-wrapped ValueError counts: its `cause` is used). Any other
    exception goes through the error table (policy.classify): BackPressureError 429, DataPlaneError /
    DeploymentUnavailableError 503, a deadline 504, else 500. Closing the iterator early must abort the request;
    `abort` is also called for every request the client gave up on.
    """

    model_name: str  # what clients send as `model` and /v1/models lists
    max_model_len: int
    tokenizer: object | None  # cluster.inputs.tokenizer.Tokenizer: token strings for logprobs, echo of token-id prompts
    api_key: str | None  # Bearer token required on /v1/*; None: open
    max_queued_requests: int  # generation requests in flight on this ingress; more get 429 at once
    admission: Admission  # optional: that bound, shared with gRPC (default: one of this app's own)
    max_request_bytes: int  # larger request bodies get 413
    max_n: int  # largest accepted `n`
    max_images_per_request: int  # optional (default 8): images in one chat request, refused with 400 beyond
    max_image_bytes: int  # optional (default 20 MiB): decoded bytes of one image

    async def check_health(self) -> None:
        """Return when the model can serve; raise (any exception, its text is shown) when it cannot."""


def engine_error(exc: BaseException) -> APIError:
    """An exception out of `ServingContext.generate` as an HTTP error, through the error table (policy.py)."""
    error = classify(exc, "HTTP request")
    param = None
    if error.kind is BAD_INPUT:
        field = re.match(r"(\w+)((?:\[\d+\]|\.\w+)*)", error.message)  # e.g. messages[0].content[1]
        known = set(CompletionRequest.model_fields) | set(ChatCompletionRequest.model_fields)
        param = field.group(0) if field and field.group(1) in known else None
    return APIError.of(error, param)


# ---------------------------------------------------------------- engine requests of one HTTP request


class EngineRun:
    """The engine requests of one HTTP request (prompts x n), merged into one stream of (choice index, output).

    `start()` waits until every request has produced its first output, so bad input raises before an HTTP
    response starts. `close()` is synchronous (safe in cancelled code): it cancels the readers and aborts every
    unfinished request in the engine.
    """

    def __init__(self, ctx: ServingContext, jobs: list[tuple[object, SamplingParams, str]],
                 spawn: Callable[[object], None]):
        self.ctx, self.jobs, self.spawn = ctx, jobs, spawn
        self.queue: asyncio.Queue = asyncio.Queue()
        self.unfinished = set(range(len(jobs)))
        self.buffered: list[tuple[int, RequestOutput]] = []
        self.tasks: list[asyncio.Task] = []

    async def _read(self, index: int) -> None:
        prompt, params, request_id = self.jobs[index]
        outputs = None
        try:
            outputs = self.ctx.generate(prompt, params, request_id)
            async for out in outputs:
                self.queue.put_nowait((index, out))
                if out.finished:
                    return
            self.queue.put_nowait((index, RuntimeError(f"engine stream of {request_id} ended unfinished")))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.queue.put_nowait((index, exc))
        finally:
            if hasattr(outputs, "aclose"):  # prompt cleanup of the engine stream (also when cancelled)
                await outputs.aclose()

    async def _next(self) -> tuple[int, RequestOutput]:
        index, item = await self.queue.get()
        if isinstance(item, BaseException):
            self.unfinished.discard(index)  # it failed in the engine: nothing to abort
            raise engine_error(item)
        if item.finished:
            self.unfinished.discard(index)
        return index, item

    async def start(self) -> None:
        self.tasks = [asyncio.create_task(self._read(i)) for i in range(len(self.jobs))]
        started: set[int] = set()
        try:
            while len(started) < len(self.jobs):
                index, out = await self._next()
                started.add(index)
                self.buffered.append((index, out))
        except BaseException:
            self.close()
            raise

    async def outputs(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        buffered, self.buffered = self.buffered, []
        for item in buffered:
            yield item
        while self.unfinished:
            yield await self._next()

    def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        for index in sorted(self.unfinished):
            self.spawn(self.ctx.abort(self.jobs[index][2]))
        self.unfinished.clear()


class _EventStream(StreamingResponse):
    """SSE response that closes its EngineRun however the response ends (finished, disconnect, cancellation)."""

    def __init__(self, content: AsyncIterator[str], run: EngineRun):
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.run = run

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.run.close()


def sse(data: dict | str) -> str:
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {text}\n\n"


async def _wait_for_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


# ---------------------------------------------------------------- the server


class OpenAIServer:
    """Request handling of the routes; one per app (`app.state.openai_server`)."""

    def __init__(self, ctx: ServingContext):
        self.ctx = ctx
        # generation requests being served (the 429 bound), shared with gRPC when the context has one
        self.admission = getattr(ctx, "admission", None) or Admission(ctx.max_queued_requests)
        self._background: set[asyncio.Task] = set()

    @property
    def inflight(self) -> int:
        return self.admission.in_flight

    def spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _check_common(self, body, max_tokens: int, tokens_field: str = "max_tokens") -> None:
        ctx = self.ctx
        if body.model != ctx.model_name:
            raise APIError.of(ServingError(NOT_FOUND, f"model {body.model!r} does not exist; this server serves "
                                                      f"{ctx.model_name!r} (see GET /v1/models)"), "model")
        checks = {"n": limits.deployment_limit(body.n, ctx.max_n, "max_n"),
                  tokens_field: limits.deployment_limit(max_tokens, ctx.max_model_len, "max_model_len",
                                                        "prompt included")}
        for name, problem in checks.items():
            if problem is not None:
                raise APIError.of(ServingError(BAD_INPUT, problem.at(name)), name)

    def _jobs(self, prompts: list, n: int, params: SamplingParams, request_id: str) -> list:
        jobs = []
        for p, prompt in enumerate(prompts):
            for j in range(n):
                seeded = params if params.seed is None else replace(params, seed=params.seed + j)
                jobs.append((prompt, seeded, f"{request_id}-{p}-{j}"))
        return jobs

    async def _respond(self, jobs: list, formatter, body, request: Request) -> Response:
        run = EngineRun(self.ctx, jobs, self.spawn)
        await run.start()
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return _EventStream(self._stream(run, formatter, include_usage), run)
        return await self._collect(run, formatter, request)

    async def _collect(self, run: EngineRun, formatter, request: Request) -> Response:
        """Non-streaming: gather every output, abort all when the client disconnects first."""
        async def gather():
            async for index, out in run.outputs():
                formatter.add(index, out)
            return formatter.response()

        work = asyncio.ensure_future(gather())
        gone = asyncio.ensure_future(_wait_for_disconnect(request))
        try:
            done, _ = await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
            if work in done:
                return JSONResponse(work.result())
            return Response(status_code=499)  # nobody is listening
        finally:
            work.cancel()
            gone.cancel()
            run.close()

    async def _stream(self, run: EngineRun, formatter, include_usage: bool) -> AsyncIterator[str]:
        try:
            for chunk in formatter.stream_start():
                yield sse(chunk)
            async for index, out in run.outputs():
                for chunk in formatter.stream_chunks(index, out):
                    yield sse(chunk)
            if include_usage:
                yield sse(formatter.usage_chunk())
        except APIError as err:
            yield sse(err.body())
        finally:
            run.close()
        yield sse("[DONE]")

    async def completions(self, body: CompletionRequest, request: Request) -> Response:
        max_tokens = DEFAULT_COMPLETION_MAX_TOKENS if body.max_tokens is None else body.max_tokens
        self._check_common(body, max_tokens)
        # echo + logprobs=n scores the prompt too: each prompt position with its n most likely tokens (vLLM, OpenAI)
        prompt_logprobs = (body.logprobs or True) if body.echo and body.logprobs is not None else False
        try:
            params = body.sampling_params(max_tokens, body.logprobs, prompt_logprobs=prompt_logprobs)
        except ValueError as err:
            raise engine_error(err) from None
        prompts = body.prompts()
        request_id = f"cmpl-{uuid.uuid4().hex}"
        formatter = CompletionFormatter(request_id, self.ctx.model_name, self.ctx.tokenizer, prompts, body)
        return await self._respond(self._jobs(prompts, body.n, params, request_id), formatter, body, request)

    async def chat_completions(self, body: ChatCompletionRequest, request: Request) -> Response:
        max_tokens = body.max_completion_tokens or body.max_tokens or self.ctx.max_model_len
        self._check_common(body, max_tokens, "max_completion_tokens" if body.max_completion_tokens else "max_tokens")
        try:
            tools = body.tool_request()
            params = body.sampling_params(max_tokens, body.engine_logprobs(), structured=body.chat_spec(tools))
        except ValueError as err:
            raise engine_error(err) from None
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        messages = engine_messages(body.messages, getattr(self.ctx, "max_images_per_request", 8),
                                   getattr(self.ctx, "max_image_bytes", 20 * 2**20))
        prompt = messages if tools is None else {
            "messages": messages, "tools": body.tools, "tool_choice": body.tool_choice,
            "parallel_tool_calls": body.parallel_tool_calls}
        formatter = ChatFormatter(request_id, self.ctx.model_name, self.ctx.tokenizer, body, tools)
        return await self._respond(self._jobs([prompt], body.n, params, request_id), formatter, body, request)

    def model_card(self) -> dict:
        return {"id": self.ctx.model_name, "object": "model", "created": 0, "owned_by": "llama4serve",
                "max_model_len": self.ctx.max_model_len}

"""OpenAI-compatible HTTP API: a FastAPI app over a `ServingContext` (the Serve Ingress implements it).

`build_fastapi_app(ctx)` returns the app; Ray Serve mounts it through a late-bound `@serve.ingress()` whose
class returns it from `__serve_build_asgi_app__` (see `cluster/serving/ingress.py`). Routes: POST /v1/completions,
POST /v1/chat/completions, GET /v1/models, GET /v1/models/{model}, GET /health. Every error is
`{"error": {"message", "type", "param", "code"}}`; client mistakes are 4xx, never 5xx.

This file is the HTTP layer (auth, limits, errors, routes); request handling (and `ServingContext`) is in
`serving.py`, request models in `protocol.py`, the error shape in `errors.py`, response bodies in `formatters.py`.
"""

from __future__ import annotations

import logging
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from llama4serve.cluster.serving.openai.errors import APIError, ErrorResponse
from llama4serve.cluster.serving.openai.protocol import ChatCompletionRequest, CompletionRequest
from llama4serve.cluster.serving.openai.serving import GENERATION_PATHS, OpenAIServer, ServingContext
from llama4serve.cluster.serving.policy import (NOT_FOUND, TOO_LARGE, UNAVAILABLE, ServingError, check_api_key,
                                                one_line, root_exception)

__all__ = ["build_fastapi_app", "ServingContext"]

logger = logging.getLogger(__name__)


def error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


# ---------------------------------------------------------------- limits and auth, before FastAPI


class IngressGuard:
    """Pure ASGI middleware: API key on /v1/*, the admission bound (429), and the body size limit (413).

    The body is read here, counted, and replayed to the app; later `receive()` calls reach the server, so
    the routes still see `http.disconnect`.
    """

    def __init__(self, app, server: OpenAIServer):
        self.app, self.server = app, server

    async def _reject(self, err: APIError, scope, receive, send) -> None:
        await error_response(err)(scope, receive, send)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        ctx = self.server.ctx
        path = scope["path"].removeprefix(scope.get("root_path", "")) or "/"
        headers = {k.decode("latin-1").lower(): v for k, v in scope.get("headers", [])}
        if path.startswith("/v1/"):
            err = check_api_key(headers.get("authorization"), ctx.api_key, HOW_TO_AUTHENTICATE)
            if err is not None:
                return await self._reject(APIError.of(err), scope, receive, send)
        limit = ctx.max_request_bytes
        declared = headers.get("content-length", b"").decode("latin-1")
        if declared.isdigit() and int(declared) > limit:
            return await self._reject(_too_large(f"has {int(declared)} bytes", limit), scope, receive, send)
        generation = scope["method"] == "POST" and path in GENERATION_PATHS
        admission = self.server.admission
        if generation and not admission.try_admit():
            return await self._reject(APIError.of(admission.refusal()), scope, receive, send)
        try:
            if scope["method"] in ("POST", "PUT", "PATCH"):
                body, more = [], True
                size = 0
                while more:
                    message = await receive()
                    if message["type"] != "http.request":
                        return  # the client left while sending
                    body.append(message.get("body", b""))
                    size += len(body[-1])
                    more = message.get("more_body", False)
                    if size > limit:
                        err = _too_large(f"has more than {limit} bytes", limit)
                        return await self._reject(err, scope, receive, send)
                receive = _replay(b"".join(body), receive)
            await self.app(scope, receive, send)
        finally:
            if generation:
                admission.release()


HOW_TO_AUTHENTICATE = "the header 'Authorization: Bearer <key>'"


def _too_large(what: str, limit: int) -> APIError:
    return APIError.of(ServingError(
        TOO_LARGE, f"the request body {what}; this server accepts at most {limit} bytes (max_request_bytes)"))


def _replay(body: bytes, receive):
    sent = False

    async def replayed():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


# ---------------------------------------------------------------- error handlers


def _param(loc: tuple) -> str | None:
    parts = [p for p in loc if p != "body"]
    text = ""
    for p in parts:
        text += f"[{p}]" if isinstance(p, int) else (f".{p}" if text else str(p))
    return text or None


_CUSTOM_ERRORS = {"union_type", "empty_prompt", "unsupported", "too_many_prompts", "content_part"}


def _validation_message(error: dict) -> tuple[str, str | None]:
    kind, loc, msg = error["type"], error["loc"], error["msg"].removeprefix("Value error, ")
    if kind == "json_invalid":
        detail = (error.get("ctx") or {}).get("error", "")
        where = f" at character {loc[-1]}" if isinstance(loc[-1], int) else ""
        return f"the request body is not valid JSON ({detail}{where})", None
    param = _param(loc)
    if param is None:
        if kind == "missing":
            return "the request body is empty; send a JSON object (Content-Type: application/json)", None
        if kind == "model_attributes_type":
            hint = " with Content-Type: application/json" if isinstance(error.get("input"), bytes) else ""
            return f"the request body must be a JSON object{hint}", None
        return msg, re.match(r"\w+", msg).group(0) if re.match(r"\w+", msg) else None
    if kind == "missing":
        return f"{param} is required", param
    if kind == "limit":  # from the limits table, worded as gRPC words it: `<field> is <value>; allowed <range>`
        param += error["ctx"]["suffix"]
        return f"{param} {error['ctx']['tail']}", param
    shown = repr(error.get("input"))
    got = f" (got {shown[:80]})" if "input" in error and kind not in _CUSTOM_ERRORS else ""
    return f"{param}: {msg}{got}", param


async def _on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    message, param = _validation_message(errors[0])
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    return error_response(APIError(400, message, param=param))


async def _on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    if exc.status_code == 404:
        message = f"no route {request.method} {request.url.path}; see /docs for the API"
    elif exc.status_code == 405:
        message = f"{request.method} is not allowed on {request.url.path}"
    else:
        message = str(exc.detail)
    kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
    return error_response(APIError(exc.status_code, message, kind, headers=getattr(exc, "headers", None)))


async def _on_api_error(request: Request, exc: APIError) -> JSONResponse:
    return error_response(exc)


async def _on_serving_error(request: Request, exc: ServingError) -> JSONResponse:
    return error_response(APIError.of(exc))


async def _on_unexpected(request: Request, exc: Exception) -> JSONResponse:
    logger.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(APIError(500, f"internal server error ({type(exc).__name__})", "server_error"))


# ---------------------------------------------------------------- the app

_ERRORS = {status: {"model": ErrorResponse, "description": text} for status, text in [
    (400, "Invalid request"), (401, "Missing or wrong API key"), (404, "Unknown model"),
    (413, "Request body too large"), (429, "Too many requests in flight"), (503, "Model unavailable"),
]}
_GENERATED = {200: {"description": "JSON, or server-sent events ending with `data: [DONE]` when `stream` is true",
                    "content": {"text/event-stream": {}}}}


def build_fastapi_app(ctx: ServingContext) -> FastAPI:
    """The OpenAI-compatible FastAPI app over `ctx` (read per request, so it may change after this call)."""
    server = OpenAIServer(ctx)
    app = FastAPI(title="llama4serve", summary="OpenAI-compatible Llama 4 serving", version="1")
    app.state.openai_server = server
    app.add_middleware(IngressGuard, server=server)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
    app.add_exception_handler(APIError, _on_api_error)
    app.add_exception_handler(ServingError, _on_serving_error)
    app.add_exception_handler(Exception, _on_unexpected)

    @app.post("/v1/completions", response_model=None, responses={**_GENERATED, **_ERRORS})
    async def create_completion(body: CompletionRequest, request: Request) -> Response:
        """Text completion of one or more prompts (strings or token ids); `echo` + `logprobs` score a prompt."""
        return await server.completions(body, request)

    @app.post("/v1/chat/completions", response_model=None, responses={**_GENERATED, **_ERRORS})
    async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Response:
        """Chat completion; messages go through the checkpoint's chat template."""
        return await server.chat_completions(body, request)

    @app.get("/v1/models", responses=_ERRORS)
    async def list_models() -> dict:
        """The served model."""
        return {"object": "list", "data": [server.model_card()]}

    @app.get("/v1/models/{model}", responses=_ERRORS)
    async def retrieve_model(model: str) -> dict:
        if model != ctx.model_name:
            raise APIError.of(ServingError(
                NOT_FOUND, f"model {model!r} does not exist; this server serves {ctx.model_name!r}"), "model")
        return server.model_card()

    @app.get("/health", responses={503: {"model": ErrorResponse, "description": "Model unavailable"}})
    async def health() -> dict:
        """200 when the model can serve, 503 otherwise."""
        try:
            await ctx.check_health()
        except Exception as exc:
            root = root_exception(exc)
            reason = f"unhealthy: {type(root).__name__}: {one_line(str(root))}"
            raise APIError.of(ServingError(UNAVAILABLE, reason)) from None
        return {"status": "ok"}

    return app

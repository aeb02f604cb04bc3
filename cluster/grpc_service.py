"""gRPC servicer logic of the Ingress: llama4serve.v1.Llama4Serve and grpc.health.v1.Health.

Ray Serve's gRPC proxy turns each RPC into a call of the ingress deployment's method with the RPC's name,
passing the deserialized request and a `grpc_context` (ray.serve.grpc_util.RayServegRPCContext, a picklable
copy of the server context; the argument must have exactly that name). A unary RPC returns its response
message, a server-streaming RPC is an async generator of messages. Errors: a unary method sets code and
details on grpc_context and returns an empty response; a streaming method sets them and raises, since Serve
copies the context back only with a yielded message or an exception (its proxy then logs the error with a
traceback, and the exception must pickle). A client that cancels or passes its deadline makes Serve cancel
the method's task, so `finally` aborts the engine request.

The Ingress deployment class inherits `GrpcIngressMixin` and provides what `GrpcIngressHost` lists.
"""

from __future__ import annotations

import hmac
import re
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any, Protocol

import grpc
from grpc_health.v1 import health_pb2

from ..protos import llama4serve_pb2 as pb
from .outputs import RequestOutput
from .sampling_params import SamplingParams

SERVICE_NAME = "llama4serve.v1.Llama4Serve"
CHAT_ROLES = ("system", "user", "assistant", "tool")
FINISH_REASONS = {
    "stop": pb.FINISH_REASON_STOP,
    "length": pb.FINISH_REASON_LENGTH,
    "abort": pb.FINISH_REASON_ABORT,
}
IMAGE_MIME_TYPES = ("image/png", "image/jpeg", "image/jpg", "image/webp")
# GenerateRequest fields with presence that map 1:1 onto SamplingParams.
_OPTIONAL_PARAMS = (
    "max_tokens", "temperature", "top_p", "top_k", "seed", "logprobs",
    "presence_penalty", "frequency_penalty", "repetition_penalty",
)


class GrpcEngine(Protocol):
    def generate(
        self, prompt: str | list[int] | list[dict], params: SamplingParams, request_id: str
    ) -> AsyncIterator[RequestOutput]:
        """Streams updates; raises ValueError naming the field before the first one when the input is bad."""

    async def abort(self, request_id: str) -> None:
        """Stops a request that has not finished; a no-op for unknown or finished ids."""


class GrpcIngressHost(Protocol):
    """What the Ingress deployment provides to GrpcIngressMixin."""

    engine: GrpcEngine
    model_name: str  # the id in ListModels and the only accepted GenerateRequest.model (besides "")
    api_key: str | None  # when set, metadata `authorization: Bearer <api_key>` is required

    def try_admit(self) -> bool:
        """Takes a slot of the bounded request queue; False when max_queued_requests are in flight."""

    def done(self) -> None:
        """Gives back the slot taken by a successful try_admit."""


class RpcError(Exception):
    """A client mistake: becomes the RPC's status code and details.

    Picklable (all constructor arguments are in `args`): from a streaming method it travels, wrapped by Serve,
    from the replica to the proxy.
    """

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(code, details)
        self.code = code
        self.details = details

    def __str__(self) -> str:
        return self.details


def _cause_message(error: BaseException) -> str:
    # A ValueError raised in another Serve replica arrives as a RayTaskError that is also a ValueError;
    # its str() holds the remote traceback, its `cause` the original message.
    cause = getattr(error, "cause", None)
    return str(cause if isinstance(cause, ValueError) else error)


class GrpcIngressMixin:
    """Methods named like the RPCs of llama4serve.v1.Llama4Serve and grpc.health.v1.Health."""

    async def Generate(self, request: pb.GenerateRequest, grpc_context) -> pb.GenerateResponse:
        """Unary: the whole completion."""
        request_id = _new_request_id()
        response = pb.GenerateResponse(request_id=request_id, model=self.model_name)
        first = True
        try:
            prompt, params = self._grpc_parse(request, grpc_context)
            async with aclosing(self._grpc_engine_outputs(prompt, params, request_id)) as outputs:
                async for out in outputs:
                    _add_output(response, out, first=first)
                    first = False
                    if out.finished:
                        _set_usage(response, len(out.prompt_token_ids), len(response.token_ids))
        except RpcError as e:
            grpc_context.set_code(e.code)
            grpc_context.set_details(e.details)
            return pb.GenerateResponse()
        return response

    async def GenerateStream(self, request: pb.GenerateRequest, grpc_context):
        """Server streaming: one GenerateStreamResponse (a delta) per engine update."""
        request_id = _new_request_id()
        num_tokens = 0
        first = True
        try:
            prompt, params = self._grpc_parse(request, grpc_context)
            async with aclosing(self._grpc_engine_outputs(prompt, params, request_id)) as outputs:
                async for out in outputs:
                    delta = pb.GenerateStreamResponse(request_id=request_id, model=self.model_name)
                    _add_output(delta, out, first=first)
                    first = False
                    num_tokens += len(out.token_ids)
                    if out.finished:
                        _set_usage(delta, len(out.prompt_token_ids), num_tokens)
                    yield delta
        except RpcError as e:
            grpc_context.set_code(e.code)
            grpc_context.set_details(e.details)
            raise

    async def ListModels(self, request: pb.ListModelsRequest, grpc_context) -> pb.ListModelsResponse:
        try:
            self._grpc_authenticate(grpc_context)
        except RpcError as e:
            grpc_context.set_code(e.code)
            grpc_context.set_details(e.details)
            return pb.ListModelsResponse()
        return pb.ListModelsResponse(models=[pb.Model(id=self.model_name)])

    async def Check(self, request: health_pb2.HealthCheckRequest, grpc_context) -> health_pb2.HealthCheckResponse:
        """grpc.health.v1.Health/Check, without authentication (for load balancers and probes)."""
        if request.service not in ("", SERVICE_NAME):
            grpc_context.set_code(grpc.StatusCode.NOT_FOUND)
            grpc_context.set_details(f"unknown service {request.service!r}; this server has {SERVICE_NAME!r}")
            return health_pb2.HealthCheckResponse()
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)

    async def Watch(self, request: health_pb2.HealthCheckRequest, grpc_context):
        """grpc.health.v1.Health/Watch: the current status once, then the stream ends."""
        yield await self.Check(request, grpc_context)

    def _grpc_authenticate(self, grpc_context) -> None:
        if not self.api_key:
            return
        header = dict(grpc_context.invocation_metadata()).get("authorization", "")
        if isinstance(header, bytes):
            header = header.decode("utf-8", "replace")
        if not hmac.compare_digest(header.encode(), f"Bearer {self.api_key}".encode()):
            reason = "invalid API key" if header else "missing API key"
            raise RpcError(
                grpc.StatusCode.UNAUTHENTICATED, f"{reason}: send metadata 'authorization: Bearer <your key>'"
            )

    def _grpc_parse(self, request: pb.GenerateRequest, grpc_context):
        """Checks auth and the request; returns (prompt, SamplingParams) or raises RpcError."""
        self._grpc_authenticate(grpc_context)
        if request.model and request.model != self.model_name:
            raise RpcError(
                grpc.StatusCode.NOT_FOUND,
                f"model {request.model!r} is not served here; this server serves {self.model_name!r} "
                "(leave `model` empty or see ListModels)",
            )
        return _prompt(request), _sampling_params(request)

    async def _grpc_engine_outputs(self, prompt, params, request_id: str) -> AsyncIterator[RequestOutput]:
        """Runs one engine request under the bounded queue; aborts it unless it finished."""
        if not self.try_admit():
            raise RpcError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                "the server is at its max_queued_requests limit; retry later",
            )
        started = finished = rejected = False
        outputs = self.engine.generate(prompt, params, request_id)
        try:
            async for out in outputs:
                started, finished = True, out.finished
                yield out
        except ValueError as e:
            if started:
                raise
            rejected = True
            # The engine names chat image parts messages[i].content[j]; here they are messages[i].parts[j].
            message = re.sub(r"^messages\[(\d+)\]\.content\[", r"messages[\1].parts[", _cause_message(e))
            raise RpcError(grpc.StatusCode.INVALID_ARGUMENT, message) from None
        finally:
            try:
                if hasattr(outputs, "aclose"):
                    await outputs.aclose()
                if not (finished or rejected):  # also before the first update: the engine may have queued it
                    await self.engine.abort(request_id)
            finally:
                self.done()


def _new_request_id() -> str:
    return f"grpc-{uuid.uuid4().hex}"


def _prompt(request: pb.GenerateRequest) -> str | list[int] | list[dict] | dict:
    kind = request.WhichOneof("prompt")
    if kind and request.messages:
        raise RpcError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"GenerateRequest has both {kind} and messages; set exactly one of text, token_ids, messages",
        )
    if request.images and not kind:
        raise RpcError(grpc.StatusCode.INVALID_ARGUMENT, "images go with a text or token_ids prompt; put the "
                                                         "images of chat messages in their parts")
    if request.images:
        prompt = request.text if kind == "text" else _token_ids(request)
        images = [_image_bytes(image, f"images[{k}]") for k, image in enumerate(request.images)]
        return {"prompt": prompt, "images": images}
    if kind == "text":
        return request.text
    if kind == "token_ids":
        return _token_ids(request)
    if not request.messages:
        raise RpcError(
            grpc.StatusCode.INVALID_ARGUMENT, "GenerateRequest has no input; set one of text, token_ids, messages"
        )
    for i, message in enumerate(request.messages):
        if message.role not in CHAT_ROLES:
            raise RpcError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"messages[{i}].role is {message.role!r}; allowed {', '.join(CHAT_ROLES)}",
            )
        if message.content and message.parts:
            raise RpcError(grpc.StatusCode.INVALID_ARGUMENT,
                           f"messages[{i}] has both content and parts; set one of them")
    return [{"role": m.role, "content": _content(m, i) if m.parts else m.content}
            for i, m in enumerate(request.messages)]


def _content(message: pb.ChatMessage, index: int) -> list[dict]:
    parts = []
    for j, part in enumerate(message.parts):
        kind = part.WhichOneof("part")
        if kind == "image":
            parts.append({"type": "image", "image": _image_bytes(part.image, f"messages[{index}].parts[{j}]")})
        elif kind == "text":
            parts.append({"type": "text", "text": part.text})
        else:
            raise RpcError(grpc.StatusCode.INVALID_ARGUMENT, f"messages[{index}].parts[{j}] is empty; set text or image")
    return parts


def _image_bytes(image: pb.Image, where: str) -> bytes:
    mime = image.mime_type.strip().lower()
    if mime and mime not in IMAGE_MIME_TYPES:
        raise RpcError(grpc.StatusCode.INVALID_ARGUMENT,
                       f"{where}.mime_type is {image.mime_type!r}; send image/png, image/jpeg or image/webp")
    if not image.data:
        raise RpcError(grpc.StatusCode.INVALID_ARGUMENT, f"{where}.data is empty; send the image file's bytes")
    return bytes(image.data)


def _token_ids(request: pb.GenerateRequest) -> list[int]:
    ids = list(request.token_ids.ids)
    if not ids:
        raise RpcError(grpc.StatusCode.INVALID_ARGUMENT, "token_ids.ids is empty; send at least one token id")
    for i, token_id in enumerate(ids):
        if token_id < 0:
            raise RpcError(grpc.StatusCode.INVALID_ARGUMENT, f"token_ids.ids[{i}] is {token_id}; ids are >= 0")
    return ids


def _sampling_params(request: pb.GenerateRequest) -> SamplingParams:
    kwargs: dict[str, Any] = {name: getattr(request, name) for name in _OPTIONAL_PARAMS if request.HasField(name)}
    try:
        return SamplingParams(
            stop=list(request.stop),
            stop_token_ids=list(request.stop_token_ids),
            prompt_logprobs=request.prompt_logprobs,
            ignore_eos=request.ignore_eos,
            **kwargs,
        )
    except ValueError as e:
        raise RpcError(grpc.StatusCode.INVALID_ARGUMENT, str(e).replace("SamplingParams.", "", 1)) from None


def _add_output(response, out: RequestOutput, first: bool) -> None:
    """Appends one engine update to a GenerateResponse or GenerateStreamResponse."""
    if first:
        response.prompt_token_ids.extend(out.prompt_token_ids)
        _add_prompt_logprobs(response, out)
    response.token_ids.extend(out.token_ids)
    response.text += out.text
    _add_logprobs(response, out)
    if out.finished:
        response.finish_reason = FINISH_REASONS.get(out.finish_reason, pb.FINISH_REASON_UNSPECIFIED)


def _add_logprobs(response, out: RequestOutput) -> None:
    if out.logprobs is None:
        return
    tops = out.top_logprobs or [[] for _ in out.token_ids]
    for token_id, logprob, top in zip(out.token_ids, out.logprobs, tops):
        response.logprobs.add(
            token_id=token_id,
            logprob=logprob,
            top_logprobs=[pb.TopLogprob(token_id=t, logprob=lp) for t, lp in top],
        )


def _add_prompt_logprobs(response, out: RequestOutput) -> None:
    if out.prompt_logprobs is None:
        return
    for token_id, logprob in zip(out.prompt_token_ids, out.prompt_logprobs):
        response.prompt_logprobs.add(token_id=token_id, logprob=logprob)


def _set_usage(response, prompt_tokens: int, completion_tokens: int) -> None:
    response.usage.prompt_tokens = prompt_tokens
    response.usage.completion_tokens = completion_tokens
    response.usage.total_tokens = prompt_tokens + completion_tokens

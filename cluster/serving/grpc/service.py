"""gRPC servicer logic of the Ingress: llama4serve.v1.Llama4Serve and grpc.health.v1.Health.

Ray Serve's gRPC proxy turns each RPC into a call of the ingress deployment's method with the RPC's name,
passing the deserialized request and a `grpc_context` (ray.serve.grpc_util.RayServegRPCContext, a picklable
copy of the server context; the argument must have exactly that name). A unary RPC returns its response
message, a server-streaming RPC is an async generator of messages. Errors: every failure becomes a
`policy.ServingError` whose row of the error table gives the status code (the HTTP API reads the same rows);
a unary method sets code and details on grpc_context and returns an empty response; a streaming method sets
them and raises `RpcError`, since Serve copies the context back only with a yielded message or an exception
(the exception must pickle). A client that cancels or passes its deadline makes Serve cancel the method's
task, so `finally` aborts the engine request.

The Ingress deployment class (`cluster/serving/ingress.py`) inherits `GrpcIngressMixin` and provides what
`GrpcIngressHost` lists; its `engine` is an `engine_client.EngineProtocol`, the interface HTTP also uses.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Protocol

import grpc
from grpc_health.v1 import health_pb2

from llama4serve.cluster.outputs import RequestOutput
from llama4serve.cluster.serving.engine_client import EngineProtocol
from llama4serve.cluster.serving.grpc.request import parse_request
from llama4serve.cluster.serving.policy import BAD_INPUT, NOT_FOUND, Admission, ServingError, check_api_key, classify
from llama4serve.protos import llama4serve_pb2 as pb

SERVICE_NAME = "llama4serve.v1.Llama4Serve"
FINISH_REASONS = {
    "stop": pb.FINISH_REASON_STOP,
    "length": pb.FINISH_REASON_LENGTH,
    "abort": pb.FINISH_REASON_ABORT,
}
HOW_TO_AUTHENTICATE = "metadata 'authorization: Bearer <your key>'"


class GrpcIngressHost(Protocol):
    """What the Ingress deployment provides to GrpcIngressMixin."""

    engine: EngineProtocol
    model_name: str  # the id in ListModels and the only accepted GenerateRequest.model (besides "")
    api_key: str | None  # when set, metadata `authorization: Bearer <api_key>` is required
    admission: Admission  # requests in flight on this ingress, shared with HTTP (max_queued_requests)
    max_model_len: int  # largest max_tokens accepted
    max_images_per_request: int  # optional (default: only the engine's bound): images in one request


class RpcError(ServingError):
    """A ServingError raised out of a streaming method; Serve carries it, wrapped, to the proxy (it pickles)."""

    @property
    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode[self.kind.grpc_code]

    @property
    def details(self) -> str:
        return self.message


def _fail(grpc_context, exc: BaseException) -> RpcError:
    """Sets the status of `exc` (through the error table) on the context; returns it as an RpcError."""
    error = classify(exc, "gRPC request")
    # The engine names chat image parts messages[i].content[j]; over gRPC they are messages[i].parts[j].
    message = re.sub(r"^messages\[(\d+)\]\.content\[", r"messages[\1].parts[", error.message)
    rpc_error = RpcError(error.kind, message if error.kind is BAD_INPUT else error.message, error.param)
    grpc_context.set_code(rpc_error.code)
    grpc_context.set_details(rpc_error.details)
    return rpc_error


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
        except Exception as exc:
            _fail(grpc_context, exc)
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
        except Exception as exc:
            raise _fail(grpc_context, exc) from None

    async def ListModels(self, request: pb.ListModelsRequest, grpc_context) -> pb.ListModelsResponse:
        try:
            self._grpc_authenticate(grpc_context)
        except ServingError as exc:
            _fail(grpc_context, exc)
            return pb.ListModelsResponse()
        return pb.ListModelsResponse(models=[pb.Model(id=self.model_name)])

    async def Check(self, request: health_pb2.HealthCheckRequest, grpc_context) -> health_pb2.HealthCheckResponse:
        """grpc.health.v1.Health/Check, without authentication (for load balancers and probes)."""
        if request.service not in ("", SERVICE_NAME):
            _fail(grpc_context, ServingError(
                NOT_FOUND, f"unknown service {request.service!r}; this server has {SERVICE_NAME!r}"))
            return health_pb2.HealthCheckResponse()
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)

    async def Watch(self, request: health_pb2.HealthCheckRequest, grpc_context):
        """grpc.health.v1.Health/Watch: the current status once, then the stream ends."""
        yield await self.Check(request, grpc_context)

    def _grpc_authenticate(self, grpc_context) -> None:
        header = dict(grpc_context.invocation_metadata()).get("authorization")
        error = check_api_key(header, self.api_key, HOW_TO_AUTHENTICATE)
        if error is not None:
            raise error

    def _grpc_parse(self, request: pb.GenerateRequest, grpc_context):
        """Checks auth and the request; returns (prompt, SamplingParams) or raises ServingError."""
        self._grpc_authenticate(grpc_context)
        if request.model and request.model != self.model_name:
            raise ServingError(
                NOT_FOUND,
                f"model {request.model!r} is not served here; this server serves {self.model_name!r} "
                "(leave `model` empty or see ListModels)",
            )
        return parse_request(request, self.max_model_len, getattr(self, "max_images_per_request", None))

    async def _grpc_engine_outputs(self, prompt, params, request_id: str) -> AsyncIterator[RequestOutput]:
        """Runs one engine request under the admission bound; aborts it unless it finished or failed."""
        admission = self.admission
        if not admission.try_admit():
            raise admission.refusal()
        over = False  # finished, or failed in the engine: nothing left to abort
        outputs = self.engine.generate(prompt, params, request_id)
        try:
            async for out in outputs:
                over = out.finished
                yield out
        except Exception:
            over = True
            raise
        finally:
            try:
                if hasattr(outputs, "aclose"):
                    await outputs.aclose()
                if not over:  # also before the first update: the engine may have queued it
                    await self.engine.abort(request_id)
            finally:
                admission.release()


def _new_request_id() -> str:
    return f"grpc-{uuid.uuid4().hex}"


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

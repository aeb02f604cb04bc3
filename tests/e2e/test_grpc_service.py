"""GrpcIngressMixin called directly, the way Ray Serve's gRPC proxy calls the Ingress methods, with a scripted
engine. The end-to-end tier (real Serve gRPC proxy, real engine) is in the Serve app's tests."""

import asyncio
import pickle
from dataclasses import replace

import grpc
import pytest
from grpc_health.v1 import health_pb2

from grpc_context import context

from llama4serve.cluster.serving.grpc.service import GrpcIngressMixin, RpcError
from llama4serve.cluster.outputs import RequestOutput
from llama4serve.cluster.serving.policy import BAD_INPUT, Admission
from llama4serve.protos import llama4serve_pb2 as pb

PROMPT_IDS = [1, 2, 3]
SCRIPT = [  # three engine updates of one request: 4 tokens, logprobs=2, prompt_logprobs
    RequestOutput("", PROMPT_IDS, [10], "a", logprobs=[-0.5], top_logprobs=[[(10, -0.5), (7, -1.5)]],
                  prompt_logprobs=[None, -1.0, -2.0], num_generated_tokens=1),
    RequestOutput("", PROMPT_IDS, [11, 12], "bc", logprobs=[-0.25, -0.75],
                  top_logprobs=[[(11, -0.25), (7, -2.0)], [(12, -0.75), (8, -1.0)]], num_generated_tokens=3),
    RequestOutput("", PROMPT_IDS, [13], "d", finished=True, finish_reason="length", logprobs=[-1.25],
                  top_logprobs=[[(13, -1.25), (9, -1.5)]], num_generated_tokens=4),
]


class FakeEngine:
    """Plays SCRIPT (or `outputs`); `error` is raised before the first update; `hang` blocks after the last."""

    def __init__(self, outputs=SCRIPT, error=None, hang=False):
        self.outputs, self.error, self.hang = outputs, error, hang
        self.calls, self.aborted = [], []

    async def generate(self, prompt, params, request_id):
        self.calls.append((prompt, params, request_id))
        if self.error is not None:
            raise self.error
        for out in self.outputs:
            await asyncio.sleep(0)
            yield replace(out, request_id=request_id)
        if self.hang:
            await asyncio.Event().wait()

    async def abort(self, request_id):
        self.aborted.append(request_id)


class Ingress(GrpcIngressMixin):
    def __init__(self, engine=None, api_key=None, max_queued_requests=4):
        self.engine = engine or FakeEngine()
        self.model_name = "tiny-scout"
        self.api_key = api_key
        self.admission = Admission(max_queued_requests)
        self.max_model_len = 64

    @property
    def in_flight(self):
        return self.admission.in_flight


async def collect(stream):
    return [message async for message in stream]


def generate(ingress, request, ctx=None):
    return asyncio.run(ingress.Generate(request, ctx or context()))


def generate_stream(ingress, request, ctx=None):
    return asyncio.run(collect(ingress.GenerateStream(request, ctx or context())))


def test_generate_assembles_the_whole_completion():
    ingress = Ingress()
    ctx = context()
    response = generate(ingress, pb.GenerateRequest(text="hello", logprobs=2, prompt_logprobs=True), ctx)
    assert ctx.code() is None
    assert response.request_id.startswith("grpc-") and response.model == "tiny-scout"
    assert list(response.token_ids) == [10, 11, 12, 13] and response.text == "abcd"
    assert list(response.prompt_token_ids) == PROMPT_IDS
    assert response.finish_reason == pb.FINISH_REASON_LENGTH
    assert (response.usage.prompt_tokens, response.usage.completion_tokens, response.usage.total_tokens) == (3, 4, 7)
    assert [(lp.token_id, lp.logprob) for lp in response.logprobs] == [(10, -0.5), (11, -0.25), (12, -0.75), (13, -1.25)]
    assert [(t.token_id, t.logprob) for t in response.logprobs[1].top_logprobs] == [(11, -0.25), (7, -2.0)]
    prompt_lps = [(p.token_id, p.logprob if p.HasField("logprob") else None) for p in response.prompt_logprobs]
    assert prompt_lps == [(1, None), (2, -1.0), (3, -2.0)]
    assert ingress.in_flight == 0 and ingress.engine.aborted == []


def test_request_fields_reach_the_engine():
    ingress = Ingress()
    request = pb.GenerateRequest(
        model="tiny-scout", token_ids=pb.TokenIds(ids=[5, 6]), max_tokens=7, temperature=0, top_p=0.5, top_k=3,
        stop=["\n"], stop_token_ids=[2], seed=42, logprobs=0, presence_penalty=0.5, frequency_penalty=-0.5,
        repetition_penalty=1.2, ignore_eos=True,
    )
    generate(ingress, request)
    prompt, params, request_id = ingress.engine.calls[0]
    assert prompt == [5, 6] and request_id.startswith("grpc-")
    assert (params.max_tokens, params.temperature, params.top_p, params.top_k, params.seed) == (7, 0, 0.5, 3, 42)
    assert (params.stop, params.stop_token_ids, params.logprobs, params.ignore_eos) == (["\n"], [2], 0, True)
    assert (params.presence_penalty, params.frequency_penalty, params.repetition_penalty) == (0.5, -0.5, 1.2)

    generate(ingress, pb.GenerateRequest(messages=[pb.ChatMessage(role="user", content="hi")]))
    prompt, params, _ = ingress.engine.calls[1]
    assert prompt == [{"role": "user", "content": "hi"}]
    assert (params.max_tokens, params.temperature, params.logprobs, params.prompt_logprobs) == (16, 1.0, None, False)


def test_stream_sends_deltas_that_add_up_to_the_unary_response():
    request = pb.GenerateRequest(text="hello", logprobs=2, prompt_logprobs=True)
    messages = generate_stream(Ingress(), request)
    unary = generate(Ingress(), request)
    assert [m.text for m in messages] == ["a", "bc", "d"]
    assert [list(m.token_ids) for m in messages] == [[10], [11, 12], [13]]
    assert len({m.request_id for m in messages}) == 1
    assert list(messages[0].prompt_token_ids) == PROMPT_IDS and len(messages[0].prompt_logprobs) == 3
    assert all(not m.prompt_token_ids and not m.prompt_logprobs for m in messages[1:])
    assert [m.finish_reason for m in messages] == [pb.FINISH_REASON_UNSPECIFIED] * 2 + [pb.FINISH_REASON_LENGTH]
    assert not messages[0].HasField("usage") and messages[-1].usage == unary.usage
    assert [lp for m in messages for lp in m.logprobs] == list(unary.logprobs)


BAD_REQUESTS = [
    (pb.GenerateRequest(), grpc.StatusCode.INVALID_ARGUMENT, "no input"),
    (pb.GenerateRequest(text="a", messages=[pb.ChatMessage(role="user")]), grpc.StatusCode.INVALID_ARGUMENT,
     "both text and messages"),
    (pb.GenerateRequest(token_ids=pb.TokenIds()), grpc.StatusCode.INVALID_ARGUMENT, "token_ids.ids is empty"),
    (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, -4])), grpc.StatusCode.INVALID_ARGUMENT, "token_ids.ids[1]"),
    (pb.GenerateRequest(messages=[pb.ChatMessage(role="robot")]), grpc.StatusCode.INVALID_ARGUMENT,
     "messages[0].role"),
    (pb.GenerateRequest(text="a", max_tokens=-5), grpc.StatusCode.INVALID_ARGUMENT, "max_tokens is -5"),
    (pb.GenerateRequest(text="a", temperature=-1), grpc.StatusCode.INVALID_ARGUMENT, "temperature is -1"),
    (pb.GenerateRequest(text="a", top_p=0), grpc.StatusCode.INVALID_ARGUMENT, "top_p"),
    (pb.GenerateRequest(text="a", top_k=-2), grpc.StatusCode.INVALID_ARGUMENT, "top_k"),
    (pb.GenerateRequest(text="a", seed=-1), grpc.StatusCode.INVALID_ARGUMENT, "seed"),
    (pb.GenerateRequest(text="a", stop=[""]), grpc.StatusCode.INVALID_ARGUMENT, "stop"),
    (pb.GenerateRequest(text="a", stop_token_ids=[-1]), grpc.StatusCode.INVALID_ARGUMENT, "stop_token_ids"),
    (pb.GenerateRequest(text="a", logprobs=21), grpc.StatusCode.INVALID_ARGUMENT, "logprobs is 21"),
    (pb.GenerateRequest(text="a", presence_penalty=3), grpc.StatusCode.INVALID_ARGUMENT, "presence_penalty"),
    (pb.GenerateRequest(text="a", frequency_penalty=-3), grpc.StatusCode.INVALID_ARGUMENT, "frequency_penalty"),
    (pb.GenerateRequest(text="a", repetition_penalty=0), grpc.StatusCode.INVALID_ARGUMENT, "repetition_penalty"),
    (pb.GenerateRequest(text="a", model="gpt-4"), grpc.StatusCode.NOT_FOUND, "model 'gpt-4' is not served here"),
]


@pytest.mark.parametrize("request_, code, detail", BAD_REQUESTS, ids=[b[2] for b in BAD_REQUESTS])
def test_bad_requests_get_a_status_naming_the_field(request_, code, detail):
    ingress = Ingress()
    ctx = context()
    assert generate(ingress, request_, ctx) == pb.GenerateResponse()
    assert ctx.code() == code and detail in ctx.details()

    ctx = context()
    with pytest.raises(RpcError):
        generate_stream(ingress, request_, ctx)
    assert ctx.code() == code and detail in ctx.details()
    assert ingress.engine.calls == [] and ingress.in_flight == 0


class RemoteValueError(ValueError):
    """Like the RayTaskError a DeploymentHandle raises for a ValueError in the Engine replica."""

    def __init__(self, cause):
        super().__init__(f"ray::Engine.generate() (pid=1)\nTraceback ...\n{cause}")
        self.cause = cause


@pytest.mark.parametrize("wrap", [lambda e: e, RemoteValueError], ids=["local", "remote"])
def test_engine_value_error_is_invalid_argument(wrap):
    message = "prompt has 9000 tokens; this deployment accepts at most 8192 (max_model_len)"
    for call in (generate, generate_stream):
        ingress = Ingress(FakeEngine(error=wrap(ValueError(message))))
        ctx = context()
        try:
            call(ingress, pb.GenerateRequest(text="long"), ctx)
        except RpcError:
            pass
        assert ctx.code() == grpc.StatusCode.INVALID_ARGUMENT and ctx.details() == message
        assert ingress.in_flight == 0 and ingress.engine.aborted == []


def test_api_key_is_required_and_never_echoed():
    key = "sk-secret-123"
    for metadata, allowed in [((), False), ((("authorization", "Bearer nope"),), False),
                              ((("authorization", key),), False), ((("authorization", f"Bearer {key}"),), True)]:
        for call in (generate, generate_stream):
            ingress = Ingress(api_key=key)
            ctx = context(metadata)
            try:
                call(ingress, pb.GenerateRequest(text="hi"), ctx)
            except RpcError:
                pass
            assert (ctx.code() is None) == allowed
            if not allowed:
                assert ctx.code() == grpc.StatusCode.UNAUTHENTICATED and "authorization: Bearer" in ctx.details()
                assert key not in ctx.details() and ingress.engine.calls == []
        ctx = context(metadata)
        models = asyncio.run(Ingress(api_key=key).ListModels(pb.ListModelsRequest(), ctx))
        assert (ctx.code() is None) == allowed and len(models.models) == int(allowed)


def test_full_queue_is_resource_exhausted():
    ingress = Ingress(max_queued_requests=1)
    assert ingress.admission.try_admit()
    ctx = context()
    generate(ingress, pb.GenerateRequest(text="hi"), ctx)
    assert ctx.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_queued_requests" in ctx.details()
    ctx = context()
    with pytest.raises(RpcError):
        generate_stream(ingress, pb.GenerateRequest(text="hi"), ctx)
    assert ctx.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert ingress.engine.calls == [] and ingress.in_flight == 1


def test_closing_the_stream_early_aborts_the_engine_request():
    async def read_one_then_close(ingress):
        stream = ingress.GenerateStream(pb.GenerateRequest(text="hi"), context())
        first = await stream.__anext__()
        await stream.aclose()
        return first

    ingress = Ingress()
    first = asyncio.run(read_one_then_close(ingress))
    assert ingress.engine.aborted == [first.request_id] and ingress.in_flight == 0


@pytest.mark.parametrize("num_updates", [0, 2], ids=["before-first-update", "mid-stream"])
@pytest.mark.parametrize("method", ["Generate", "GenerateStream"])
def test_cancelled_request_aborts_the_engine_request(method, num_updates):
    async def cancel_while_generating(ingress):
        call = getattr(ingress, method)(pb.GenerateRequest(text="hi"), context())
        task = asyncio.ensure_future(collect(call) if method == "GenerateStream" else call)
        while len(ingress.engine.calls) == 0 or ingress.in_flight == 0:
            await asyncio.sleep(0)
        for _ in range(10):
            await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    ingress = Ingress(FakeEngine(outputs=SCRIPT[:num_updates], hang=True))
    asyncio.run(cancel_while_generating(ingress))
    assert ingress.engine.aborted == [ingress.engine.calls[0][2]] and ingress.in_flight == 0


def test_finished_requests_are_not_aborted():
    ingress = Ingress()
    generate_stream(ingress, pb.GenerateRequest(text="hi"))
    generate(ingress, pb.GenerateRequest(text="hi"))
    assert ingress.engine.aborted == [] and ingress.in_flight == 0


def test_health_check_and_list_models():
    ingress = Ingress(api_key="k")
    for service in ("", "llama4serve.v1.Llama4Serve"):
        ctx = context()
        response = asyncio.run(ingress.Check(health_pb2.HealthCheckRequest(service=service), ctx))
        assert response.status == health_pb2.HealthCheckResponse.SERVING and ctx.code() is None
    ctx = context()
    asyncio.run(ingress.Check(health_pb2.HealthCheckRequest(service="other.Service"), ctx))
    assert ctx.code() == grpc.StatusCode.NOT_FOUND
    watched = asyncio.run(collect(ingress.Watch(health_pb2.HealthCheckRequest(), context())))
    assert [w.status for w in watched] == [health_pb2.HealthCheckResponse.SERVING]

    ctx = context([("authorization", "Bearer k")])
    models = asyncio.run(ingress.ListModels(pb.ListModelsRequest(), ctx))
    assert [m.id for m in models.models] == ["tiny-scout"]


def test_rpc_error_survives_pickling():
    # A streaming method's RpcError crosses from the replica to Serve's proxy inside a RayTaskError.
    message = "top_p is 0; allowed (0, 1]"
    error = pickle.loads(pickle.dumps(RpcError(BAD_INPUT, message)))
    assert (error.code, error.details, str(error), error.kind) == (grpc.StatusCode.INVALID_ARGUMENT, message, message,
                                                                   BAD_INPUT)

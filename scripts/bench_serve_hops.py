"""What each hop of a served token costs, measured apart from the model (docs/benchmarks.md, issue 21).

    python scripts/bench_serve_hops.py [--streams 16] [--tokens 64] [--model DIR]

1. SSE / gRPC encoding: the OpenAI completion formatter + `sse()`, or the gRPC service's delta message
   serialized, per token.
2. Engine -> Ingress through a Serve handle: `--streams` concurrent streams of `--tokens` RequestOutputs each
   (one Ray object per token per request, the old way) against one stream of `--tokens` lists of `--streams`
   outputs (one message per step, the batched way), per token; each over Ray object refs and over the replicas'
   gRPC servers (what the Ingress uses, `serving/engine_client.py`).
3. Ingress -> client through Serve's HTTP proxy (over gRPC, `serving/serve_env.py`): `--streams` concurrent SSE
   responses of `--tokens` events, per event.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path

import httpx
import ray
from ray import serve
from starlette.responses import StreamingResponse

from llama4serve.cluster.cli.generate_cmd import resolve_model
from llama4serve.cluster.inputs.tokenizer import Tokenizer
from llama4serve.cluster.outputs import RequestOutput
from llama4serve.cluster.serving.openai.formatters import CompletionFormatter
from llama4serve.cluster.serving.openai.protocol import CompletionRequest
from llama4serve.cluster.serving import serve_env
from llama4serve.cluster.serving.openai.serving import sse


def _out(rid: str, i: int) -> RequestOutput:
    return RequestOutput(rid, [], [100 + i % 50], " tok", num_generated_tokens=i + 1)


@serve.deployment(ray_actor_options={"num_cpus": 0})
class Source:
    async def per_request(self, rid: str, tokens: int):
        for i in range(tokens):
            yield _out(rid, i)

    async def batched(self, streams: int, tokens: int):
        for i in range(tokens):
            yield [_out(str(s), i) for s in range(streams)]

    async def __call__(self, request):
        tokens = int(request.query_params["tokens"])

        async def events():
            for i in range(tokens):
                yield sse({"id": "x", "object": "text_completion", "choices": [{"index": 0, "text": " tok"}]})
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")


def grpc_cost(tokens: int) -> float:
    """A stream delta as the gRPC service builds it (`_add_output`), serialized."""
    from llama4serve.cluster.serving.grpc.service import _add_output
    from llama4serve.protos import llama4serve_pb2 as pb

    outs = [RequestOutput("r", [1, 2, 3], [100 + i % 50], " tok", num_generated_tokens=i + 1) for i in range(tokens)]
    t0 = time.perf_counter()
    for i, out in enumerate(outs):
        delta = pb.GenerateStreamResponse(request_id="r", model="m")
        _add_output(delta, out, first=i == 0)
        delta.SerializeToString()
    return (time.perf_counter() - t0) / tokens


def sse_cost(model_dir: Path, tokens: int) -> float:
    tokenizer = Tokenizer.from_dir(model_dir)
    body = CompletionRequest(model="m", prompt=[1, 2, 3], max_tokens=tokens, stream=True)
    formatter = CompletionFormatter("cmpl-x", "m", tokenizer, [[1, 2, 3]], body)
    outs = [RequestOutput("r", [1, 2, 3], [100 + i % 50], " tok", num_generated_tokens=i + 1) for i in range(tokens)]
    t0 = time.perf_counter()
    for out in outs:
        for chunk in formatter.stream_chunks(0, out):
            sse(chunk)
    return (time.perf_counter() - t0) / tokens


async def handle_costs(handle, streams: int, tokens: int, by_reference: bool) -> tuple[float, float]:
    """Per token: one object per token per request, and one message per step; over Ray object refs or (the
    Ingress's way, `engine_client.py`) over the replicas' gRPC servers."""
    stream = handle.options(stream=True, _by_reference=by_reference)

    async def one(rid):
        return [o async for o in stream.per_request.remote(rid, tokens)]

    await asyncio.gather(*(one(str(s)) for s in range(2)))  # warm-up
    t0 = time.perf_counter()
    await asyncio.gather(*(one(str(s)) for s in range(streams)))
    per_request = (time.perf_counter() - t0) / (streams * tokens)
    t0 = time.perf_counter()
    [b async for b in stream.batched.remote(streams, tokens)]
    batched = (time.perf_counter() - t0) / (streams * tokens)
    return per_request, batched


async def http_cost(port: int, streams: int, tokens: int) -> float:
    async with httpx.AsyncClient(timeout=120) as client:
        async def one():
            async with client.stream("GET", f"http://127.0.0.1:{port}/hops?tokens={tokens}") as r:
                return len([line async for line in r.aiter_lines() if line.startswith("data: ")])

        await asyncio.gather(*(one() for _ in range(2)))
        t0 = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(streams)))
        return (time.perf_counter() - t0) / (streams * tokens)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--streams", type=int, default=16)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--model", type=Path, help="checkpoint whose tokenizer formats the SSE chunks")
    p.add_argument("--port", type=int, default=8765)
    args = p.parse_args()
    model_dir = resolve_model(args.model, "bench-small", Path.home() / ".cache" / "llama4serve")
    sse_s, grpc_s = sse_cost(model_dir, 2000), grpc_cost(2000)
    serve_env.apply()  # the proxy reaches the replica as under `llama4serve serve`
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    handle = serve.run(Source.bind(), name="hops", route_prefix="/hops")
    try:
        costs = {by_ref: asyncio.run(handle_costs(handle, args.streams, args.tokens, by_ref))
                 for by_ref in (True, False)}
        http_s = asyncio.run(http_cost(args.port, args.streams, args.tokens))
    finally:
        serve.shutdown()
        ray.shutdown()
    print(f"{args.streams} streams x {args.tokens} tokens; per token (us):")
    print(f"  SSE encoding (formatter + sse)                 {sse_s * 1e6:8.1f}")
    print(f"  gRPC encoding (_add_output + serialize)        {grpc_s * 1e6:8.1f}")
    for by_ref, (per_request, batched) in costs.items():
        way = "object refs" if by_ref else "gRPC"
        print(f"  handle ({way:11}), one object per token per request {per_request * 1e6:8.1f}")
        print(f"  handle ({way:11}), one message per step (batched)   {batched * 1e6:8.1f}")
    print(f"  HTTP proxy, one SSE event (incl. encoding), proxy over gRPC  {http_s * 1e6:8.1f}")


if __name__ == "__main__":
    main()

"""`llama4serve bench`: measures this engine and a reference side by side in one run and prints the ratios.

Batch-1 decode on the `bench-small` preset: our tokens/s, `transformers` `generate` tokens/s on the same
checkpoint, and the memory-bandwidth floor (weight bytes a decode step must read / bandwidth measured now).
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path

import torch

from llama4serve.actors.model.config import ModelConfig, load_model_config
from llama4serve.kernels.linear import linear, pack_weight
from llama4serve.cluster.cli.bench_serve import add_serve_arguments, serve_suite
from llama4serve.cluster.cli.generate_cmd import resolve_model
from llama4serve.cluster.engine.llm import LLM
from llama4serve.cluster.sampling_params import SamplingParams

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def decode_weight_bytes(cfg: ModelConfig, dtype: str) -> int:
    """Weight bytes one batch-1 decode step reads: attention, norms, dense MLPs, router, shared expert and the
    top-k routed experts of each layer, final norm, one embedding row and the lm_head."""
    h, d = cfg.hidden_size, cfg.head_dim
    attn = h * d * (2 * cfg.num_attention_heads + 2 * cfg.num_key_value_heads) + 2 * h
    params = h + h + cfg.vocab_size * h  # embedding row, final norm, lm_head
    for i in range(cfg.num_hidden_layers):
        params += attn
        if cfg.is_moe_layer(i):
            params += cfg.num_experts * h + 3 * h * cfg.intermediate_size * (1 + cfg.num_experts_per_tok)
        else:
            params += 3 * h * cfg.intermediate_size_mlp
    return params * DTYPE_BYTES[dtype]


def _best_time(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def measure_bandwidth(nbytes: int = 1 << 29, repeats: int = 5) -> tuple[float, float]:
    """(raw read bandwidth, GEMV streaming bandwidth) in bytes/s over a buffer larger than the caches.

    Raw: a full reduction (`sum`), the most the memory system delivers to torch. GEMV: one [1, K] x [K, N]
    product through our `linear` (the native panel kernel where available), for context.
    """
    buf = torch.ones(nbytes // 4, dtype=torch.float32)
    raw = nbytes / _best_time(buf.sum, repeats)
    weight = pack_weight(buf.view(1024, -1))
    del buf
    x = torch.ones(1, 1024)
    gemv = nbytes / _best_time(lambda: linear(x, weight), repeats)
    return raw, gemv


def _decode_tps(llm: LLM, prompt: list[int], new_tokens: int) -> float:
    """Batch-1 decode tokens/s of one request, from its first sampled token on (prefill excluded)."""
    engine = llm.engine
    engine.add_request(prompt, SamplingParams(max_tokens=new_tokens + 1, temperature=0, ignore_eos=True))
    engine.step()  # prefill + first token
    t0 = time.perf_counter()
    while engine.has_work():
        engine.step()
    return new_tokens / (time.perf_counter() - t0)


def transformers_decode_tps(model_dir: Path, prompt: list[int], new_tokens: int, dtype: str) -> float:
    try:
        from transformers import Llama4ForConditionalGeneration
    except ImportError:
        raise SystemExit("bench needs transformers for the reference: pip install -e '.[test]'") from None
    model = Llama4ForConditionalGeneration.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()
    ids = torch.tensor([prompt])

    def run(n: int) -> float:
        t0 = time.perf_counter()
        with torch.inference_mode():
            model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        return time.perf_counter() - t0

    run(4)  # warm-up
    return new_tokens / (run(new_tokens + 1) - run(1))


async def _serve_concurrently(engine, prompts: list[list[int]], params: SamplingParams) -> tuple[float, list, list]:
    """(seconds for all, time to first token of each request, gaps between its later tokens)."""
    ttft, itl = [], []

    async def one(prompt):
        t0 = last = time.perf_counter()
        async for out in engine.generate(prompt, params):
            now = time.perf_counter()
            if out.num_generated_tokens == len(out.token_ids):
                ttft.append(now - t0)
            else:
                itl.extend([(now - last) / len(out.token_ids)] * len(out.token_ids))
            last = now

    t0 = time.perf_counter()
    await asyncio.gather(*(one(p) for p in prompts))
    return time.perf_counter() - t0, ttft, itl


def transformers_batch_tps(model_dir: Path, prompts: list[list[int]], new_tokens: int, dtype: str) -> float:
    """transformers `generate` on all prompts in one batch (equal lengths: no padding involved)."""
    from transformers import Llama4ForConditionalGeneration

    model = Llama4ForConditionalGeneration.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()
    ids = torch.tensor(prompts)
    with torch.inference_mode():
        model.generate(ids[:2], max_new_tokens=2, do_sample=False, pad_token_id=0)  # warm-up
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    return len(prompts) * new_tokens / (time.perf_counter() - t0)


def _percentiles(values: list[float]) -> str:
    ordered = sorted(values)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1e3  # noqa: E731
    return f"p50 {pick(0.5):7.1f}  p90 {pick(0.9):7.1f}  p99 {pick(0.99):7.1f} ms"


def _ours_concurrently(model_dir: Path, prompts: list[list[int]], args, steps_per_call: int):
    """(tokens/s, time to first token of each request, inter-token gaps) of the AsyncEngine on all prompts."""
    from llama4serve.cluster.engine.async_engine import AsyncEngine
    from llama4serve.cluster.config import EngineConfig

    params = SamplingParams(max_tokens=args.new_tokens, temperature=0, ignore_eos=True)
    engine = AsyncEngine(EngineConfig(model=str(model_dir), dtype=args.dtype, max_num_seqs=len(prompts),
                                      num_scheduler_steps=steps_per_call))
    try:
        asyncio.run(_serve_concurrently(engine, prompts[:2], SamplingParams(max_tokens=2, temperature=0)))  # warm-up
        elapsed, ttft, itl = asyncio.run(_serve_concurrently(engine, prompts, params))
    finally:
        engine.shutdown()
    return len(prompts) * args.new_tokens / elapsed, ttft, itl


def concurrency_suite(model_dir: Path, prompts: list[list[int]], args) -> None:
    k = args.num_scheduler_steps
    runs = {"AsyncEngine, 1x0": _ours_concurrently(model_dir, prompts, args, 1),
            f"AsyncEngine, 1x0, {k} steps/call": _ours_concurrently(model_dir, prompts, args, k)}
    ref = transformers_batch_tps(model_dir, prompts, args.new_tokens, args.dtype)
    print(f"model {model_dir} ({args.dtype}), {len(prompts)} concurrent requests of {args.prompt_tokens} prompt "
          f"tokens, {args.new_tokens} new tokens each, {torch.get_num_threads()} threads")
    print(f"{'':48} {'tokens/s':>10} {'vs transformers':>16}")
    for name, (tps, _, _) in runs.items():
        print(f"{'llama4serve (' + name + ')':48} {tps:10.1f} {tps / ref:16.2f}")
    print(f"{'transformers generate (one batch)':48} {ref:10.1f} {1.0:16.2f}")
    for name, (_, ttft, itl) in runs.items():
        print(f"{name}:")
        print(f"  time to first token    {_percentiles(ttft)}")
        print(f"  inter-token latency    {_percentiles(itl)}")


def add_bench_subcommand(subparsers) -> None:
    p = subparsers.add_parser("bench", help="benchmark batch-1 decode against transformers and the bandwidth floor")
    p.add_argument("--model", type=Path, help="checkpoint directory (default: a bench-small checkpoint)")
    p.add_argument("--preset", default="bench-small", help="preset made when --model is not given")
    p.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "llama4serve")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPE_BYTES))
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--suite", default="decode",
                   choices=["decode", "concurrency", "expert-parallel", "quantized", "serve", "prefix",
                            "structured"],
                   help="decode: batch-1 decode vs transformers and the bandwidth floor; "
                        "concurrency: --concurrency streamed requests vs transformers generate on one batch, "
                        "with time to first token and inter-token latency; "
                        "expert-parallel: 1x2 vs 1x0 at batch 1 and --concurrency per transport, the in-step cost "
                        "per MoE exchange and the transport alone; "
                        "quantized: batch-1 and batch-32 decode in fp32, bf16, fp8 and int4 with bytes per step; "
                        "serve: `llama4serve serve` with --serve-streams streaming clients vs the offline engine; "
                        "prefix: prefix caching on vs off (shared-prefix TTFT, 8-turn chat throughput); "
                        "structured: batch --concurrency decode with every row under a JSON schema vs unconstrained")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--trials", type=int, default=5, help="decode suite: bandwidth + decode measurements; expert-parallel: rounds of every instance in turn")
    p.add_argument("--num-scheduler-steps", type=int, default=8,
                   help="decode steps per actor call (num_scheduler_steps) of the multi-step rows")
    add_serve_arguments(p)
    p.set_defaults(func=main_bench)


def main_bench(args: argparse.Namespace) -> int:
    model_dir = resolve_model(args.model, args.preset, args.cache_dir)
    cfg = load_model_config(model_dir)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, min(cfg.vocab_size, 1000), (args.prompt_tokens,), generator=g).tolist()
               for _ in range(args.concurrency)]
    if args.suite == "expert-parallel":
        from llama4serve.cluster.cli.bench_expert_parallel import expert_parallel_suite

        expert_parallel_suite(model_dir, prompts, args)
        return 0
    if args.suite == "concurrency":
        concurrency_suite(model_dir, prompts, args)
        return 0
    if args.suite == "serve":
        serve_suite(model_dir, cfg, args)
        return 0
    if args.suite == "prefix":
        from llama4serve.cluster.cli.bench_prefix import prefix_suite

        prefix_suite(model_dir, cfg.vocab_size, args)
        return 0
    if args.suite == "structured":
        from llama4serve.cluster.cli.bench_structured import structured_suite

        structured_suite(model_dir, prompts, args)
        return 0
    if args.suite == "quantized":
        from llama4serve.cluster.cli.bench_quantized import quantized_suite

        quantized_suite(model_dir, args.preset, prompts, args)
        return 0
    decode_suite(model_dir, cfg, prompts[0], args)
    return 0


def decode_suite(model_dir: Path, cfg: ModelConfig, prompt: list[int], args) -> None:
    """Batch-1 decode, one step per call and num_scheduler_steps per call, against transformers and the
    bandwidth floor. The memory bandwidth of a shared machine drifts by tens of percent within minutes, so each
    trial measures it right before its own decode runs; the floor uses the faster of the two streams measured."""
    step_bytes = decode_weight_bytes(cfg, args.dtype)
    k = args.num_scheduler_steps
    trials = []
    with LLM(str(model_dir), dtype=args.dtype, num_scheduler_steps=1) as single, \
            LLM(str(model_dir), dtype=args.dtype, num_scheduler_steps=k) as multi:
        for llm in (single, multi):
            llm.generate(prompt, SamplingParams(max_tokens=4, temperature=0))  # warm-up
        for _ in range(args.trials):
            raw, gemv = measure_bandwidth()
            trials.append((raw, gemv, _decode_tps(single, prompt, args.new_tokens),
                           _decode_tps(multi, prompt, args.new_tokens)))
    ref = transformers_decode_tps(model_dir, prompt, args.new_tokens, args.dtype)
    print(f"model {model_dir} ({args.dtype}), prompt {args.prompt_tokens} tokens, {args.new_tokens} decode steps, "
          f"{torch.get_num_threads()} threads; weight bytes per decode step {step_bytes / 1e6:.1f} MB")
    print("trial  read GB/s  GEMV GB/s  floor tok/s   1 step/call tok/s (/floor)   "
          f"{k} steps/call tok/s (/floor)")
    for i, (raw, gemv, one, many) in enumerate(trials):
        floor = max(raw, gemv) / step_bytes
        print(f"{i:5} {raw / 1e9:10.2f} {gemv / 1e9:10.2f} {floor:12.1f} {one:19.1f} ({one / floor:4.2f}) "
              f"{many:24.1f} ({many / floor:4.2f})")
    median = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    one = median([t[2] for t in trials])
    many = median([t[3] for t in trials])
    print(f"{'':36} {'tokens/s':>10} {'vs transformers':>16} {'vs floor (median of trials)':>28}")
    for name, tps, col in (("llama4serve, 1 step per call", one, 2), (f"llama4serve, {k} steps per call", many, 3)):
        ratio = median([t[col] * step_bytes / max(t[0], t[1]) for t in trials])
        print(f"{name:36} {tps:10.1f} {tps / ref:16.2f} {ratio:28.2f}")
    print(f"{'transformers generate':36} {ref:10.1f} {1.0:16.2f}")

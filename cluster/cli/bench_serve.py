"""`llama4serve bench --suite serve`: the served model against the offline engine, same prompts, same run.

Starts the app `llama4serve serve` deploys (`start_serve`, with its HTTP and gRPC proxies, on a local Ray
cluster), sends each of `--serve-streams` (16,64) concurrent streaming clients one completion request (random
token-id prompts of `--input-len` tokens, `--output-len` new tokens, `ignore_eos`, like `vllm bench serve
--dataset-name random`) over HTTP/SSE, then runs `LLM.generate` on the same prompts. It prints output tok/s,
TTFT and ITL p50/p99 (ITL: gaps between a stream's chunks), the served/offline ratio, one prompt's prefill time,
and where the Engine replica's loop spent each step (from `Engine.stream_stats`). Last, the TTFT of 8 new
requests sent one after another while streams - 1 others decode: the admission latency the issue's TTFT target
is about, apart from a burst's own queue of prefills; it and one prompt's prefill use prompts no engine has seen
(a seen one is a prefix-cache hit). Both sides first run each burst once untimed (an actor's first large prefill
costs far more than later ones). `--serve-option FIELD=VALUE` sets a ServeConfig field of the server, e.g.
`stream_interval=2`; the offline side is unchanged by it.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

from llama4serve.cluster.sampling_params import SamplingParams
from llama4serve.cluster.serving import serve_env


def add_serve_arguments(p) -> None:
    p.add_argument("--serve-streams", default="16,64", help="serve suite: concurrent streams, comma-separated")
    p.add_argument("--input-len", type=int, default=128, help="serve suite: prompt tokens")
    p.add_argument("--output-len", type=int, default=64, help="serve suite: generated tokens (ignore_eos)")
    p.add_argument("--serve-trials", type=int, default=3, help="serve suite: served + offline runs per stream count")
    p.add_argument("--serve-option", action="append", default=[], metavar="FIELD=VALUE",
                   help="serve suite: a ServeConfig field of the server (repeatable), e.g. stream_interval=4")


@dataclass
class Run:
    wall_s: float = 0.0
    tokens: int = 0
    ttft: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)
    stats: dict = field(default_factory=dict)  # Engine.stream_stats over the run
    cpu: dict = field(default_factory=dict)  # CPU seconds per process role over the run
    batch_prefill_s: float = 0.0  # offline, the same prompts' prefill at once


ROLES = {"AttentionActor": "attention actor", "Engine": "Engine replica", "Ingress": "Ingress replica",
         "ProxyActor": "HTTP proxy", "ServeController": "Serve controller"}


def cpu_by_role() -> dict[str, float]:
    """CPU seconds so far of this machine's Ray processes by role (from their process titles), and this one's
    (the benchmark's clients)."""
    import psutil

    totals = dict.fromkeys(list(ROLES.values()) + ["clients (this process)"], 0.0)
    for proc in psutil.process_iter(["cmdline"]):
        try:
            title = " ".join(proc.info["cmdline"] or [])
            role = next((r for key, r in ROLES.items() if title.startswith("ray::") and key in title), None)
            if proc.pid == os.getpid():
                role = "clients (this process)"
            if role is not None:
                t = proc.cpu_times()
                totals[role] += t.user + t.system
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return totals


def random_prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, min(vocab, 1000)) for _ in range(length)] for _ in range(n)]


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1e3 if ordered else float("nan")


async def _stream_one(client, url: str, body: dict, run: Run) -> None:
    t0 = time.perf_counter()
    last = None
    async with client.stream("POST", url, json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            now = time.perf_counter()
            if chunk.get("usage"):
                run.tokens += chunk["usage"]["completion_tokens"]
            if not chunk.get("choices"):
                continue
            if last is None:
                run.ttft.append(now - t0)
            else:
                run.itl.append(now - last)
            last = now


async def drive(port: int, model: str, prompts: list[list[int]], output_len: int) -> Run:
    import httpx

    url = f"http://127.0.0.1:{port}/v1/completions"
    run = Run()
    limits = httpx.Limits(max_connections=len(prompts) + 4, max_keepalive_connections=len(prompts) + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:
        bodies = [{"model": model, "prompt": p, "max_tokens": output_len, "temperature": 0, "ignore_eos": True,
                   "stream": True, "stream_options": {"include_usage": True}} for p in prompts]
        t0 = time.perf_counter()
        await asyncio.gather(*(_stream_one(client, url, b, run) for b in bodies))
        run.wall_s = time.perf_counter() - t0
    return run


async def ttft_under_load(port: int, model: str, prompts: list[list[int]], probes: list[list[int]],
                          output_len: int) -> list[float]:
    """TTFT of `probes` sent one after another while `prompts` stream: the admission latency of a new request
    among running streams, without a burst's own prefill queue. SystemExit if a stream ends before the probes."""
    import httpx

    url = f"http://127.0.0.1:{port}/v1/completions"
    limits = httpx.Limits(max_connections=len(prompts) + 4, max_keepalive_connections=len(prompts) + 4)
    body = {"model": model, "temperature": 0, "ignore_eos": True, "stream": True}
    running, probe_run = Run(), Run()
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:
        background = [asyncio.create_task(_stream_one(client, url, {**body, "prompt": p, "max_tokens": output_len},
                                                      running)) for p in prompts]
        deadline = time.monotonic() + 120
        while len(running.ttft) < len(prompts) and time.monotonic() < deadline:  # until every stream decodes
            await asyncio.sleep(0.05)
        for p in probes:
            await asyncio.sleep(0.05)
            await _stream_one(client, url, {**body, "prompt": p, "max_tokens": 2}, probe_run)
        ended = sum(t.done() for t in background)
        for t in background:
            t.cancel()
        await asyncio.gather(*background, return_exceptions=True)
    if ended or len(running.ttft) < len(prompts):
        raise SystemExit(f"{ended} of {len(prompts)} running streams ended before the probes did: raise --output-len")
    return probe_run.ttft


def _wait_healthy(port: int, timeout_s: float = 600.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"the server did not become healthy within {timeout_s:g} s")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stats_delta(after: dict, before: dict) -> dict:
    return {k: after[k] - before.get(k, 0) for k in after}


class Offline:
    """The offline engine (`LLM.generate`) on the same checkpoint, kept loaded beside the server."""

    def __init__(self, model_dir: Path, dtype: str, max_num_seqs: int, output_len: int):
        from llama4serve.cluster.engine.llm import LLM

        self.llm = LLM(str(model_dir), dtype=dtype, max_num_seqs=max_num_seqs, num_scheduler_steps=1)
        self.params = SamplingParams(max_tokens=output_len, temperature=0, ignore_eos=True)

    def prefill_s(self, prompts: list[list[int]]) -> float:
        """One prompt's prefill (and first token), best of the prompts given."""
        best = float("inf")
        for prompt in prompts:
            t0 = time.perf_counter()
            self.llm.generate([prompt], SamplingParams(max_tokens=1, temperature=0))
            best = min(best, time.perf_counter() - t0)
        return best

    def batch_prefill_s(self, prompts: list[list[int]]) -> float:
        """All the prompts' prefill (and first tokens) at once: the prefill work in a burst's TTFT."""
        t0 = time.perf_counter()
        self.llm.generate(prompts, SamplingParams(max_tokens=1, temperature=0))
        return time.perf_counter() - t0

    def tokens_per_s(self, prompts: list[list[int]]) -> float:
        t0 = time.perf_counter()
        outs = self.llm.generate(prompts, self.params)
        return sum(len(o.token_ids) for o in outs) / (time.perf_counter() - t0)


def run_suite(model_dir: Path, dtype: str, workloads: dict[int, list[list[int]]], output_len: int,
              trials: int, serve_options: dict | None = None
              ) -> tuple[dict[int, list[tuple[Run, float]]], float, dict[int, list[float]]]:
    """({streams: [(served run, offline tok/s)] per trial}, one prompt's prefill s, {streams: TTFTs of new
    requests among streams - 1 running ones}). Served and offline runs alternate, so that a shared machine's
    drift hits both alike."""
    from ray import serve

    from llama4serve.cluster.cli.serve_cmd import APP_NAME, start_serve
    from llama4serve.cluster.serving.serve_config import ServeConfig

    config = ServeConfig(model=str(model_dir), dtype=dtype, http_port=_free_port(), grpc_port=_free_port(),
                         max_num_seqs=max(workloads), **(serve_options or {}))
    name = config.model_name()
    start_serve(config)
    results: dict[int, list[tuple[Run, float]]] = {n: [] for n in workloads}
    offline = None
    try:
        _wait_healthy(config.http_port)
        engine = serve.get_deployment_handle("Engine", APP_NAME)
        warm = next(iter(workloads.values()))
        offline = Offline(model_dir, dtype, max(workloads), output_len)
        for prompts in workloads.values():  # warm-up: each side's first burst of prefills pays for its memory
            asyncio.run(drive(config.http_port, name, prompts, 4))
            offline.batch_prefill_s(prompts)
        # Prompts neither engine has seen: a repeated one would be a prefix-cache hit, not a prefill.
        prefill = offline.prefill_s(random_prompts(3, len(warm[0]), 1000, seed=-1))
        for _ in range(trials):
            for n, prompts in workloads.items():
                before, cpu = engine.stream_stats.remote().result(timeout_s=60), cpu_by_role()
                run = asyncio.run(drive(config.http_port, name, prompts, output_len))
                run.cpu = _stats_delta(cpu_by_role(), cpu)
                run.stats = _stats_delta(engine.stream_stats.remote().result(timeout_s=60), before)
                run.batch_prefill_s = offline.batch_prefill_s(prompts)
                results[n].append((run, offline.tokens_per_s(prompts)))
        probes = {n: random_prompts(8, len(warm[0]), 1000, seed=-2 - n) for n in workloads}  # unseen, per n
        loaded = {n: asyncio.run(ttft_under_load(config.http_port, name, prompts[1:], probes[n], 4 * output_len))
                  for n, prompts in workloads.items()}
    finally:
        if offline is not None:
            offline.llm.shutdown()
        serve.delete(APP_NAME)
        serve.shutdown()
    return results, prefill, loaded


def serve_suite(model_dir: Path, cfg, args) -> None:
    import ray
    import yaml

    streams = [int(x) for x in str(args.serve_streams).split(",") if x.strip()]
    workloads = {n: random_prompts(n, args.input_len, cfg.vocab_size, seed=n) for n in streams}
    if not ray.is_initialized():
        serve_env.apply()  # what `llama4serve serve` runs with
        ray.init(address="local", num_cpus=max(os.cpu_count() or 1, 8), include_dashboard=False, log_to_driver=False)
    options = {k: yaml.safe_load(v) for k, _, v in (o.partition("=") for o in args.serve_option)}
    results, prefill, loaded = run_suite(model_dir, args.dtype, workloads, args.output_len, args.serve_trials, options)
    shown = ", ".join(f"{k} {v}" for k, v in options.items()) or "defaults"
    print(f"model {model_dir} ({args.dtype}), {args.input_len} prompt tokens (random ids), {args.output_len} "
          f"new tokens (ignore_eos), one request per stream, {os.cpu_count()} cores, {args.serve_trials} trials "
          f"(served and offline alternate; the trial with the median ratio is shown); server options: {shown}")
    print(f"one prompt's prefill (offline, best of 3): {prefill * 1e3:.1f} ms")
    print(f"{'streams':>7} {'served tok/s':>12} {'offline tok/s':>13} {'ratio':>6} {'TTFT p50':>9} {'p99':>7} "
          f"{'ITL p50':>8} {'p99':>7} {'TTFT p50/prefill':>16} {'burst prefill':>13}  ratios of all trials")
    served = {}
    for n in streams:
        trials = sorted(results[n], key=lambda t: t[0].tokens / t[0].wall_s / t[1])
        run, off = served[n] = trials[len(trials) // 2]
        tps = run.tokens / run.wall_s
        ratios = " ".join(f"{t[0].tokens / t[0].wall_s / t[1]:.2f}" for t in results[n])
        print(f"{n:7d} {tps:12.1f} {off:13.1f} {tps / off:6.2f} {pct(run.ttft, .5):9.1f} "
              f"{pct(run.ttft, .99):7.1f} {pct(run.itl, .5):8.1f} {pct(run.itl, .99):7.1f} "
              f"{pct(run.ttft, .5) / 1e3 / prefill:16.2f} {run.batch_prefill_s * 1e3:13.1f}  {ratios}")
    print("Engine replica, per step (ms): wait = actors' step + postprocess, launch = schedule + send, "
          "outputs = detokenize + stops; per channel message: take (deltas) and deltas carried")
    for n in streams:
        run = served[n][0]
        s = run.stats
        steps, msgs = max(s["steps"], 1), max(s["messages"], 1)
        print(f"{n:7d} streams: {s['steps']} steps, step interval {run.wall_s / steps * 1e3:6.2f} "
              f"(offline {n / served[n][1] * 1e3:6.2f}), "
              f"wait {s['wait_s'] / steps * 1e3:6.2f}, launch {s['launch_s'] / steps * 1e3:5.2f}, "
              f"outputs {s['outputs_s'] / steps * 1e3:5.2f}; {s['messages']} messages, "
              f"take {s['take_s'] / msgs * 1e3:5.2f}, {s['deltas'] / msgs:5.1f} deltas each; mean TTFT inside "
              f"the replica {s['first_s'] / max(s['num_first'], 1) * 1e3:6.1f} (client: {mean(run.ttft) * 1e3:6.1f})")
    print("CPU ms per generated token, by process (2 cores: whatever is not the attention actor's is taken from it)")
    for n in streams:
        run = served[n][0]
        print(f"{n:7d} streams: " + ", ".join(f"{role} {sec / run.tokens * 1e3:.2f}" for role, sec in run.cpu.items()))
    print("A new request among streams - 1 running ones (8 probes one after another, while the others decode):")
    for n in streams:
        print(f"{n:7d} streams: TTFT p50 {pct(loaded[n], .5):7.1f} ms, p99 {pct(loaded[n], .99):7.1f} ms, "
              f"{pct(loaded[n], .5) / 1e3 / prefill:5.2f}x one prompt's prefill (target at 16 streams: <= 2)")

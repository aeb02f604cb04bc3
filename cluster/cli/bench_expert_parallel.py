"""`llama4serve bench --suite expert-parallel`: what expert parallelism costs on one node, in one run.

1. Decode throughput of 1x0 (experts in the attention actor) and 1x2 (two expert actors) at batch 1 and at batch
   --concurrency (32), for each transport of the router (`collective`: gloo all_to_all over loopback; `shm`:
   shared memory with a futex doorbell; and shm with ping-pong micro-batches, which the batch-1 steps, under 8
   rows, do not use), with the ratios against the targets (0.6x at batch 1, 0.75x at 32).
2. The in-step cost per MoE-layer exchange (attention-0's `exchange_stats`: dispatch to combined results,
   including the expert actors' compute and their wait for the step call).
3. The transport alone: the same blocks (header + capacity rows of H, each way) between actors placed and
   threaded like attention-0 and the two expert actors (`ExchangeProbe`), outside the model.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

import ray
import torch

from llama4serve.actors.model.config import load_model_config
from llama4serve.actors.parallel.exchange_probe import ExchangeProbe
from llama4serve.actors.parallel.router import ExpertLayout, header_rows
from llama4serve.cluster.engine.llm import LLM
from llama4serve.cluster.sampling_params import SamplingParams

TARGETS = {1: 0.6, 32: 0.75}  # 1x2 tokens/s over 1x0 tokens/s, by batch size (issue 20)
TRANSPORTS = ("collective", "shm")
PROBE_EXCHANGES = 400


def _measure(llm: LLM, prompts: list[list[int]], new_tokens: int) -> tuple[float, float, int]:
    """(generated tokens/s, exchange seconds on attention-0, exchanges) of all prompts submitted at once."""
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    actor = llm.engine.data_plane.attention[0]
    before = ray.get(actor.exchange_stats.remote())
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - t0
    after = ray.get(actor.exchange_stats.remote())
    return sum(len(o.token_ids) for o in outs) / elapsed, after[0] - before[0], after[1] - before[1]


def decode_rounds(model_dir: Path, prompts: list[list[int]], batches: tuple[int, ...], new_tokens: int, dtype: str,
                  rounds: int) -> dict[str, dict[int, list[tuple[float, float, int]]]]:
    """{instance: {batch: [(tokens/s, exchange s, exchanges) per round]}} for 1x0 and 1x2 per transport, all
    instances up at once and measured in turns, round after round: load from other work on a shared machine
    hits every instance alike, and the ratios are taken within a round."""
    names = {"1x0": (0, "collective", False), **{f"1x2 {t}": (2, t, False) for t in TRANSPORTS},
             "1x2 shm ping-pong": (2, "shm", True)}
    runs: dict = {name: {b: [] for b in batches} for name in names}
    with contextlib.ExitStack() as stack:
        llms = {}
        for name, (experts, transport, ping_pong) in names.items():
            llms[name] = llm = stack.enter_context(LLM(
                str(model_dir), attention_actors=1, expert_actors=experts, dtype=dtype, max_num_seqs=max(batches),
                num_scheduler_steps=1, expert_transport=transport, ping_pong=ping_pong))
            got = ray.get(llm.engine.data_plane.attention[0].exchange_name.remote())
            if experts and got != transport:
                raise SystemExit(f"asked for transport {transport!r}, the instance runs {got!r}")
            llm.generate(prompts[:2], SamplingParams(max_tokens=4, temperature=0))  # warm-up
        for _ in range(rounds):
            for batch in batches:
                for name, llm in llms.items():
                    runs[name][batch].append(_measure(llm, prompts[:batch], new_tokens))
    return runs


def _median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def transport_alone(model_dir: Path, batches: tuple[int, ...], dtype: str, experts: int = 2) -> dict:
    """{(transport, batch): seconds per exchange on the attention-side probe}, decode-shaped blocks (capacity =
    batch rows; the header rows that carry the counts on top)."""
    cfg = load_model_config(model_dir)
    cores = os.cpu_count() or 1
    env = {"env_vars": {"OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}}  # as the data plane's
    remote = ray.remote(ExchangeProbe).options(num_cpus=1, runtime_env=env)
    probes = [remote.remote(cores)] + [remote.remote(max(1, cores // experts)) for _ in range(experts)]
    bounds = [(j * cfg.num_experts // experts, (j + 1) * cfg.num_experts // experts) for j in range(experts)]
    head = header_rows(ExpertLayout(bounds, 1, 1 + experts), cfg.hidden_size, getattr(torch, dtype))
    results = {}
    try:
        for transport in TRANSPORTS:
            master = ray.get(probes[0].master_address.remote(), timeout=60)
            ray.get([p.join.remote(master, r, len(probes), 1, 60.0, transport) for r, p in enumerate(probes)],
                    timeout=120)
            for batch in batches:
                args = (head + batch, batch, cfg.hidden_size, dtype)
                ray.get([p.run.remote(20, *args) for p in probes], timeout=120)  # warm-up
                out = ray.get([p.run.remote(PROBE_EXCHANGES, *args) for p in probes], timeout=300)
                results[transport, batch] = out[0]["seconds"]
    finally:
        for p in probes:
            ray.kill(p)
    return results


def expert_parallel_suite(model_dir: Path, prompts: list[list[int]], args) -> None:
    if not ray.is_initialized():
        ray.init(num_cpus=12, include_dashboard=False, log_to_driver=False)  # logical CPUs: 10 actors on 2 cores
    batches = tuple(sorted({1, len(prompts)}))
    rounds = max(1, args.trials)
    runs = decode_rounds(model_dir, prompts, batches, args.new_tokens, args.dtype, rounds)
    alone = transport_alone(model_dir, batches, args.dtype)
    print(f"model {model_dir} ({args.dtype}), prompts of {args.prompt_tokens} tokens, {args.new_tokens} greedy "
          f"tokens each, {os.cpu_count()} cores; one run, {rounds} rounds of every instance in turn: medians, and "
          "the median of the per-round ratios")
    print(f"{'topology (attention x expert)':28} " + " ".join(f"{f'batch {b} tok/s':>15} {'vs 1x0':>7} "
                                                              f"{'target':>11}" for b in batches))
    base = runs["1x0"]
    for name, by_batch in runs.items():
        cells = []
        for b in batches:
            ratio = _median([r[0] / x[0] for r, x in zip(by_batch[b], base[b])])
            target = TARGETS.get(b) if name != "1x0" else None
            verdict = f"{target:.2f} {'ok' if ratio >= target else 'MISS':>4}" if target else ""
            cells.append(f"{_median([r[0] for r in by_batch[b]]):15.1f} {ratio:7.2f} {verdict:>11}")
        print(f"{name:28} " + " ".join(cells))
    ep = {t: {b: (_median([r[0] for r in runs[f"1x2 {t}"][b]]), sum(r[1] for r in runs[f"1x2 {t}"][b]),
                  sum(r[2] for r in runs[f"1x2 {t}"][b])) for b in batches} for t in TRANSPORTS}
    base = {b: (_median([r[0] for r in runs["1x0"][b]]),) for b in batches}
    print("per MoE-layer exchange (ms): in the step (attention-0, dispatch -> combined results, incl. the expert "
          "actors' compute) | the transport alone (same blocks, probe actors)")
    for t in TRANSPORTS:
        for b in batches:
            tps, seconds, exchanges = ep[t][b]
            elapsed = rounds * b * args.new_tokens / tps
            print(f"  {t:10} batch {b:3}: in-step {seconds / max(exchanges, 1) * 1e3:6.3f}  alone "
                  f"{alone[t, b] * 1e3:6.3f}   ({exchanges} exchanges: {seconds / elapsed * 100:4.1f} % of the run)")
    for b, target in TARGETS.items():
        if b not in base:
            continue
        step_1x0 = b / base[b][0]  # seconds per decode step
        budget = (step_1x0 / target - step_1x0) / max(1, len(load_model_config(model_dir).moe_layers))
        print(f"budget at batch {b}: 1x0 step {step_1x0 * 1e3:.2f} ms; {target}x allows {budget * 1e3:.3f} ms more "
              "per MoE layer for the exchange")

"""`llama4serve bench --suite prefix`: prefix caching on vs off, in one run, on one attention actor.

1. Shared prefix: 16 requests of one 1,536-token prefix plus a distinct 16-token tail each, sent one after
   another; time to first token (a 1-token generate) of the later requests against the first one's. With the
   cache the later ones prefill only their tail.
2. Multi-turn chat: a 256-token system prompt, then 8 turns of a 64-token user message and a 32-token greedy
   reply; each turn resends the whole conversation so far. Total throughput (prompt + generated tokens / s).

Both runs produce the same tokens with the cache on and off (checked and printed).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from llama4serve.cluster.engine.llm import LLM
from llama4serve.cluster.sampling_params import SamplingParams

PREFIX_TOKENS, TAIL_TOKENS, NUM_REQUESTS = 1536, 16, 16
SYSTEM_TOKENS, USER_TOKENS, REPLY_TOKENS, TURNS = 256, 64, 32, 8


def _random_ids(g: torch.Generator, n: int, vocab: int) -> list[int]:
    return torch.randint(3, min(vocab, 1000), (n,), generator=g).tolist()


def shared_prefix_ttft(llm: LLM, prompts: list[list[int]]) -> tuple[list[float], list[list[int]]]:
    """Time to first token of each prompt, sent one after another, and the tokens."""
    params = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    times, tokens = [], []
    for prompt in prompts:
        t0 = time.perf_counter()
        tokens.append(llm.generate(prompt, params)[0].token_ids)
        times.append(time.perf_counter() - t0)
    return times, tokens


def chat(llm: LLM, system: list[int], users: list[list[int]]) -> tuple[float, int, list[int]]:
    """(seconds, prompt + generated tokens processed, the whole conversation) of a chat resent every turn."""
    params = SamplingParams(max_tokens=REPLY_TOKENS, temperature=0, ignore_eos=True)
    conversation, processed = list(system), 0
    t0 = time.perf_counter()
    for user in users:
        conversation += user
        reply = llm.generate(conversation, params)[0].token_ids
        processed += len(conversation) + len(reply)
        conversation += reply
    return time.perf_counter() - t0, processed, conversation


def _run(model_dir: Path, dtype: str, caching: bool, prefix_prompts, system, users, warmup) -> dict:
    with LLM(str(model_dir), dtype=dtype, enable_prefix_caching=caching) as llm:
        llm.generate(warmup, SamplingParams(max_tokens=4, temperature=0))  # first-call costs out of the way
        ttft, prefix_tokens = shared_prefix_ttft(llm, prefix_prompts)
        seconds, processed, conversation = chat(llm, system, users)
        scheduler = llm.engine.replicas[0].scheduler
        return dict(ttft=ttft, prefix_tokens=prefix_tokens, seconds=seconds, processed=processed,
                    conversation=conversation, queries=scheduler.prefix_cache_queries,
                    hits=scheduler.prefix_cache_hits)


def prefix_suite(model_dir: Path, vocab_size: int, args) -> None:
    g = torch.Generator().manual_seed(0)
    prefix = _random_ids(g, PREFIX_TOKENS, vocab_size)
    prefix_prompts = [prefix + _random_ids(g, TAIL_TOKENS, vocab_size) for _ in range(NUM_REQUESTS)]
    system = _random_ids(g, SYSTEM_TOKENS, vocab_size)
    users = [_random_ids(g, USER_TOKENS, vocab_size) for _ in range(TURNS)]
    warmup = _random_ids(g, 64, vocab_size)
    runs = {name: _run(model_dir, args.dtype, caching, prefix_prompts, system, users, warmup)
            for name, caching in (("cache on", True), ("cache off", False))}
    on, off = runs["cache on"], runs["cache off"]
    print(f"model {model_dir} ({args.dtype}), {torch.get_num_threads()} threads, one attention actor, experts local")
    print(f"shared prefix: {NUM_REQUESTS} requests, one after another, of a {PREFIX_TOKENS}-token prefix + a "
          f"distinct {TAIL_TOKENS}-token tail; time to first token")
    print(f"{'':12} {'first ms':>10} {'later p50 ms':>13} {'later max ms':>13} {'later p50 / first':>18}")
    for name, r in runs.items():
        first, later = r["ttft"][0], sorted(r["ttft"][1:])
        p50 = later[len(later) // 2]
        print(f"{name:12} {first * 1e3:10.1f} {p50 * 1e3:13.1f} {later[-1] * 1e3:13.1f} {p50 / first:18.3f}")
    print(f"{TURNS}-turn chat resending the conversation ({SYSTEM_TOKENS}-token system prompt, {USER_TOKENS}-token "
          f"user turns, {REPLY_TOKENS}-token greedy replies)")
    print(f"{'':12} {'seconds':>10} {'tokens':>8} {'tokens/s':>10} {'vs off':>8}")
    for name, r in runs.items():
        tps = r["processed"] / r["seconds"]
        print(f"{name:12} {r['seconds']:10.2f} {r['processed']:8d} {tps:10.1f} {off['seconds'] / r['seconds']:8.2f}")
    print(f"prefix cache (cache on): {on['hits']} of {on['queries']} prompt tokens served from the cache "
          f"({on['hits'] / max(on['queries'], 1):.1%})")
    same = on["prefix_tokens"] == off["prefix_tokens"] and on["conversation"] == off["conversation"]
    print(f"outputs identical with the cache on and off: {'yes' if same else 'NO'}")

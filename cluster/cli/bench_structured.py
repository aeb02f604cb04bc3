"""`llama4serve bench --suite structured`: decode throughput at batch --concurrency (32) with every row under a
JSON schema, against the same batch unconstrained, in one engine, one run; prints the ratio.

The schema keeps rows generating (an object whose one string field is unbounded: with random weights the closing
quote is about as likely as any of the vocabulary's tokens), so both batches decode --new-tokens tokens per row.
Its grammar compiles before timing (once per distinct schema, as in serving). Both batches sample (temperature 1,
a seed per row), alternately over --trials runs; the best run of each counts.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import torch

from llama4serve.cluster.engine.llm import LLM
from llama4serve.cluster.sampling_params import SamplingParams

SCHEMA = {"type": "object", "properties": {"notes": {"type": "string"}}, "required": ["notes"],
          "additionalProperties": False}


def _params(num: int, new_tokens: int, constrained: bool) -> list[SamplingParams]:
    spec = {"json": SCHEMA} if constrained else None
    return [SamplingParams(max_tokens=new_tokens, temperature=1.0, seed=i, ignore_eos=True,
                           structured_outputs=spec) for i in range(num)]


def structured_tps(llm: LLM, prompts: list[list[int]], new_tokens: int, trials: int) -> dict[str, float]:
    """Best tokens/s of each batch (generated tokens over wall time), the two measured alternately."""
    runs = {"unconstrained": _params(len(prompts), new_tokens, False),
            "json schema": _params(len(prompts), new_tokens, True)}
    for params in runs.values():  # warm-up: kernels, the grammar's compile and the actor's matcher cache
        llm.generate(prompts, [replace(p, max_tokens=4) for p in params])
    best = dict.fromkeys(runs, 0.0)
    for _ in range(trials):
        for name, params in runs.items():
            t0 = time.perf_counter()
            outs = llm.generate(prompts, params)
            elapsed = time.perf_counter() - t0
            best[name] = max(best[name], sum(len(o.token_ids) for o in outs) / elapsed)
    return best


def structured_suite(model_dir: Path, prompts: list[list[int]], args) -> dict[str, float]:
    trials = min(args.trials, 3)
    with LLM(str(model_dir), dtype=args.dtype, max_num_seqs=max(len(prompts), 1),
             num_scheduler_steps=args.num_scheduler_steps) as llm:
        tps = structured_tps(llm, prompts, args.new_tokens, trials)
    print(f"model {model_dir} ({args.dtype}), batch {len(prompts)}, {args.prompt_tokens} prompt tokens, "
          f"{args.new_tokens} new tokens per row, {args.num_scheduler_steps} steps/call, "
          f"{torch.get_num_threads()} threads, best of {trials}")
    print(f"{'':32} {'tokens/s':>10} {'vs unconstrained':>18}")
    base = tps["unconstrained"]
    for name, value in tps.items():
        print(f"{name:32} {value:10.1f} {value / base:18.2f}")
    return tps

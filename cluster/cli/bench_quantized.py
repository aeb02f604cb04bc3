"""`llama4serve bench --suite quantized`: batch-1 and batch-32 decode of one preset in fp32, bf16, fp8 and int4,
each next to the weight bytes its decode step reads and the bandwidth floor those bytes imply.

fp8 is Meta's fbgemm_fp8 layout (feed-forward and experts in e4m3; attention, router, lm_head float), int4 the
compressed-tensors W4A16 layout (every text linear in int4 groups; router and lm_head float): the same random
weights (same seed) as the float checkpoint, written next to it in the cache directory on first use.
"""

from __future__ import annotations

import time
from contextlib import ExitStack
from pathlib import Path

import torch

from llama4serve.actors.model.config import ModelConfig, load_model_config
from llama4serve.cluster.checkpoints.maker import write_checkpoint
from llama4serve.cluster.checkpoints.quantize import int4_group_size
from llama4serve.cluster.engine.llm import LLM
from llama4serve.cluster.sampling_params import SamplingParams

VARIANTS = ("fp32", "bf16", "fp8", "int4")


def step_bytes(cfg: ModelConfig, variant: str, group: int, batch: int) -> float:
    """Weight bytes one decode step of `batch` sequences reads (expected distinct routed experts for top-k
    routing), counting what stays float at its float width and quantized weights with their scales."""
    h, d = cfg.hidden_size, cfg.head_dim
    float_b = 2 if variant == "bf16" else 4
    quant_b = {"fp32": 4, "bf16": 2, "fp8": 1, "int4": 0.5 + 4 / group}[variant]
    ffn_b = quant_b  # fp8 and int4 quantize the feed-forward linears and experts
    attn_b = float_b if variant == "fp8" else quant_b  # fbgemm_fp8 leaves attention float
    attn = h * d * (2 * cfg.num_attention_heads + 2 * cfg.num_key_value_heads)
    total = (2 * h + cfg.vocab_size * h) * float_b  # embedding row, final norm, lm_head
    experts = cfg.num_experts * (1 - (1 - 1 / cfg.num_experts) ** (batch * cfg.num_experts_per_tok))
    for i in range(cfg.num_hidden_layers):
        total += attn * attn_b + 2 * h * float_b
        if cfg.is_moe_layer(i):
            total += cfg.num_experts * h * float_b + 3 * h * cfg.intermediate_size * (1 + experts) * ffn_b
        else:
            total += 3 * h * cfg.intermediate_size_mlp * ffn_b
    return total


def read_bandwidth(nbytes: int = 1 << 29, repeats: int = 5) -> float:
    """Bytes/s of a full reduction over a buffer larger than the caches (the most torch gets from memory)."""
    buf = torch.ones(nbytes // 4)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        buf.sum()
        best = min(best, time.perf_counter() - t0)
    return nbytes / best


def decode_tps(llm: LLM, prompts: list[list[int]], new_tokens: int, trials: int = 3) -> float:
    """Decode tokens/s of `prompts` decoding together, timed from the step after every sequence has its first
    token (prefill excluded) to the end; the best of `trials` (the machine is shared)."""
    llm.generate(prompts, SamplingParams(max_tokens=2, temperature=0, ignore_eos=True))  # warm-up
    best = 0.0
    for _ in range(trials):
        params = SamplingParams(max_tokens=new_tokens + 1, temperature=0, ignore_eos=True)
        states = [llm.add_request(p, params) for p in prompts]
        while any(not s.seq.output_ids for s in states):
            llm.step()
        done = sum(len(s.seq.output_ids) for s in states)
        t0 = time.perf_counter()
        while llm.has_work():
            llm.step()
        tokens = sum(len(s.seq.output_ids) for s in states) - done
        best = max(best, tokens / (time.perf_counter() - t0))
    return best


def checkpoint_for(variant: str, float_dir: Path, preset: str, cache_dir: Path) -> Path:
    if variant in ("fp32", "bf16"):
        return float_dir
    out = cache_dir / f"{preset}-{variant}"
    if not (out / "config.json").is_file():
        write_checkpoint(out, preset, quantize=variant)
    return out


def targets(variant: str, batch: int, speedup: float, ratio: float) -> tuple[str, bool] | None:
    """The issue's targets: batch-1 speed-up over fp32 >= 0.8 x the bytes ratio (fp8, int4); batch-32 fp8 >= 1.2x."""
    if batch == 1 and variant in ("fp8", "int4"):
        return f">= {0.8 * ratio:.2f} (0.8 x bytes ratio)", speedup >= 0.8 * ratio
    if batch > 1 and variant == "fp8":
        return ">= 1.20", speedup >= 1.2
    return None


def quantized_suite(float_dir: Path, preset: str, prompts: list[list[int]], args) -> dict[str, tuple]:
    """Prints one table (a row per variant and batch) and the targets' verdicts; returns {variant: (batch-1
    tok/s, batch-32 tok/s, read bandwidth)}."""
    cfg = load_model_config(float_dir)
    group = int4_group_size({"text_config": {"hidden_size": cfg.hidden_size,
                                             "intermediate_size": cfg.intermediate_size,
                                             "intermediate_size_mlp": cfg.intermediate_size_mlp,
                                             "num_attention_heads": cfg.num_attention_heads,
                                             "head_dim": cfg.head_dim}})
    batch = min(32, len(prompts))
    steps, rounds = getattr(args, "num_scheduler_steps", 8), 3
    results = {variant: (0.0, 0.0, 0.0) for variant in VARIANTS}
    with ExitStack() as stack:  # every variant loaded at once, measured in turns: a drifting load hits them alike
        llms = {}
        for variant in VARIANTS:
            path = checkpoint_for(variant, float_dir, preset, args.cache_dir)
            dtype = "bfloat16" if variant == "bf16" else "float32"
            llm = LLM(str(path), dtype=dtype, max_num_seqs=batch, num_scheduler_steps=steps,
                      num_cpus_per_actor=1 / len(VARIANTS))
            llms[variant] = stack.enter_context(llm)
        for _ in range(rounds):
            for variant, llm in llms.items():
                bw = read_bandwidth()
                one = decode_tps(llm, prompts[:1], args.new_tokens, trials=1)
                many = decode_tps(llm, prompts[:batch], max(8, args.new_tokens // 2), trials=1)
                results[variant] = tuple(max(a, b) for a, b in zip(results[variant], (one, many, bw)))
    print(f"model {float_dir} ({preset}), prompt {args.prompt_tokens} tokens, {args.new_tokens} new tokens (batch 1), "
          f"{steps} decode steps per actor call, {torch.get_num_threads()} threads; int4 group {group}; best of "
          f"{rounds} rounds over the four engines in turn; MB/step: weight bytes a decode step reads (what stays "
          "float, e.g. the lm_head, counted); floor = the best read bandwidth measured before a variant's runs / "
          "those bytes")
    print(f"{'variant':8} {'batch':>5} {'MB/step':>8} {'floor tok/s':>12} {'tok/s':>8} {'/floor':>7} {'vs fp32':>8} "
          f"{'bytes ratio':>12}  target")
    verdicts = []
    for b, col in ((1, 0), (batch, 1)):
        base_bytes = step_bytes(cfg, "fp32", group, b)
        for variant, measured in results.items():
            tps, bw = measured[col], measured[2]
            nbytes = step_bytes(cfg, variant, group, b)
            floor = bw / nbytes * b
            speedup, ratio = tps / results["fp32"][col], base_bytes / nbytes
            target = targets(variant, b, speedup, ratio)
            verdict = "" if target is None else f"{target[0]}: {'PASS' if target[1] else 'FAIL'}"
            if target is not None:
                verdicts.append(target[1])
            print(f"{variant:8} {b:5} {nbytes / 1e6:8.1f} {floor:12.1f} {tps:8.1f} {tps / floor:7.2f} {speedup:8.2f} "
                  f"{ratio:12.2f}  {verdict}")
    print(f"targets: {sum(verdicts)} of {len(verdicts)} pass")
    return results

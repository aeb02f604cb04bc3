"""GPU validation of the portable path, one run on one GPU (about 10 minutes at most on an H200).

    python scripts/gpu_check.py [--layers 8] [--skip-parity] [--skip-bench]

1. parity with transformers on tiny random checkpoints on CUDA: float32 (TF32 off) greedy tokens equal and
   logprobs within 1e-3; bfloat16 prompt logprobs within bf16 tolerance of the float32 reference;
2. a decode step captured as a CUDA graph and replayed with new step data equals eager, across an
   attention-chunk boundary (vLLM #28604);
3. decode on a Scout-shaped stack (hidden 5120, 40 q / 8 kv heads of 128, 16 experts of 8192 + the shared
   expert, --layers layers, vocabulary 202048) at batch 1, 8, 64 against the HBM roofline (weight bytes a
   step reads / the device-to-device copy bandwidth measured here), and prefill against the bf16 matmul rate
   measured here;
4. fp8 and int4 weights (scripts/gpu_quantized.py): `torch._scaled_mm` and dequantize-then-bf16 numerics at
   Scout's shapes, and decode of the Scout-shaped stack quantized in place at batch 1 and 64.
Prints one table. Exits 0 when every check passes, 1 when one fails, 2 without CUDA.

Imports only `kernels/` and the model code in `actors/` (no Ray, no pydantic), torch, transformers, safetensors.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
ROWS: list[tuple[str, str, str, str]] = []  # (check, result, measured, target)
DEVICE = "cuda"  # --cpu-dry-run: "cpu", to try the parity driver on a machine without a GPU


def _import_repo() -> None:
    """Makes the checkout importable as `llama4serve` without installing it."""
    if "llama4serve" not in sys.modules:
        pkg = types.ModuleType("llama4serve")
        pkg.__path__ = [str(ROOT)]
        sys.modules["llama4serve"] = pkg
    sys.path.insert(0, str(ROOT / "tests"))  # hf_reference: transformers' own random checkpoints


def row(check: str, ok: bool | None, measured: str, target: str) -> None:
    ROWS.append((check, "n/a" if ok is None else ("PASS" if ok else "FAIL"), measured, target))


def sync_time(fn, repeat: int) -> float:
    """Seconds per call of fn (after one warm-up call), measured with CUDA events."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeat):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1000 / repeat


# ---------------------------------------------------------------- driving the model runner like the engine


class Seqs:
    """Block tables for B sequences as the engine keeps them: a full-pool table per sequence and fresh chunk-pool
    blocks for each attention chunk."""

    def __init__(self, cfg, block_size: int, max_len: int, num_seqs: int):
        self.bs, self.chunk = block_size, cfg.attention_chunk_size or max_len
        self.full_per_seq = -(-max_len // block_size)
        self.chunk_per = -(-min(self.chunk, max_len) // block_size)  # a chunk's blocks, as far as max_len reaches
        self.chunks_per_seq = (max_len + 1 + self.chunk - 1) // self.chunk  # chunks of positions 0..max_len
        self.num_full = self.full_per_seq * num_seqs
        self.num_chunk = self.chunk_per * self.chunks_per_seq * num_seqs

    def full(self, b: int) -> list[int]:
        return list(range(b * self.full_per_seq, (b + 1) * self.full_per_seq))

    def chunk_blocks(self, b: int, pos: int) -> list[int]:
        first = (b * self.chunks_per_seq + pos // self.chunk) * self.chunk_per
        return list(range(first, first + self.chunk_per))

    def step(self, b: int, ids: list[int], start: int, targets: list[int], sampling=True, logprobs=0):
        from llama4serve.actors.step_io import SamplingSpec, SeqStep

        end = start + len(ids)
        return SeqStep(b, ids, start, self.full(b), self.chunk_blocks(b, start), self.chunk_blocks(b, end),
                       SamplingSpec(logprobs=logprobs) if sampling else None, logprob_targets=targets)


def run_greedy(actor, prompts: list[list[int]], new_tokens: int, piece: int, seqs: Seqs):
    """Prefill in pieces of `piece` tokens (some cross chunk boundaries), then greedy decode, all sequences in
    one batch each step. -> (generated ids, prompt logprobs, generated logprobs) per sequence."""
    from llama4serve.actors.step_io import StepBatch

    pos = [0] * len(prompts)
    prompt_lp = [[] for _ in prompts]
    last_outs = {}
    while any(p < len(x) for p, x in zip(pos, prompts)):
        batch, who = [], []
        for b, x in enumerate(prompts):
            if pos[b] < len(x):
                ids = x[pos[b]: pos[b] + piece]
                last = pos[b] + len(ids) == len(x)
                batch.append(seqs.step(b, ids, pos[b], x[pos[b] + 1: pos[b] + len(ids) + 1][: len(ids) - last],
                                       sampling=last, logprobs=0))
                who.append(b)
                pos[b] += len(ids)
        outs = actor.runner.step(StepBatch(batch, moe_capacity=sum(len(s.token_ids) for s in batch)))
        for b, out in zip(who, outs):
            prompt_lp[b] += out.prompt_logprobs
            last_outs[b] = out
    generated = [[last_outs[b].token_id] for b in range(len(prompts))]
    gen_lp = [[last_outs[b].logprob] for b in range(len(prompts))]
    for _ in range(new_tokens - 1):
        batch = [seqs.step(b, [g[-1]], len(prompts[b]) + len(g) - 1, []) for b, g in enumerate(generated)]
        outs = actor.runner.step(StepBatch(batch, moe_capacity=len(batch)))
        for g, lp, out in zip(generated, gen_lp, outs):
            g.append(out.token_id)
            lp.append(out.logprob)
    return generated, prompt_lp, gen_lp


def check_parity(tmp: Path) -> None:
    from hf_reference import MAVERICK_LIKE, SCOUT_LIKE, hf_greedy, hf_logprobs, load_hf, write_hf_checkpoint
    from llama4serve.actors.attention_actor import AttentionActor
    from llama4serve.actors.model.config import load_model_config

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 290, (n,), generator=g).tolist() for n in (70, 37, 16, 5)]
    new = 16
    for name, text in (("tiny-scout", SCOUT_LIKE), ("tiny-maverick", MAVERICK_LIKE)):
        path = write_hf_checkpoint(tmp / name, text)
        hf = load_hf(path)
        cfg = load_model_config(path)
        seqs = Seqs(cfg, 8, 128, len(prompts))
        for dtype in ("float32", "bfloat16"):
            t0 = time.perf_counter()
            actor = AttentionActor(str(path), dtype, seqs.num_full, seqs.num_chunk, 8, device=DEVICE)
            gen, prompt_lp, _ = run_greedy(actor, prompts, new, 12, seqs)
            diffs, same = [], True
            for p, out, lp in zip(prompts, gen, prompt_lp):
                ref = hf_logprobs(hf, p)
                diffs.append((torch.tensor(lp) - ref).abs())
                if dtype == "float32":
                    same &= out == hf_greedy(hf, p, new)
            d = torch.cat(diffs)
            secs = time.perf_counter() - t0
            if dtype == "float32":
                row(f"{name} fp32 vs transformers", same and d.max() <= 1e-3,
                    f"greedy equal: {same}, max |dlogprob| {d.max():.1e} ({secs:.0f} s)", "equal, <= 1e-3")
            else:
                ok = d.max() <= 0.3 and d.mean() <= 0.05
                row(f"{name} bf16 vs transformers fp32", ok, f"|dlogprob| mean {d.mean():.3f} max {d.max():.3f}",
                    "mean <= 0.05, max <= 0.3")
            del actor
            if DEVICE == "cuda":
                torch.cuda.empty_cache()


# ---------------------------------------------------------------- CUDA graph of a decode step


def check_graph_replay(tmp: Path) -> None:
    """Each decode step through the actor's CUDA graph (`actors/runner/cuda_graphs.py`) equals eager, for
    positions that cross attention-chunk boundaries (chunk 16: steps from position 7 to 31)."""
    from hf_reference import SCOUT_LIKE, write_hf_checkpoint
    from llama4serve.actors.attention_actor import AttentionActor
    from llama4serve.actors.model.config import load_model_config
    from llama4serve.actors.step_io import StepBatch

    path = write_hf_checkpoint(tmp / "graph-scout", SCOUT_LIKE)  # attention_chunk_size 16
    cfg = load_model_config(path)
    seqs = Seqs(cfg, 8, 64, 2)
    actor = AttentionActor(str(path), "bfloat16", seqs.num_full, seqs.num_chunk, 8, device="cuda",
                           cuda_graph_batch_sizes=(1, 2, 4))
    runner = actor.runner
    prompts = [list(range(3, 15)), list(range(40, 47))]  # 12 and 7 tokens
    gen, _, _ = run_greedy(actor, prompts, 1, 16, seqs)
    worst, graphed, positions = 0.0, 0, set()
    with torch.inference_mode():
        for _ in range(24):
            batch = StepBatch([seqs.step(b, [g[-1]], len(prompts[b]) + len(g) - 1, []) for b, g in enumerate(gen)], 2)
            eager = runner.model.logits(runner.hidden_states(batch)).float()  # writes this step's KV
            if runner.graphs.applies(batch, None):
                replayed = runner.graphs.logits(batch).float()  # writes the same KV again, then reads
                worst = max(worst, (eager - replayed).abs().max().item())
                graphed += 1
                positions.update(s.start_pos for s in batch.seqs)
            for g, t in zip(gen, eager.argmax(-1).tolist()):
                g.append(t)
    crossed = {16, 17, 32}.issubset(positions)
    row("CUDA graph replay vs eager, decode across chunk boundaries", worst <= 1e-2 and crossed and graphed >= 20,
        f"{graphed} graphed steps, positions {min(positions)}..{max(positions)}, max |dlogit| {worst:.1e}",
        "<= 1e-2 (bf16)")


# ---------------------------------------------------------------- Scout-shaped stack: decode and prefill speed


class RandomReader:
    """CheckpointReader stand-in: random bf16 weights made on the GPU from the shapes config.json implies."""

    def __init__(self, model_dir: Path, shapes: dict, device):
        self.model_dir, self.shapes, self.device, self.bytes_read = model_dir, shapes, device, 0

    def has(self, name):
        return name in self.shapes

    def shape(self, name):
        return list(self.shapes[name])

    def dtype_name(self, name):
        return "BF16"

    def get(self, name, dtype, shape=None):
        shape = self.shapes[name]
        scale = 1.0 if len(shape) == 1 else shape[-2] ** -0.5
        return torch.randn(shape, dtype=dtype, device=self.device) * scale

    def get_rows(self, name, start, stop, dtype, shape=None):
        full = self.shapes[name]
        return torch.randn((stop - start, *full[1:]), dtype=dtype, device=self.device) * full[-2] ** -0.5

    def close(self):
        pass


def scout_config(layers: int) -> dict:
    return {"model_type": "llama4", "torch_dtype": "bfloat16", "text_config": {
        "vocab_size": 202048, "hidden_size": 5120, "intermediate_size": 8192, "intermediate_size_mlp": 16384,
        "num_hidden_layers": layers, "num_attention_heads": 40, "num_key_value_heads": 8, "head_dim": 128,
        "num_local_experts": 16, "num_experts_per_tok": 1, "interleave_moe_layer_step": 1, "use_qk_norm": True,
        "attention_chunk_size": 8192, "attn_temperature_tuning": True, "floor_scale": 8192,
        "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 16.0, "low_freq_factor": 1.0,
                            "high_freq_factor": 1.0, "original_max_position_embeddings": 8192}}}


def bench_scout(tmp: Path, layers: int, quantized: bool = True) -> None:
    from llama4serve.actors.model.config import load_model_config
    from llama4serve.actors.model.experts import LocalExperts
    from llama4serve.actors.model.text_model import Llama4TextModel
    from llama4serve.actors.model.weights import text_weight_shapes
    from llama4serve.actors.runner.kv_cache import KVCache
    from llama4serve.actors.runner.cuda_graphs import DecodeGraphs
    from llama4serve.actors.runner.model_runner import ModelRunner
    from llama4serve.actors.step_io import StepBatch

    dev, dtype = torch.device("cuda", 0), torch.bfloat16
    (tmp / "scout-shaped").mkdir()
    (tmp / "scout-shaped" / "config.json").write_text(json.dumps(scout_config(layers)))
    cfg = load_model_config(tmp / "scout-shaped")
    shapes = text_weight_shapes(cfg)
    reader = RandomReader(tmp / "scout-shaped", shapes, dev)
    experts = LocalExperts(cfg, reader, 0, cfg.num_experts, dtype, dev)
    model = Llama4TextModel(cfg, reader, dtype, experts, dev)
    context, max_batch, bs = 1024, 64, 16
    seqs = Seqs(cfg, bs, 2048 + 64, max_batch)
    kv = KVCache(cfg, seqs.num_full + 1, seqs.num_chunk + 1, bs, dtype, dev)  # + the graphs' scratch blocks
    runner = ModelRunner(cfg, model, kv, None, experts)

    # Bandwidth: device-to-device copy (reads + writes) of 4 GiB; matmul rate: bf16 8192^3.
    src = torch.empty(2**31, dtype=torch.bfloat16, device=dev)
    dst = torch.empty_like(src)
    bandwidth = 2 * src.numel() * 2 / sync_time(lambda: dst.copy_(src), 10)
    src = dst = None  # frees 8 GiB
    a = torch.randn(8192, 8192, dtype=dtype, device=dev)
    flops_rate = 2 * 8192**3 / sync_time(lambda: a @ a, 20)
    a = None
    e_bytes = 3 * cfg.hidden_size * cfg.intermediate_size * 2  # one routed expert (gate, up, down)
    all_bytes = sum(t.numel() * t.element_size() for w in model.layers for t in w.values() if torch.is_tensor(t))
    all_bytes += model.lm_head_t.numel() * 2 + cfg.hidden_size * 2
    row(f"measured copy bandwidth / bf16 matmul ({layers} layers)", None,
        f"{bandwidth / 1e12:.2f} TB/s, {flops_rate / 1e12:.0f} TFLOP/s", "")

    torch.manual_seed(0)
    bf16_ms: dict[int, float] = {}
    for batch_size in (1, 8, 64):
        batch = StepBatch([seqs.step(b, [7], context, [], sampling=False) for b in range(batch_size)], batch_size)
        # Distinct experts a step reads per MoE layer: the random router picks top-1 of E about uniformly.
        e = cfg.num_experts
        experts_hit = e * (1 - (1 - 1 / e) ** batch_size)
        with torch.inference_mode():
            token_ids, meta = runner.build_meta(batch)
            step_bytes = all_bytes + len(cfg.moe_layers) * e_bytes * experts_hit
            roofline = step_bytes / bandwidth
            eager = sync_time(lambda: model.logits(model.forward(token_ids, meta, kv)), 5)
            try:
                graphs = DecodeGraphs(runner, (batch_size,), seqs.num_full, seqs.num_chunk)
                graphed = sync_time(lambda: graphs.logits(batch), 10)
                graphs = None
            except Exception as err:  # reported, the other rows still run
                graphed = float("nan")
                print(f"CUDA graph capture at batch {batch_size} failed: {err!r}", file=sys.stderr)
        best = min(eager, graphed) if graphed == graphed else eager
        bf16_ms[batch_size] = best * 1e3
        goal = 0.7 if batch_size == 1 else 0.5
        row(f"decode batch {batch_size} (~{experts_hit:.1f} experts/layer)", roofline / best >= goal if batch_size != 8 else None,
            f"eager {eager * 1e3:.2f} ms, graph {graphed * 1e3:.2f} ms; roofline {roofline * 1e3:.2f} ms = "
            f"{roofline / best:.0%}", f">= {goal:.0%} of roofline" if batch_size != 8 else "")
        torch.cuda.empty_cache()

    tokens = 2048
    batch = StepBatch([seqs.step(0, [7] * tokens, 0, [], sampling=False)], tokens)
    with torch.inference_mode():
        token_ids, meta = runner.build_meta(batch)
        secs = sync_time(lambda: model.forward(token_ids, meta, kv), 3)
    h, d = cfg.hidden_size, cfg.head_dim
    per_token = 2 * (h * (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * d + cfg.num_attention_heads * d * h
                     + 2 * 3 * h * cfg.intermediate_size) * layers  # qkv, o, shared + one routed expert
    attn = 4 * cfg.num_attention_heads * d * tokens * tokens / 2 * layers  # causal QK^T and PV
    achieved = (per_token * tokens + attn) / secs
    row(f"prefill {tokens} tokens", None, f"{secs * 1e3:.1f} ms, {achieved / 1e12:.0f} TFLOP/s = "
        f"{achieved / flops_rate:.0%} of matmul rate", "")
    if not quantized:
        return
    from gpu_quantized import bench_decode, quantize_stack  # scripts/, next to this file

    for scheme in ("fp8", "int4"):  # fresh random weights, quantized in place (the bf16 stack freed first)
        model = experts = runner = meta = None
        torch.cuda.empty_cache()
        experts = LocalExperts(cfg, reader, 0, cfg.num_experts, dtype, dev)
        model = Llama4TextModel(cfg, reader, dtype, experts, dev)
        expert_bytes = quantize_stack(model, experts, scheme)
        runner = ModelRunner(cfg, model, kv, None, experts)
        bench_decode(row, runner, seqs, kv, sync_time, bandwidth, scheme, expert_bytes, bf16_ms)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=8, help="layers of the Scout-shaped stack (~4.4 GB each)")
    parser.add_argument("--skip-parity", action="store_true")
    parser.add_argument("--skip-bench", action="store_true")
    parser.add_argument("--skip-quantized", action="store_true", help="no fp8 / int4 checks")
    parser.add_argument("--cpu-dry-run", action="store_true", help="only the parity checks, on CPU")
    args = parser.parse_args()
    if args.cpu_dry_run:
        global DEVICE
        DEVICE = "cpu"
        _import_repo()
        check_parity(Path(tempfile.mkdtemp()))
        print("\n".join(" | ".join(r) for r in ROWS))
        return 1 if any(r[1] == "FAIL" for r in ROWS) else 0
    if not torch.cuda.is_available():
        print(f"gpu_check: CUDA is not available (torch {torch.__version__}, CUDA build: "
              f"{torch.version.cuda or 'none'}); run this on a machine with an NVIDIA GPU and a CUDA build of torch",
              file=sys.stderr)
        return 2
    _import_repo()
    print(f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        from gpu_quantized import check_numerics  # scripts/, next to this file

        for name, run in (("parity", lambda: check_parity(Path(tmp))), ("graph", lambda: check_graph_replay(Path(tmp))),
                          ("quantized", lambda: check_numerics(row, torch.device("cuda", 0))),
                          ("bench", lambda: bench_scout(Path(tmp), args.layers, not args.skip_quantized))):
            if ((name == "parity" and args.skip_parity) or (name == "bench" and args.skip_bench)
                    or (name == "quantized" and args.skip_quantized)):
                continue
            t0 = time.perf_counter()
            try:
                run()
            except Exception as e:
                import traceback

                traceback.print_exc()
                row(name, False, f"raised {type(e).__name__}: {str(e)[:120]}", "")
            print(f"[{name}: {time.perf_counter() - t0:.0f} s]", flush=True)
    widths = [max(len(r[i]) for r in ROWS + [("check", "result", "measured", "target")]) for i in range(4)]
    for r in [("check", "result", "measured", "target")] + ROWS:
        print(" | ".join(c.ljust(w) for c, w in zip(r, widths)))
    return 1 if any(r[1] == "FAIL" for r in ROWS) else 0


if __name__ == "__main__":
    sys.exit(main())

"""The fp8 and int4 cases of scripts/gpu_check.py (imported by it; no Ray, no pydantic, no checkpoint files).

1. Numerics on the GPU at Scout's shapes: fp8 `linear` takes `torch._scaled_mm` (per-token activation scales,
   per-channel weight scales) and matches its plain-float reference (`scaled_mm_fp8_reference`) and the
   dequantized bf16 matmul; int4 `linear` (dequantize-then-bf16) matches the dequantized float32 matmul.
2. Decode on the Scout-shaped stack of gpu_check with its weights quantized in place (fp8: every linear and the
   routed experts, as Meta's FP8 Maverick plus attention; int4: the same in 128-groups), eager and as a CUDA
   graph, at batch 1 and 64, next to the bf16 stack's time and the bytes a quantized step must read. The routed
   experts are dequantized a layer at a time (the portable path), so their time is reported, not held to a target.
"""

from __future__ import annotations

import torch


def _quantize(scheme: str, w: torch.Tensor):
    """A float [K, M] or stacked [E, K, M] weight -> a QuantizedWeight (per expert scales)."""
    from llama4serve.kernels.quant import FP8, INT4, QuantizedWeight, quantize_fp8_columns, quantize_int4_groups

    def one(m: torch.Tensor):
        if scheme == FP8:
            return QuantizedWeight(FP8, *quantize_fp8_columns(m))
        return QuantizedWeight(INT4, *quantize_int4_groups(m, 128), 128)

    return one(w) if w.dim() == 2 else QuantizedWeight.stack([one(m) for m in w])


def check_numerics(row, dev) -> None:
    from llama4serve.kernels.linear import linear, pack_weight, uses_scaled_mm
    from llama4serve.kernels.quant import scaled_mm_fp8_reference

    g = torch.Generator(device=dev).manual_seed(0)
    k, m = 5120, 8192
    w = torch.randn(k, m, device=dev, generator=g) / k**0.5
    x = torch.randn(16, k, device=dev, generator=g).bfloat16()
    fp8 = pack_weight(_quantize("fp8", w))
    scaled = uses_scaled_mm(x, fp8)
    out = linear(x, fp8).float()
    ref = scaled_mm_fp8_reference(x.float(), fp8).float()
    dense = x.float() @ fp8.dequantize()
    rel_ref = ((out - ref).abs().max() / ref.abs().max()).item()
    rel_dense = ((out - dense).abs().max() / dense.abs().max()).item()
    row("fp8 linear: torch._scaled_mm vs its float reference", scaled and rel_ref <= 1e-2,
        f"scaled path {scaled}, max rel err {rel_ref:.1e} (vs dequantized matmul {rel_dense:.1e})",
        "scaled path, <= 1e-2")
    int4 = pack_weight(_quantize("int4", w))
    out = linear(x, int4).float()
    dense = x.float() @ int4.dequantize()
    rel = ((out - dense).abs().max() / dense.abs().max()).item()
    row("int4 linear (dequantize-then-bf16) vs float32", rel <= 1e-2, f"max rel err {rel:.1e}", "<= 1e-2")


def quantize_stack(model, experts, scheme: str) -> int:
    """Quantizes the stack's linears (and its routed experts) in place; returns the weight bytes of one expert."""
    from llama4serve.kernels.linear import pack_weight

    for w in model.layers:
        for name in ("qkv", "o", "mlp_gate_up", "mlp_down"):
            w[name] = pack_weight(_quantize(scheme, w[name]))
        torch.cuda.empty_cache()
    for layer in list(experts.stacked_gate_up):
        experts.stacked_gate_up[layer] = _quantize(scheme, experts.stacked_gate_up[layer])
        experts.stacked_down[layer] = _quantize(scheme, experts.stacked_down[layer])
        torch.cuda.empty_cache()
    layer = next(iter(experts.stacked_gate_up))
    e = experts.num_local_experts
    return (experts.stacked_gate_up[layer].nbytes + experts.stacked_down[layer].nbytes) // e


def bench_decode(row, runner, seqs, kv, sync_time, bandwidth: float, scheme: str, e_bytes: int,
                 bf16_ms: dict[int, float]) -> None:
    """Decode time at batch 1 and 64 of the quantized stack, next to bf16's and its quantized-bytes roofline."""
    from llama4serve.actors.runner.cuda_graphs import DecodeGraphs
    from llama4serve.actors.step_io import StepBatch
    from llama4serve.kernels.quant import QuantizedWeight

    model, cfg = runner.model, runner.cfg
    dense = 0
    for w in model.layers:
        for t in w.values():
            dense += t.nbytes if isinstance(t, QuantizedWeight) else t.numel() * t.element_size()
    dense += model.lm_head_t.numel() * 2
    for batch_size in (1, 64):
        batch = StepBatch([seqs.step(b, [7], 1024, [], sampling=False) for b in range(batch_size)], batch_size)
        hit = cfg.num_experts * (1 - (1 - 1 / cfg.num_experts) ** batch_size)
        roofline = (dense + len(cfg.moe_layers) * e_bytes * hit) / bandwidth
        with torch.inference_mode():
            token_ids, meta = runner.build_meta(batch)
            eager = sync_time(lambda: model.logits(model.forward(token_ids, meta, kv)), 5)
            try:
                graphs = DecodeGraphs(runner, (batch_size,), seqs.num_full, seqs.num_chunk)
                graphed = sync_time(lambda: graphs.logits(batch), 10)
            except Exception as err:  # reported; the other rows still run
                graphed = float("nan")
                row(f"{scheme} decode batch {batch_size} CUDA graph", False, f"capture failed: {err!r}"[:160], "")
            graphs = None
        best = min(eager, graphed) if graphed == graphed else eager
        ref = bf16_ms.get(batch_size)
        vs = f", bf16 {ref:.2f} ms" if ref else ""
        row(f"{scheme} decode batch {batch_size}", None,
            f"eager {eager * 1e3:.2f} ms, graph {graphed * 1e3:.2f} ms{vs}; quantized-bytes roofline "
            f"{roofline * 1e3:.2f} ms = {roofline / best:.0%}", "(experts dequantized per layer)")
        torch.cuda.empty_cache()

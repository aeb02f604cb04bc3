"""Routed experts held in this process: experts [first_expert, first_expert + num_local_experts) of every MoE
layer, loaded from the checkpoint's fused tensors by slicing, never reading other experts' bytes."""

from __future__ import annotations

import torch

from llama4serve.kernels import native
from llama4serve.kernels.grouped_experts import grouped_swiglu_mm
from llama4serve.kernels.linear import PanelWeight, unpack_weight
from llama4serve.kernels.quant import QuantizedWeight
from llama4serve.kernels.moe import grouped_swiglu, swiglu
from llama4serve.actors.model.checkpoint import TEXT_PREFIX, CheckpointReader
from llama4serve.actors.model.config import ModelConfig
from llama4serve.actors.model.quantized import load_quant_format, read_experts
from llama4serve.actors.parallel.blocks import decode_counts


def expert_split(num_experts: int, num_shards: int) -> list[tuple[int, int]]:
    """Contiguous ranges [e0, e1) as even as possible: 16 experts on 3 shards -> (0,6), (6,11), (11,16)."""
    if not 1 <= num_shards <= num_experts:
        raise ValueError(f"expert_actors is {num_shards}; allowed 1..{num_experts} (num_local_experts)")
    base, extra = divmod(num_experts, num_shards)
    bounds, start = [], 0
    for shard in range(num_shards):
        stop = start + base + (1 if shard < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


def portable_path(device: torch.device | str) -> bool:
    """Whether the actors compute with torch's own kernels (flex_attention, grouped_mm, no host sync in the
    layer loop): on every GPU, and on CPU when the native kernels are off (LLAMA4SERVE_NATIVE_KERNELS=0)."""
    return torch.device(device).type != "cpu" or native.cpu_kernels() is None


class LocalExperts:
    """Expert weights of one shard, per MoE layer. Portable path (`portable_path(device)`): stacked
    gate_up [E_local, H, 2I] and down [E_local, I, H] on `device` for `grouped_swiglu_mm`; quantized experts stay
    a stacked `QuantizedWeight` and are dequantized to the compute dtype one layer at a time, when it runs. CPU
    fast path: per local expert, each packed for `kernels.linear.linear` (quantized: dequantized in registers)."""

    def __init__(self, cfg: ModelConfig, reader: CheckpointReader, first_expert: int, last_expert: int, dtype,
                 device: torch.device | str = "cpu"):
        self.first_expert = first_expert
        self.num_local_experts = last_expert - first_expert
        self.portable = portable_path(device)
        self.dtype = dtype
        self.stacked_gate_up: dict[int, torch.Tensor | QuantizedWeight] = {}
        self.stacked_down: dict[int, torch.Tensor | QuantizedWeight] = {}
        h, i = cfg.hidden_size, cfg.intermediate_size
        self.packed_gate_up: dict[int, list[torch.Tensor]] = {}
        self.packed_down: dict[int, list[torch.Tensor]] = {}
        self._panel_ptrs: dict[int, tuple] = {}  # per MoE layer: the Panels addresses (gate_up, down) or ()
        quant = load_quant_format(reader.model_dir)
        for layer in cfg.moe_layers:
            name = f"{TEXT_PREFIX}layers.{layer}.feed_forward.experts"
            if reader.has(name + ".gate_up_proj") and reader.shape(name + ".gate_up_proj")[0] != cfg.num_experts:
                raise ValueError(f"{name}.gate_up_proj holds {reader.shape(name + '.gate_up_proj')[0]} experts; "
                                 f"config.json says num_local_experts={cfg.num_experts}")
            gate_up, down = read_experts(reader, quant, name, first_expert, last_expert, cfg.num_experts, h, i,
                                         dtype, packed=not self.portable)
            if self.portable:  # [E_local, H, 2I], [E_local, I, H] on the device (quantized: kept quantized)
                self.stacked_gate_up[layer] = gate_up.to(device)
                self.stacked_down[layer] = down.to(device)
            else:
                self.packed_gate_up[layer], self.packed_down[layer] = gate_up, down

    @property
    def gate_up(self) -> dict[int, torch.Tensor]:
        """Plain [E_local, H, 2I] per MoE layer, rebuilt from the packed weights (for inspection)."""
        if self.portable:
            return {layer: self._dense(w) for layer, w in self.stacked_gate_up.items()}
        return {layer: torch.stack([unpack_weight(w) for w in ws]) for layer, ws in self.packed_gate_up.items()}

    @property
    def down(self) -> dict[int, torch.Tensor]:
        """Plain [E_local, I, H] per MoE layer, rebuilt from the packed weights (for inspection)."""
        if self.portable:
            return {layer: self._dense(w) for layer, w in self.stacked_down.items()}
        return {layer: torch.stack([unpack_weight(w) for w in ws]) for layer, ws in self.packed_down.items()}

    def _dense(self, w: torch.Tensor | QuantizedWeight, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A layer's stacked weight in float: quantized ones dequantized now (freed after the layer)."""
        return w.dequantize(dtype or self.dtype) if isinstance(w, QuantizedWeight) else w

    def __call__(self, layer: int, x: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
        """x [N, H] rows already scaled by their router score, expert_ids [N] global -> [N, H]; rows whose id is
        not one of this shard's experts (-1: padding of a dispatch block) give zeros."""
        if self.portable:
            gate_up, down = self.stacked_gate_up[layer], self.stacked_down[layer]
            return grouped_swiglu_mm(x, expert_ids, self._dense(gate_up, x.dtype), self._dense(down, x.dtype),
                                     self.first_expert)
        local = expert_ids - self.first_expert
        mine = (local >= 0) & (local < self.num_local_experts)
        if not bool(mine.all()):  # CPU fast path only: a host sync is cheap here
            out = torch.zeros_like(x)
            keep = mine.nonzero().squeeze(1)
            out[keep] = self(layer, x[keep], expert_ids[keep])
            return out
        return grouped_swiglu(x, expert_ids, self.packed_gate_up[layer], self.packed_down[layer], self.first_expert)

    def serve_blocks(self, layer: int, blocks: torch.Tensor, head: int, out: torch.Tensor) -> int:
        """CPU fast path of an expert rank: dispatch blocks [A, head + C, H] (`Router._pack`: head rows with the
        int32 counts of each local expert's rows, then the rows sorted by local expert) -> each counted row
        through its expert into the same row of out [A, C, H] (the rows after them are left as they are, nobody
        reads them); the rows served. One SwiGLU per (block, expert) with rows, on contiguous row ranges: no sort,
        no gather; in one native call where every weight is in panels."""
        gate_up, down = self.packed_gate_up[layer], self.packed_down[layer]
        if (ptrs := self._panel_ptrs.get(layer)) is None:
            panels = all(isinstance(w, PanelWeight) for w in gate_up + down)
            ptrs = self._panel_ptrs[layer] = tuple(torch.tensor([w.ptr for w in ws], dtype=torch.long)
                                                   for ws in (gate_up, down)) if panels else ()
        a, capacity, h = out.shape
        if ptrs and blocks.stride(1) == out.stride(1) == h and blocks.stride(2) == out.stride(2) == 1:
            inter = gate_up[0].shape[1] // 2
            scratch = torch.empty(capacity * 2 * inter)
            served = native.cpu_kernels().serve_blocks_f32(
                blocks.data_ptr(), blocks.stride(0), out.data_ptr(), out.stride(0), a, head, capacity, h,
                len(gate_up), ptrs[0].data_ptr(), ptrs[1].data_ptr(), inter, scratch.data_ptr())
            if served < 0:
                raise ValueError(f"MoE layer {layer}: a dispatch block counts more rows than its capacity {capacity}")
            return served
        counts = decode_counts(blocks[:, :head], len(gate_up)).tolist()  # [A][M]
        for i, block_counts in enumerate(counts):
            row = 0
            for m, n in enumerate(block_counts):
                if n:
                    out[i, row : row + n] = swiglu(blocks[i, head + row : head + row + n], gate_up[m], down[m])
                row += n
        return sum(map(sum, counts))

    def start(self, layer: int, x: torch.Tensor, expert_ids: torch.Tensor, capacity: int = 0, lane: int | None = None):
        """The routed-experts protocol of the model (see `Router.start`): here the work is done at once."""
        out = self(layer, x, expert_ids)
        return lambda: out

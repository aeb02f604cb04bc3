"""Routed experts held in this process: experts [first_expert, first_expert + num_local_experts) of every MoE
layer, loaded from the checkpoint's fused tensors by slicing, never reading other experts' bytes."""

from __future__ import annotations

import torch

from llama4serve.kernels import native
from llama4serve.kernels.grouped_experts import grouped_swiglu_mm
from llama4serve.kernels.linear import unpack_weight
from llama4serve.kernels.quant import QuantizedWeight
from llama4serve.kernels.moe import grouped_swiglu, swiglu
from llama4serve.actors.model.checkpoint import TEXT_PREFIX, CheckpointReader
from llama4serve.actors.model.config import ModelConfig
from llama4serve.actors.model.quantized import load_quant_format, read_experts


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

    def serve_blocks(self, layer: int, blocks: torch.Tensor, counts: list[list[int]]) -> torch.Tensor:
        """CPU fast path of an expert rank: blocks [A, C, H] whose rows come sorted by local expert, counts[a][m]
        rows of local expert m in block a -> [A, C, H], each row through its expert, zeros after the counted
        rows. One SwiGLU per (block, expert) with rows, on contiguous row ranges: no sort, no gather."""
        out = torch.zeros_like(blocks)
        gate_up, down = self.packed_gate_up[layer], self.packed_down[layer]
        for a, block_counts in enumerate(counts):
            row = 0
            for m, n in enumerate(block_counts):
                if n:
                    out[a, row : row + n] = swiglu(blocks[a, row : row + n], gate_up[m], down[m])
                row += n
        return out

    def start(self, layer: int, x: torch.Tensor, expert_ids: torch.Tensor, capacity: int = 0):
        """The routed-experts protocol of the model (see `Router.start`): here the work is done at once."""
        out = self(layer, x, expert_ids)
        return lambda: out

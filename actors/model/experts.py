"""Routed experts held in this process: experts [first_expert, first_expert + num_local_experts) of every MoE
layer, loaded from the checkpoint's fused tensors by slicing, never reading other experts' bytes."""

from __future__ import annotations

import torch

from llama4serve.kernels.linear import pack_weight, unpack_weight
from llama4serve.kernels.moe import grouped_swiglu
from llama4serve.actors.model.checkpoint import TEXT_PREFIX, CheckpointReader
from llama4serve.actors.model.config import ModelConfig


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


class LocalExperts:
    """Expert weights of one shard, per MoE layer and local expert: gate_up [H, 2I] and down [I, H], each packed
    for `kernels.linear.linear`."""

    def __init__(self, cfg: ModelConfig, reader: CheckpointReader, first_expert: int, last_expert: int, dtype):
        self.first_expert = first_expert
        self.num_local_experts = last_expert - first_expert
        n, h, i = self.num_local_experts, cfg.hidden_size, cfg.intermediate_size
        self.packed_gate_up: dict[int, list[torch.Tensor]] = {}
        self.packed_down: dict[int, list[torch.Tensor]] = {}
        for layer in cfg.moe_layers:
            name = f"{TEXT_PREFIX}layers.{layer}.feed_forward.experts."
            total = reader.shape(name + "gate_up_proj")[0]
            if total != cfg.num_experts:
                raise ValueError(
                    f"{name}gate_up_proj holds {total} experts; config.json says num_local_experts={cfg.num_experts}"
                )
            gate_up = reader.get_rows(name + "gate_up_proj", first_expert, last_expert, dtype, (n, h, 2 * i))
            down = reader.get_rows(name + "down_proj", first_expert, last_expert, dtype, (n, i, h))
            self.packed_gate_up[layer] = [pack_weight(w) for w in gate_up]
            self.packed_down[layer] = [pack_weight(w) for w in down]

    @property
    def gate_up(self) -> dict[int, torch.Tensor]:
        """Plain [E_local, H, 2I] per MoE layer, rebuilt from the packed weights (for inspection)."""
        return {layer: torch.stack([unpack_weight(w) for w in ws]) for layer, ws in self.packed_gate_up.items()}

    @property
    def down(self) -> dict[int, torch.Tensor]:
        """Plain [E_local, I, H] per MoE layer, rebuilt from the packed weights (for inspection)."""
        return {layer: torch.stack([unpack_weight(w) for w in ws]) for layer, ws in self.packed_down.items()}

    def __call__(self, layer: int, x: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
        """x [N, H] rows already scaled by their router score, expert_ids [N] global -> [N, H]."""
        return grouped_swiglu(x, expert_ids, self.packed_gate_up[layer], self.packed_down[layer], self.first_expert)

    def start(self, layer: int, x: torch.Tensor, expert_ids: torch.Tensor, capacity: int = 0):
        """The routed-experts protocol of the model (see `Router.start`): here the work is done at once."""
        out = self(layer, x, expert_ids)
        return lambda: out

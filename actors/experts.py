"""Routed experts held in this process: experts [first_expert, first_expert + num_local_experts) of every MoE
layer, loaded from the checkpoint's fused tensors by slicing, never reading other experts' bytes."""

from __future__ import annotations

import torch

from ..kernels.moe import grouped_swiglu
from .checkpoint import TEXT_PREFIX, CheckpointReader
from .config import ModelConfig


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
    """Expert weights of one shard: gate_up [E_local, H, 2I] and down [E_local, I, H] per MoE layer."""

    def __init__(self, cfg: ModelConfig, reader: CheckpointReader, first_expert: int, last_expert: int, dtype):
        self.first_expert = first_expert
        self.num_local_experts = last_expert - first_expert
        n, h, i = self.num_local_experts, cfg.hidden_size, cfg.intermediate_size
        self.gate_up: dict[int, torch.Tensor] = {}
        self.down: dict[int, torch.Tensor] = {}
        for layer in cfg.moe_layers:
            name = f"{TEXT_PREFIX}layers.{layer}.feed_forward.experts."
            total = reader.shape(name + "gate_up_proj")[0]
            if total != cfg.num_experts:
                raise ValueError(
                    f"{name}gate_up_proj holds {total} experts; config.json says num_local_experts={cfg.num_experts}"
                )
            self.gate_up[layer] = reader.get_rows(name + "gate_up_proj", first_expert, last_expert, dtype, (n, h, 2 * i))
            self.down[layer] = reader.get_rows(name + "down_proj", first_expert, last_expert, dtype, (n, i, h))

    def __call__(self, layer: int, x: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
        """x [N, H] rows already scaled by their router score, expert_ids [N] global -> [N, H]."""
        return grouped_swiglu(x, expert_ids, self.gate_up[layer], self.down[layer], self.first_expert)

    def start(self, layer: int, x: torch.Tensor, expert_ids: torch.Tensor, capacity: int = 0):
        """The routed-experts protocol of the model (see `Router.start`): here the work is done at once."""
        out = self(layer, x, expert_ids)
        return lambda: out

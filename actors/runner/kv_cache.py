"""iRoPE-aware paged KV cache of one attention actor: two pools of blocks.

- full pool (NoPE / full-attention layers): every token of a sequence.
- chunk pool (chunked RoPE layers): only the tokens of the sequence's current attention chunk.

Block bookkeeping is the engine's (plain Python); this class holds the tensors and reads/writes slots.
A slot is `block * block_size + offset`. Shapes: L layers of a pool, S slots, Hkv kv heads, D head_dim.
"""

from __future__ import annotations

import torch

from llama4serve.actors.model.config import ModelConfig


def slots_of(blocks: list[int], positions: range, base: int, block_size: int) -> list[int]:
    """Slots of `positions` in a block table whose first block starts at position `base`."""
    return [blocks[(p - base) // block_size] * block_size + (p - base) % block_size for p in positions]


class KVCache:
    def __init__(
        self,
        cfg: ModelConfig,
        num_full_blocks: int,
        num_chunk_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ):
        self.block_size = block_size
        self.dtype = dtype
        self.layer_pool: dict[int, tuple[str, int]] = {}
        for pool, layers in (("full", cfg.full_layers), ("chunk", cfg.chunked_layers)):
            for idx, layer in enumerate(layers):
                self.layer_pool[layer] = (pool, idx)
        shape = (cfg.num_key_value_heads, cfg.head_dim)
        self.k = {
            "full": torch.zeros(len(cfg.full_layers), num_full_blocks * block_size, *shape, dtype=dtype, device=device),
            "chunk": torch.zeros(
                len(cfg.chunked_layers), num_chunk_blocks * block_size, *shape, dtype=dtype, device=device
            ),
        }
        self.v = {pool: torch.zeros_like(t) for pool, t in self.k.items()}
        # Per-layer views [S, Hkv, D], so a step does not re-slice the pools in every layer.
        self.layer_k = {layer: self.k[pool][idx] for layer, (pool, idx) in self.layer_pool.items()}
        self.layer_v = {layer: self.v[pool][idx] for layer, (pool, idx) in self.layer_pool.items()}

    def pool_of(self, layer: int) -> str:
        return self.layer_pool[layer][0]

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Stores k/v [N, Hkv, D] at `slots` [N]."""
        self.layer_k[layer].index_copy_(0, slots, k)
        self.layer_v[layer].index_copy_(0, slots, v)

    def read(self, layer: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k/v at `slots` [B, L] (padding slots may hold any valid index) -> [B, L, Hkv, D] each."""
        flat = slots.reshape(-1)  # index_select: about 10x faster than advanced indexing with a 2-D index on CPU
        k, v = self.layer_k[layer], self.layer_v[layer]
        shape = (*slots.shape, *k.shape[1:])
        return k.index_select(0, flat).view(shape), v.index_select(0, flat).view(shape)

    def nbytes(self) -> dict[str, int]:
        return {pool: 2 * t.numel() * t.element_size() for pool, t in self.k.items()}

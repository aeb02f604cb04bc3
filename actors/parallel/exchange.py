"""The router's transport: how one MoE layer's blocks move between attention ranks and expert ranks.

Four calls per MoE layer, two on each side. An attention rank `dispatch`es one block per expert rank and later
`combine`s one block back from each; an expert rank `receive`s one block from each attention rank and `reply`s
one block to each. Blocks have fixed row counts (the step's capacity), the same on every rank.

`CollectiveExchange` runs them as `all_to_all_single` over the process group (gloo on CPU, NCCL on GPU, any
node); `shm_transport.ShmExchange` runs them through shared memory when every rank is on one machine.

Shapes: A attention ranks, R expert ranks, B rows per dispatch block (header + capacity), C rows per combine
block, H hidden.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class CollectiveExchange:
    """The exchange as two `all_to_all_single` per MoE layer over the default process group."""

    name = "collective"
    standing = False  # True: expert ranks serve in a standing loop, told each layer by the transport itself

    def __init__(self, first_expert_rank: int, world_size: int):
        self.first_expert_rank = first_expert_rank
        self.world_size = world_size
        self.lanes = [self]  # one exchange in flight at a time: no ping-pong micro-batches (`Router`)

    def _splits(self, attention_rows: int, expert_rows: int) -> list[int]:
        first = self.first_expert_rank
        return [attention_rows] * first + [expert_rows] * (self.world_size - first)

    def dispatch(self, blocks: torch.Tensor, layer: int = -1, micro_batches: int = 1) -> None:
        """Attention side: blocks [R, B, H], one per expert rank, of MoE layer `layer` (of `micro_batches`, each
        on its lane); returns once sent."""
        h = blocks.shape[-1]
        zeros = [0] * self.world_size
        dist.all_to_all_single(blocks.new_empty(0, h), blocks.reshape(-1, h), zeros, self._splits(0, blocks.shape[1]))

    def combine(self, rows: int, like: torch.Tensor) -> torch.Tensor:
        """Attention side: each expert rank's reply block -> [R, rows, H] (dtype and device of `like`)."""
        num_ranks, h = self.world_size - self.first_expert_rank, like.shape[-1]
        back = like.new_empty(num_ranks * rows, h)
        dist.all_to_all_single(back, like.new_empty(0, h), self._splits(0, rows), [0] * self.world_size)
        return back.view(num_ranks, rows, h)

    def receive(self, rows: int, hidden_size: int, dtype: torch.dtype, device) -> torch.Tensor:
        """Expert side: every attention rank's dispatch block -> [A, rows, H]."""
        first = self.first_expert_rank
        recv = torch.empty(first * rows, hidden_size, dtype=dtype, device=device)
        empty = recv.new_empty(0, hidden_size)
        dist.all_to_all_single(recv, empty, self._splits(rows, 0), [0] * self.world_size)
        return recv.view(first, rows, hidden_size)

    def reply_buffer(self, rows: int, hidden_size: int, dtype: torch.dtype, device) -> torch.Tensor:
        """Expert side: where to write this layer's reply blocks [A, rows, H] (`reply` then sends them)."""
        return torch.empty(self.first_expert_rank, rows, hidden_size, dtype=dtype, device=device)

    def reply(self, blocks: torch.Tensor) -> None:
        """Expert side: blocks [A, C, H], one per attention rank."""
        h = blocks.shape[-1]
        zeros = [0] * self.world_size
        dist.all_to_all_single(blocks.new_empty(0, h), blocks.reshape(-1, h), zeros, self._splits(blocks.shape[1], 0))

    def fits(self, rows: int, h: int, dtype: torch.dtype) -> bool:
        """Whether blocks of `rows` rows go through the transport's own slots (shared memory); else the collective
        carries them, and only one exchange can be in flight (the ranks' collectives must come in one order)."""
        return False

    def abort(self) -> None:
        """After an error on this rank: the peers' waits raise at once (the collective's own timeout does it)."""

    def close(self) -> None:
        pass

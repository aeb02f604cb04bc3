"""Router: the token shuffle between an attention rank and the expert ranks, per MoE layer.

The gate (top-k, sigmoid score) runs in the model; this moves the score-scaled rows. Rows are sorted by expert
(which also sorts them by owning rank, since ranks own contiguous expert ranges), the per-(rank, local expert)
counts are exchanged, the rows go out with `all_to_all_single` with uneven splits (dispatch), the expert ranks run
their grouped SwiGLU, and the results come back the same way (combine). Every rank joins all three collectives of
every MoE layer, also with zero rows.

Shapes: N rows, H hidden, W world size, M the most experts any rank holds.
"""

from __future__ import annotations

import time
from typing import Callable

import torch
import torch.distributed as dist

from .experts import LocalExperts


class ExpertLayout:
    """Which rank owns which experts: expert ranges `bounds[j]` live on rank `first_expert_rank + j`."""

    def __init__(self, bounds: list[tuple[int, int]], first_expert_rank: int, world_size: int):
        self.bounds = bounds
        self.world_size = world_size
        self.max_local = max(e1 - e0 for e0, e1 in bounds)
        num_experts = bounds[-1][1]
        self.owner = torch.empty(num_experts, dtype=torch.long)  # [E] owning rank
        self.local_index = torch.empty(num_experts, dtype=torch.long)  # [E] index within its owner
        for j, (e0, e1) in enumerate(bounds):
            self.owner[e0:e1] = first_expert_rank + j
            self.local_index[e0:e1] = torch.arange(e1 - e0)

    def count_matrix(self, expert_ids: torch.Tensor) -> torch.Tensor:
        """Rows per (destination rank, its local expert): [W, M] int64."""
        counts = torch.zeros(self.world_size * self.max_local, dtype=torch.long)
        flat = self.owner[expert_ids] * self.max_local + self.local_index[expert_ids]
        counts.index_add_(0, flat, torch.ones_like(flat))
        return counts.view(self.world_size, self.max_local)


def exchange_counts(send: torch.Tensor) -> torch.Tensor:
    """[W, M] counts this rank sends -> [W, M] counts it receives from each rank."""
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv.view(-1), send.view(-1))
    return recv


class Router:
    """Callable routed-experts stage for an attention rank: `start(layer, x, ids)` returns `finish() -> out`."""

    def __init__(self, layout: ExpertLayout, hidden_size: int, moe_layers: tuple[int, ...]):
        self.layout = layout
        self.hidden_size = hidden_size
        self.moe_layers = moe_layers
        self.exchange_seconds = 0.0  # time inside collectives (for the benchmark)
        self.exchanges = 0

    def start(self, layer: int, x: torch.Tensor, expert_ids: torch.Tensor) -> Callable[[], torch.Tensor]:
        """x [N, H] score-scaled rows, expert_ids [N] -> finish() returning the experts' outputs [N, H]."""
        t0 = time.perf_counter()
        order = torch.argsort(expert_ids, stable=True)
        send_counts = self.layout.count_matrix(expert_ids)
        exchange_counts(send_counts)  # attention ranks own no experts: they receive zeros
        send_split = send_counts.sum(1).tolist()
        zeros = [0] * self.layout.world_size
        x_sorted = x[order].contiguous()
        dispatch = dist.all_to_all_single(x.new_empty(0, self.hidden_size), x_sorted, zeros, send_split, async_op=True)
        back = torch.empty_like(x_sorted)
        combine = dist.all_to_all_single(back, x.new_empty(0, self.hidden_size), send_split, zeros, async_op=True)
        self.exchange_seconds += time.perf_counter() - t0

        def finish() -> torch.Tensor:
            t1 = time.perf_counter()
            dispatch.wait()
            combine.wait()
            self.exchange_seconds += time.perf_counter() - t1
            self.exchanges += 1
            out = torch.empty_like(back)
            out[order] = back
            return out

        return finish

    def idle_step(self, dtype: torch.dtype) -> None:
        """Joins every MoE layer's collectives with zero rows (a step in which this rank has no sequences)."""
        empty_x = torch.empty(0, self.hidden_size, dtype=dtype)
        empty_ids = torch.empty(0, dtype=torch.long)
        for layer in self.moe_layers:
            self.start(layer, empty_x, empty_ids)()


def serve_moe_layer(layout: ExpertLayout, experts: LocalExperts, layer: int, hidden_size: int, dtype) -> int:
    """An expert rank's side of one MoE layer: receive rows, run the grouped SwiGLU, send results back.
    Returns the number of rows served."""
    recv_counts = exchange_counts(torch.zeros(layout.world_size, layout.max_local, dtype=torch.long))
    recv_split = recv_counts.sum(1).tolist()
    zeros = [0] * layout.world_size
    rows = torch.empty(sum(recv_split), hidden_size, dtype=dtype)
    dist.all_to_all_single(rows, torch.empty(0, hidden_size, dtype=dtype), recv_split, zeros)
    # Within each source's segment, rows are sorted by local expert: rebuild their expert ids from the counts.
    local = torch.arange(layout.max_local).repeat(layout.world_size)
    expert_ids = torch.repeat_interleave(local, recv_counts.view(-1)) + experts.first_expert
    out = experts(layer, rows, expert_ids)
    dist.all_to_all_single(torch.empty(0, hidden_size, dtype=dtype), out, zeros, recv_split)
    return rows.shape[0]

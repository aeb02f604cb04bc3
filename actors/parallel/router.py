"""Router: the token shuffle between an attention rank and the expert ranks, per MoE layer.

The gate (top-k, sigmoid score) runs in the model; this moves the score-scaled rows. Rows are sorted by expert
(which also sorts them by owning rank, since ranks own contiguous expert ranges) and go out with
`all_to_all_single` (dispatch: a fixed-size block per expert rank, headed by the per-local-expert counts); the
expert ranks run their grouped SwiGLU and send the results back with uneven splits (combine). Every rank joins
both collectives of every MoE layer, also with zero rows.

Shapes: N rows, H hidden, W world size, M the most experts any rank holds.
"""

from __future__ import annotations

import time
from typing import Callable

import torch
import torch.distributed as dist

from llama4serve.actors.model.experts import LocalExperts


class ExpertLayout:
    """Which rank owns which experts: expert ranges `bounds[j]` live on rank `first_expert_rank + j`."""

    def __init__(self, bounds: list[tuple[int, int]], first_expert_rank: int, world_size: int):
        self.bounds = bounds
        self.first_expert_rank = first_expert_rank
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


def header_rows(layout: ExpertLayout, hidden_size: int, dtype: torch.dtype) -> int:
    """Rows of the dispatch buffer that carry the int32 counts of one destination's local experts."""
    row_bytes = hidden_size * torch.empty(0, dtype=dtype).element_size()
    return -(-4 * layout.max_local // row_bytes)


def encode_counts(counts: torch.Tensor, rows: int, hidden_size: int, dtype: torch.dtype) -> torch.Tensor:
    """int counts [M] -> [rows, H] of `dtype` whose bytes are the int32 counts (collectives copy bytes)."""
    raw = torch.zeros(rows * hidden_size * torch.empty(0, dtype=dtype).element_size(), dtype=torch.uint8)
    raw[: 4 * counts.numel()] = counts.to(torch.int32).view(torch.uint8)
    return raw.view(dtype).view(rows, hidden_size)


def decode_counts(header: torch.Tensor, num: int) -> torch.Tensor:
    """Inverse of encode_counts: [rows, H] -> int64 counts [num]."""
    return header.contiguous().view(-1).view(torch.uint8)[: 4 * num].view(torch.int32).long()


class Router:
    """Routed-experts stage of an attention rank: `start(layer, x, ids)` returns `finish() -> out`.

    Per MoE layer two collectives: dispatch sends each expert rank a fixed-size block (a header with the
    per-local-expert counts, then up to `capacity` rows); combine brings back exactly the rows sent. The step's
    capacity (most routed rows any attention rank has this step) comes from the engine, the same on every rank,
    so no separate count exchange is needed.
    """

    def __init__(self, layout: ExpertLayout, hidden_size: int, moe_layers: tuple[int, ...], dtype: torch.dtype):
        self.layout = layout
        self.hidden_size = hidden_size
        self.moe_layers = moe_layers
        self.dtype = dtype
        self.header_rows = header_rows(layout, hidden_size, dtype)
        self.exchange_seconds = 0.0  # from dispatch to combined results, incl. the expert ranks' compute
        self.exchanges = 0

    def splits(self, capacity: int) -> list[int]:
        """Rows this rank sends to each rank in a dispatch: a fixed block to every expert rank."""
        first = self.layout.first_expert_rank
        return [0] * first + [self.header_rows + capacity] * (self.layout.world_size - first)

    def start(
        self, layer: int, x: torch.Tensor, expert_ids: torch.Tensor, capacity: int
    ) -> Callable[[], torch.Tensor]:
        """x [N, H] score-scaled rows, expert_ids [N], capacity >= N -> finish() returning outputs [N, H]."""
        t0 = time.perf_counter()
        layout, h = self.layout, self.hidden_size
        order = torch.argsort(expert_ids, stable=True)
        counts = layout.count_matrix(expert_ids)  # [W, M]
        send_split = counts.sum(1).tolist()
        x_sorted = x[order]
        first = layout.first_expert_rank
        block = self.header_rows + capacity
        buf = x.new_zeros(layout.world_size - first, block, h)
        start = 0
        for j, rank in enumerate(range(first, layout.world_size)):
            n = send_split[rank]
            buf[j, : self.header_rows] = encode_counts(counts[rank], self.header_rows, h, x.dtype)
            buf[j, self.header_rows : self.header_rows + n] = x_sorted[start : start + n]
            start += n
        zeros = [0] * layout.world_size
        # Dispatch returns once the rows are sent; the caller computes the shared expert while the expert ranks
        # work, then `finish` collects the combine.
        dist.all_to_all_single(x.new_empty(0, h), buf.view(-1, h), zeros, self.splits(capacity))
        self.exchange_seconds += time.perf_counter() - t0

        def finish() -> torch.Tensor:
            t1 = time.perf_counter()
            back = x.new_empty(x.shape[0], h)
            dist.all_to_all_single(back, x.new_empty(0, h), send_split, zeros)
            self.exchange_seconds += time.perf_counter() - t1
            self.exchanges += 1
            out = torch.empty_like(back)
            out[order] = back
            return out

        return finish

    def idle_step(self, capacity: int) -> None:
        """Joins every MoE layer's collectives with zero rows (a step in which this rank has no sequences)."""
        empty_x = torch.empty(0, self.hidden_size, dtype=self.dtype)
        empty_ids = torch.empty(0, dtype=torch.long)
        for layer in self.moe_layers:
            self.start(layer, empty_x, empty_ids, capacity)()


def serve_moe_layer(layout: ExpertLayout, experts: LocalExperts, layer: int, hidden_size: int, dtype,
                    capacity: int) -> int:
    """An expert rank's side of one MoE layer: receive each attention rank's block, run the grouped SwiGLU over
    the rows, send each rank its results. Returns the number of rows served."""
    first, world = layout.first_expert_rank, layout.world_size
    head = header_rows(layout, hidden_size, dtype)
    block = head + capacity
    recv = torch.empty(first * block, hidden_size, dtype=dtype)
    zeros = [0] * world
    dist.all_to_all_single(recv, torch.empty(0, hidden_size, dtype=dtype), [block] * first + [0] * (world - first), zeros)
    recv = recv.view(first, block, hidden_size)
    counts = [decode_counts(recv[a, :head], layout.max_local) for a in range(first)]  # [M] per source
    per_source = [int(c.sum()) for c in counts]
    rows = torch.cat([recv[a, head : head + n] for a, n in enumerate(per_source)])
    # Within each source's block, rows are sorted by local expert: rebuild their expert ids from the counts.
    local = torch.arange(layout.max_local).repeat(first)
    expert_ids = torch.repeat_interleave(local, torch.cat(counts)) + experts.first_expert
    out = experts(layer, rows, expert_ids)
    dist.all_to_all_single(torch.empty(0, hidden_size, dtype=dtype), out, zeros, per_source + [0] * (world - first))
    return rows.shape[0]

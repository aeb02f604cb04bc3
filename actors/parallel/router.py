"""Router: the token shuffle between an attention rank and the expert ranks, per MoE layer.

The gate (top-k, sigmoid score) runs in the model; this moves the score-scaled rows. Rows are sorted by expert
(which also sorts them by owning rank, since ranks own contiguous expert ranges) and go out through the
exchange (`exchange.py`: the process group's `all_to_all_single`, or `shm_transport.py` on one machine; dispatch:
a fixed-size block per expert rank, headed by the per-local-expert counts); the
expert ranks run their grouped SwiGLU over every block at once and send each block back whole (combine: the
same fixed size, `capacity` rows per block). Every rank joins both collectives of every MoE layer, also with
zero rows. Every split is a plain number fixed by the step's capacity and every index is computed on the rows'
device, so nothing reads a tensor's value on the host (no sync in the layer loop; NCCL and CUDA graphs).

Shapes: N rows, H hidden, W world size, M the most experts any rank holds, R expert ranks, A attention ranks,
C capacity (rows per block).
"""

from __future__ import annotations

import time
from typing import Callable

import torch
import torch.distributed as dist  # noqa: F401 - the fake-CUDA tests patch router.dist.all_to_all_single

from llama4serve.kernels import native
from llama4serve.kernels.grouped_experts import expert_ids_from_counts
from llama4serve.actors.model.experts import LocalExperts
from llama4serve.actors.parallel.blocks import decode_counts, encode_counts
from llama4serve.actors.parallel.exchange import CollectiveExchange


class ExpertLayout:
    """Which rank owns which experts: expert ranges `bounds[j]` live on rank `first_expert_rank + j`."""

    def __init__(self, bounds: list[tuple[int, int]], first_expert_rank: int, world_size: int,
                 device: torch.device | str = "cpu"):
        self.bounds = bounds
        self.first_expert_rank = first_expert_rank
        self.world_size = world_size
        self.max_local = max(e1 - e0 for e0, e1 in bounds)
        num_experts = bounds[-1][1]
        owner = torch.empty(num_experts, dtype=torch.long)  # [E] owning rank
        local_index = torch.empty(num_experts, dtype=torch.long)  # [E] index within its owner
        for j, (e0, e1) in enumerate(bounds):
            owner[e0:e1] = first_expert_rank + j
            local_index[e0:e1] = torch.arange(e1 - e0)
        self.owner, self.local_index = owner.to(device), local_index.to(device)

    def count_matrix(self, expert_ids: torch.Tensor) -> torch.Tensor:
        """Rows per (destination rank, its local expert): [W, M] int64, on the ids' device."""
        counts = torch.zeros(self.world_size * self.max_local, dtype=torch.long, device=expert_ids.device)
        flat = self.owner[expert_ids] * self.max_local + self.local_index[expert_ids]
        counts.index_add_(0, flat, torch.ones_like(flat))
        return counts.view(self.world_size, self.max_local)


def header_rows(layout: ExpertLayout, hidden_size: int, dtype: torch.dtype) -> int:
    """Rows of the dispatch buffer that carry the int32 counts of one destination's local experts."""
    row_bytes = hidden_size * torch.empty(0, dtype=dtype).element_size()
    return -(-4 * layout.max_local // row_bytes)


class Router:
    """Routed-experts stage of an attention rank: `start(layer, x, ids)` returns `finish() -> out`.

    Per MoE layer two collectives: dispatch sends each expert rank a fixed-size block (a header with the
    per-local-expert counts, then `capacity` row slots, the first ones used); combine brings each block back
    whole. The step's capacity (most routed rows any attention rank has this step) comes from the engine, the
    same on every rank, so no separate count exchange is needed.
    """

    def __init__(self, layout: ExpertLayout, hidden_size: int, moe_layers: tuple[int, ...], dtype: torch.dtype,
                 device: torch.device | str = "cpu"):
        self.layout = layout
        self.hidden_size = hidden_size
        self.moe_layers = moe_layers
        self.dtype = dtype
        self.device = torch.device(device)
        self.header_rows = header_rows(layout, hidden_size, dtype)
        self.exchange: CollectiveExchange = CollectiveExchange(layout.first_expert_rank, layout.world_size)
        self.exchange_seconds = 0.0  # from dispatch to combined results, incl. the expert ranks' compute
        # Ping-pong: this step's MoE layers each exchange 2 micro-batches, one per lane of the exchange
        # (`set_micro_batches`); a caller that does not split its rows sends an empty second one.
        self.micro_batches = 1
        self.exchanges = 0
        self.native = native.cpu_kernels() if self.device.type == "cpu" else None
        self.rank_of = (layout.owner - layout.first_expert_rank).cpu()  # [E] expert rank index of each expert
        num_ranks = layout.world_size - layout.first_expert_rank
        self.pack_counts = torch.empty(num_ranks * layout.max_local, dtype=torch.long)  # the native packer's scratch

    def set_micro_batches(self, requested: int, capacity: int) -> None:
        """This step's micro-batches: `requested` (the engine's, the same on every rank) where the exchange has a
        lane for each and the step's blocks fit its slots, else 1. Every rank decides the same."""
        ex = self.exchange
        fits = requested <= len(ex.lanes) and ex.fits(self.header_rows + capacity, self.hidden_size, self.dtype)
        self.micro_batches = requested if fits else 1

    def start(
        self, layer: int, x: torch.Tensor, expert_ids: torch.Tensor, capacity: int, lane: int | None = None
    ) -> Callable[[], torch.Tensor]:
        """x [N, H] score-scaled rows, expert_ids [N], capacity >= N -> finish() returning outputs [N, H].
        lane: which micro-batch of a ping-pong step these rows are (None: all of the layer's rows)."""
        if lane is None and self.micro_batches > 1:  # the other lanes go empty, right behind this one
            finishes = [self.start(layer, x, expert_ids, capacity, 0)]
            finishes += [self.start(layer, x[:0], expert_ids[:0], capacity, k) for k in range(1, self.micro_batches)]
            return lambda: [finish() for finish in finishes][0]
        exchange = self.exchange.lanes[lane or 0]
        t0 = time.perf_counter()
        h, num_ranks = self.hidden_size, self.layout.world_size - self.layout.first_expert_rank
        if x.shape[0] > capacity:
            raise ValueError(f"{x.shape[0]} routed rows exceed the step's MoE capacity {capacity}")
        native_path = self.native is not None and x.device.type == "cpu" and x.dtype == torch.float32
        # [R, B, H] (B = header rows + C), [N] the row slot of each row
        buf, slot = (self._pack_native if native_path else self._pack)(x, expert_ids, capacity)
        # Dispatch returns once the rows are sent; the torch layer path computes the shared expert while the
        # expert ranks work, then `finish` collects the combine.
        exchange.dispatch(buf, layer, self.micro_batches)
        self.exchange_seconds += time.perf_counter() - t0

        def finish() -> torch.Tensor:
            t1 = time.perf_counter()
            back = exchange.combine(capacity, x).reshape(num_ranks * capacity, h)  # [R * C, H] dispatch order
            out = back.index_select(0, slot)
            self.exchange_seconds += time.perf_counter() - t1
            self.exchanges += 1
            return out

        return finish

    def _pack(self, x: torch.Tensor, expert_ids: torch.Tensor, capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The dispatch blocks [R, head + C, H] and each row's slot [N] among the R * C row slots, with torch ops on
        the rows' device (no host sync)."""
        layout, h, n = self.layout, self.hidden_size, x.shape[0]
        first, world = layout.first_expert_rank, layout.world_size
        num_ranks, head = world - first, self.header_rows
        order = torch.argsort(expert_ids, stable=True)  # [N] rows by expert, so by destination rank
        counts = layout.count_matrix(expert_ids)[first:]  # [R, M]
        per_rank = counts.sum(1)  # [R]
        rank_sorted = layout.owner.index_select(0, expert_ids.index_select(0, order)) - first  # [N]
        starts = per_rank.cumsum(0) - per_rank  # [R] first sorted row of each destination
        within = torch.arange(n, device=x.device) - starts.index_select(0, rank_sorted)
        slot = rank_sorted * capacity + within  # [N] row slot of each sorted row in the [R * C] blocks
        rows = x.new_zeros(num_ranks * capacity, h).index_copy_(0, slot, x.index_select(0, order))  # [R * C, H]
        header = encode_counts(counts, head, h, x.dtype)  # [R, head, H]
        buf = torch.cat([header, rows.view(num_ranks, capacity, h)], dim=1)
        return buf, torch.empty_like(slot).index_copy_(0, order, slot)

    def _pack_native(self, x: torch.Tensor, expert_ids: torch.Tensor,
                     capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`_pack` in one native call (float32 on the CPU): the same bytes."""
        layout, h, n = self.layout, self.hidden_size, x.shape[0]
        num_ranks = layout.world_size - layout.first_expert_rank
        buf = torch.empty(num_ranks, self.header_rows + capacity, h)
        slot = torch.empty(n, dtype=torch.long)
        x, ids = x.contiguous(), expert_ids.contiguous()
        self.native.pack_dispatch_f32(x.data_ptr(), ids.data_ptr(), n, h, self.rank_of.data_ptr(),
                                      layout.local_index.data_ptr(), num_ranks, layout.max_local, self.header_rows,
                                      capacity, self.pack_counts.data_ptr(), buf.data_ptr(), slot.data_ptr())
        return buf, slot

    def idle_step(self, capacity: int) -> None:
        """Joins every MoE layer's collectives with zero rows (a step in which this rank has no sequences)."""
        empty_x = torch.empty(0, self.hidden_size, dtype=self.dtype, device=self.device)
        empty_ids = torch.empty(0, dtype=torch.long, device=self.device)
        for layer in self.moe_layers:
            self.start(layer, empty_x, empty_ids, capacity)()


def serve_moe_layer(layout: ExpertLayout, experts: LocalExperts, layer: int, hidden_size: int, dtype,
                    capacity: int, device: torch.device | str = "cpu",
                    exchange: CollectiveExchange | None = None) -> torch.Tensor:
    """An expert rank's side of one MoE layer: receive each attention rank's block, run the grouped SwiGLU over
    every block at once (padding rows give zeros), send each block back whole. Returns the number of rows
    served, a 0-dim tensor on `device` (reading it is the caller's sync, after the layer loop); an int on the
    CPU fast path, which reads the counts on the host and runs one SwiGLU per (block, expert) row range."""
    exchange = exchange or CollectiveExchange(layout.first_expert_rank, layout.world_size)
    first, head = layout.first_expert_rank, header_rows(layout, hidden_size, dtype)
    recv = exchange.receive(head + capacity, hidden_size, dtype, device)  # [A, B, H]
    if not experts.portable:
        out = exchange.reply_buffer(capacity, hidden_size, dtype, device)  # [A, C, H]
        served = experts.serve_blocks(layer, recv, head, out)
        exchange.reply(out)
        return served
    counts = decode_counts(recv[:, :head], layout.max_local)  # [A, M]
    # Within each source's block, rows are sorted by local expert: their expert ids follow from the counts.
    expert_ids = expert_ids_from_counts(counts, capacity, experts.first_expert)  # [A * C], -1 for padding
    out = experts(layer, recv[:, head:].reshape(first * capacity, hidden_size), expert_ids)  # [A * C, H]
    exchange.reply(out.view(first, capacity, hidden_size))
    return counts.sum()

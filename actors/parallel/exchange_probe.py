"""ExchangeProbe: a Ray actor that runs the router's exchange alone, outside the model: the same blocks (header +
capacity rows of H per expert rank each way) through the same transports, between actors placed and threaded
like the attention and expert actors. `llama4serve bench --suite expert-parallel` and the transport tests use it.
"""

from __future__ import annotations

import os
import time

import torch

from llama4serve.actors.parallel.process_group import join, make_exchange, master_address


class ExchangeProbe:
    def __init__(self, torch_threads: int | None = None):
        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.exchange = None
        self.rank = -1

    def pid(self) -> int:
        return os.getpid()

    def master_address(self) -> tuple[str, int]:
        return master_address()

    def join(self, master: tuple[str, int], rank: int, world_size: int, first_expert_rank: int, timeout_s: float,
             transport: str, spin_s: float = 0.0) -> str:
        join(master, rank, world_size, timeout_s)
        if self.exchange is not None:
            self.exchange.close()
        self.exchange = make_exchange(transport, rank, world_size, first_expert_rank, timeout_s, spin_s=spin_s)
        self.rank, self.first = rank, first_expert_rank
        return self.exchange.name

    def run(self, exchanges: int, block_rows: int, capacity: int, hidden_size: int, dtype: str = "float32") -> dict:
        """`exchanges` MoE-layer exchanges (dispatch, then combine; an expert rank echoes each block's rows):
        {"seconds": per exchange on this rank, "waits": waits that found the peer not there yet,
        "shm_exchanges": those that went through shared memory}."""
        dt = getattr(torch, dtype)
        ex, world = self.exchange, self.exchange.world_size
        blocks = torch.randn(world - self.first, block_rows, hidden_size).to(dt)  # [R, B, H]
        waits, shm = getattr(ex, "waits", 0), getattr(ex, "shm_exchanges", 0)
        t0 = time.perf_counter()
        for _ in range(exchanges):
            if self.rank < self.first:
                ex.dispatch(blocks)
                back = ex.combine(capacity, blocks)  # [R, C, H]
                assert torch.equal(back, blocks[:, block_rows - capacity:]), "the exchange returned other rows"
            else:
                recv = ex.receive(block_rows, hidden_size, dt, "cpu")  # [A, B, H]
                ex.reply(recv[:, block_rows - capacity:].clone())  # the capacity rows, back whole
        seconds = (time.perf_counter() - t0) / max(exchanges, 1)
        return {"seconds": seconds, "waits": getattr(ex, "waits", 0) - waits,
                "shm_exchanges": getattr(ex, "shm_exchanges", 0) - shm}

    def dispatch_then_combine(self, block_rows: int, capacity: int, hidden_size: int) -> None:
        """One attention-side exchange, for failure tests (waits for every expert rank's reply)."""
        blocks = torch.zeros(self.exchange.world_size - self.first, block_rows, hidden_size)
        self.exchange.dispatch(blocks)
        self.exchange.combine(capacity, blocks)

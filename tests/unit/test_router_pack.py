"""The router's dispatch blocks: the native packer (float32 on the CPU) writes the torch path's bytes, and each
row comes back to its place; an expert rank's native serve_blocks gives every counted row what the torch path
gives it. No process group: an echoing exchange stands in for the expert ranks."""

from __future__ import annotations

import pytest
import torch

from llama4serve.actors.model.checkpoint import CheckpointReader
from llama4serve.actors.model.config import load_model_config
from llama4serve.actors.model.experts import LocalExperts
from llama4serve.actors.parallel.exchange import CollectiveExchange
from llama4serve.actors.parallel.router import ExpertLayout, Router, decode_counts
from llama4serve.cluster.checkpoints.maker import write_checkpoint
from llama4serve.kernels import native


class Echo:
    """An exchange whose expert ranks send each block's rows back unchanged."""

    @property
    def lanes(self) -> list:
        return [self]

    def dispatch(self, blocks: torch.Tensor, layer: int = -1, micro_batches: int = 1) -> None:
        self.blocks = blocks.clone()

    def combine(self, rows: int, like: torch.Tensor) -> torch.Tensor:
        return self.blocks[:, -rows:]


@pytest.mark.parametrize("bounds,first", [([(0, 8), (8, 16)], 1), ([(0, 6), (6, 11), (11, 16)], 2)])
@pytest.mark.parametrize("rows,capacity", [(0, 4), (1, 1), (7, 9), (32, 32)])
def test_native_pack_matches_torch_and_rows_come_back(bounds, first, rows, capacity):
    if native.cpu_kernels() is None:
        pytest.skip(f"native kernels unavailable: {native.unavailable_reason()}")
    hidden = 48
    layout = ExpertLayout(bounds, first, first + len(bounds))
    router = Router(layout, hidden, (0,), torch.float32)
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, hidden, generator=g)
    ids = torch.randint(0, 16, (rows,), generator=g)
    buf, slot = router._pack(x, ids, capacity)
    native_buf, native_slot = router._pack_native(x, ids, capacity)
    assert torch.equal(native_slot, slot)
    assert torch.equal(native_buf.view(torch.int32), buf.view(torch.int32))  # bytes, headers included
    counts = decode_counts(buf[:, : router.header_rows], layout.max_local)
    assert torch.equal(counts, layout.count_matrix(ids)[first:])
    router.exchange = Echo()
    for pack in (router._pack, router._pack_native):
        router.native = native.cpu_kernels() if pack == router._pack_native else None
        assert torch.equal(router.start(0, x, ids, capacity)(), x)


def test_more_rows_than_capacity_is_refused():
    router = Router(ExpertLayout([(0, 16)], 1, 2), 8, (0,), torch.float32)
    with pytest.raises(ValueError, match="exceed the step's MoE capacity 2"):
        router.start(0, torch.zeros(3, 8), torch.zeros(3, dtype=torch.long), 2)


def test_expert_rank_serves_each_counted_row_as_the_torch_path(tmp_path):
    """Two attention ranks' blocks for expert rank 1 of 2 (experts 8-15 of tiny-maverick's 16): the native call
    and the per-expert loop it replaces give every counted row, bit for bit, what LocalExperts' torch path gives
    it; a block that counts more rows than its capacity is refused."""
    if native.cpu_kernels() is None:
        pytest.skip(f"native kernels unavailable: {native.unavailable_reason()}")
    model = write_checkpoint(tmp_path / "tiny-maverick", "tiny-maverick")
    cfg, reader = load_model_config(model), CheckpointReader(model)
    bounds, capacity, layer = [(0, 8), (8, 16)], 6, cfg.moe_layers[0]
    experts = LocalExperts(cfg, reader, 8, 16, torch.float32)
    router = Router(ExpertLayout(bounds, 2, 4), cfg.hidden_size, cfg.moe_layers, torch.float32)
    g = torch.Generator().manual_seed(0)
    sent = [(torch.randn(n, cfg.hidden_size, generator=g), torch.randint(0, 16, (n,), generator=g)) for n in (9, 4)]
    recv = torch.stack([router._pack(x, ids, capacity)[0][1] for x, ids in sent])  # [A, head + C, H]
    head = router.header_rows
    outs = []
    for ptrs in (None, ()):  # the native call, then the torch loop
        experts._panel_ptrs.pop(layer, None) if ptrs is None else experts._panel_ptrs.__setitem__(layer, ptrs)
        out = torch.full((2, capacity, cfg.hidden_size), float("nan"))
        served = experts.serve_blocks(layer, recv, head, out)
        assert bool(experts._panel_ptrs[layer]) == (ptrs is None)  # which path ran
        outs.append(out)
        for a, (x, ids) in enumerate(sent):
            mine = ids >= 8
            order = torch.argsort(ids[mine], stable=True)  # the block's rows: by expert
            want = experts(layer, x[mine][order], ids[mine][order])
            assert torch.equal(out[a, : len(want)], want)
        assert served == sum(int((ids >= 8).sum()) for _, ids in sent)
    experts._panel_ptrs.pop(layer)
    recv[0, 0, 0] = torch.tensor([capacity + 1], dtype=torch.int32).view(torch.float32)  # expert 8's count
    with pytest.raises(ValueError, match="counts more rows than its capacity 6"):
        experts.serve_blocks(layer, recv, head, outs[0])


def test_ping_pong_only_where_the_exchange_has_lanes_and_the_blocks_fit():
    """A block too large for the shared slots goes over the collective, whose calls must come in one order on
    every rank: such a step runs one micro-batch, as does every step over the collective alone."""
    router = Router(ExpertLayout([(0, 16)], 1, 2), 8, (0,), torch.float32)  # header: 2 rows of 8 floats

    class TwoLanes:
        lanes = [None, None]

        @staticmethod
        def fits(rows: int, h: int, dtype: torch.dtype) -> bool:
            return rows * h * dtype.itemsize <= 1024

    router.exchange = TwoLanes()
    router.set_micro_batches(2, 8)  # 10 rows: 320 bytes
    assert router.micro_batches == 2
    router.set_micro_batches(2, 64)  # 66 rows: 2112 bytes
    assert router.micro_batches == 1
    router.exchange = CollectiveExchange(1, 2)
    router.set_micro_batches(2, 8)
    assert router.micro_batches == 1

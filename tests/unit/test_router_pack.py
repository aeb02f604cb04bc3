"""The router's dispatch blocks: the native packer (float32 on the CPU) writes the torch path's bytes, and each
row comes back to its place. No process group: an echoing exchange stands in for the expert ranks."""

from __future__ import annotations

import pytest
import torch

from llama4serve.actors.parallel.router import ExpertLayout, Router, decode_counts
from llama4serve.kernels import native


class Echo:
    """An exchange whose expert ranks send each block's rows back unchanged."""

    def dispatch(self, blocks: torch.Tensor) -> None:
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

"""grouped_mm SwiGLU (kernels/grouped_experts.py) against the reference grouped SwiGLU (kernels/moe.py)."""

import pytest
import torch
import torch.nn.functional as F
from fake_cuda import fake_cuda_mode

from llama4serve.kernels.grouped_experts import (
    expert_ids_from_counts,
    grouped_swiglu_mm,
    masked_swiglu,
    uses_grouped_mm,
)
from llama4serve.kernels.moe import grouped_swiglu

H, I, E = 64, 32, 6


def _weights(dtype, num_experts=E, seed=0):
    g = torch.Generator().manual_seed(seed)
    gate_up = torch.randn(num_experts, H, 2 * I, generator=g) * H**-0.5  # [E, H, 2I]
    down = torch.randn(num_experts, I, H, generator=g) * I**-0.5  # [E, I, H]
    return gate_up.to(dtype), down.to(dtype)


def _rows(n, dtype, seed=1):
    return torch.randn(n, H, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _tol(dtype):
    return dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)


# Expert ids with experts that receive no rows (1, 4 and 5 here), unsorted, and a batch-1 decode.
ID_CASES = [[3, 0, 3, 2, 0, 0, 3, 2, 2, 0, 3], [2], [5, 5, 5, 5], [0, 1, 2, 3, 4, 5, 0]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("ids", ID_CASES)
def test_matches_reference(dtype, ids):
    gate_up, down = _weights(dtype)
    x = _rows(len(ids), dtype)
    expert_ids = torch.tensor(ids)
    assert uses_grouped_mm(x, gate_up)
    ref = grouped_swiglu(x, expert_ids, gate_up, down)
    out = grouped_swiglu_mm(x, expert_ids, gate_up, down)
    assert out.shape == x.shape and out.dtype == dtype
    torch.testing.assert_close(out.float(), ref.float(), **_tol(dtype))
    torch.testing.assert_close(masked_swiglu(x, expert_ids, gate_up, down).float(), ref.float(), **_tol(dtype))


def test_float16_on_cpu():
    gate_up, down = _weights(torch.float16)
    x, expert_ids = _rows(9, torch.float16), torch.tensor([1, 1, 0, 4, 4, 4, 1, 0, 3])
    ref = grouped_swiglu(x.float(), expert_ids, gate_up.float(), down.float())
    torch.testing.assert_close(grouped_swiglu_mm(x, expert_ids, gate_up, down).float(), ref, atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shard_range_and_padding_rows(dtype):
    # This shard holds experts [8, 14); rows for other experts (and -1 padding) come back as zeros.
    gate_up, down = _weights(dtype)
    x = _rows(10, dtype)
    expert_ids = torch.tensor([9, -1, 13, 2, 9, 8, 20, -1, 13, 9])
    mine = (expert_ids >= 8) & (expert_ids < 14)
    out = grouped_swiglu_mm(x, expert_ids, gate_up, down, first_expert=8)
    ref = grouped_swiglu(x[mine], expert_ids[mine], gate_up, down, first_expert=8)
    torch.testing.assert_close(out[mine].float(), ref.float(), **_tol(dtype))
    assert torch.equal(out[~mine], torch.zeros_like(out[~mine]))
    masked = masked_swiglu(x, expert_ids, gate_up, down, first_expert=8)
    torch.testing.assert_close(masked.float(), out.float(), **_tol(dtype))


def test_no_rows():
    gate_up, down = _weights(torch.float32)
    out = grouped_swiglu_mm(_rows(0, torch.float32), torch.empty(0, dtype=torch.long), gate_up, down)
    assert out.shape == (0, H)


def test_unaligned_shapes_take_the_masked_path():
    g = torch.Generator().manual_seed(0)
    gate_up, down = torch.randn(3, 10, 14, generator=g), torch.randn(3, 7, 10, generator=g)  # H 10, I 7
    x, expert_ids = torch.randn(5, 10, generator=g), torch.tensor([2, 0, 2, 2, 0])
    assert not uses_grouped_mm(x, gate_up)
    ref = grouped_swiglu(x, expert_ids, gate_up, down)
    torch.testing.assert_close(grouped_swiglu_mm(x, expert_ids, gate_up, down), ref, atol=1e-5, rtol=1e-5)


def test_grouped_mm_on_cpu_supports_float32_bfloat16_float16():
    # The evidence behind uses_grouped_mm: CPU takes all three dtypes, offsets must be int32, the out dtype
    # must equal the input dtype.
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        a, b = torch.randn(10, 16).to(dtype), torch.randn(3, 16, 8).to(dtype)
        out = F.grouped_mm(a, b, offs=torch.tensor([3, 3, 10], dtype=torch.int32))
        torch.testing.assert_close(out[3:], a[3:] @ b[2])
    with pytest.raises(RuntimeError, match="int32"):
        F.grouped_mm(a, b, offs=torch.tensor([3, 3, 10]))
    with pytest.raises(RuntimeError, match="output dtype"):
        F.grouped_mm(a, b, offs=torch.tensor([3, 3, 10], dtype=torch.int32), out_dtype=torch.float32)


def test_expert_ids_from_counts_serves_fixed_blocks():
    # Two source ranks, blocks of capacity 5: source 0 sent 2 rows of local expert 0 and 1 of expert 2;
    # source 1 sent 4 rows of expert 1. Rows past each count are padding (-1).
    counts = torch.tensor([[2, 0, 1], [0, 4, 0]])
    ids = expert_ids_from_counts(counts, capacity=5, first_expert=10)
    assert ids.tolist() == [10, 10, 12, -1, -1, 11, 11, 11, 11, -1]
    gate_up, down = _weights(torch.float32, num_experts=3)
    x = _rows(10, torch.float32)
    out = grouped_swiglu_mm(x, ids, gate_up, down, first_expert=10)
    valid = ids >= 0
    ref = grouped_swiglu(x[valid], ids[valid], gate_up, down, first_expert=10)
    torch.testing.assert_close(out[valid], ref, atol=1e-5, rtol=1e-5)
    assert not out[~valid].any()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_runs_on_fake_cuda(dtype):
    # bfloat16: grouped_mm's meta (the CUDA kernel's checks); float32: the masked path. A device mismatch or a
    # data-dependent op (.item(), bincount, nonzero) would raise here.
    with fake_cuda_mode():
        gate_up = torch.randn(E, H, 2 * I, dtype=dtype, device="cuda")
        down = torch.randn(E, I, H, dtype=dtype, device="cuda")
        x = torch.randn(12, H, dtype=dtype, device="cuda")
        expert_ids = torch.randint(-1, E, (12,), device="cuda")
        assert uses_grouped_mm(x, gate_up) == (dtype == torch.bfloat16)
        out = grouped_swiglu_mm(x, expert_ids, gate_up, down)
        ids = expert_ids_from_counts(torch.randint(0, 3, (2, E), device="cuda"), capacity=6)
        out2 = grouped_swiglu_mm(x, ids, gate_up, down)
    for o in (out, out2):
        assert o.device.type == "cuda" and o.shape == (12, H) and o.dtype == dtype


def test_fake_cuda_rejects_a_host_sync_and_a_device_mismatch():
    # The reference path reads counts on the host, which FakeTensorMode reports; mixed devices raise too.
    with fake_cuda_mode():
        gate_up, down = torch.randn(E, H, 2 * I, device="cuda"), torch.randn(E, I, H, device="cuda")
        x, expert_ids = torch.randn(4, H, device="cuda"), torch.randint(0, E, (4,), device="cuda")
        with pytest.raises(Exception, match="bincount|local_scalar_dense|DynamicOutputShape|DataDependent"):
            grouped_swiglu(x, expert_ids, gate_up, down)
        with pytest.raises(Exception, match="device"):
            grouped_swiglu_mm(x, expert_ids, gate_up.cpu(), down)

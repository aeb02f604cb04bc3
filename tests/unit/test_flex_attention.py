"""flex_attention over the paged KV cache (kernels/flex_attention.py) against the SDPA reference path
(kernels/attention.py: attention_mask + batched_attention) on ragged batches."""

import pytest
import torch
from fake_cuda import fake_cuda_mode

from llama4serve.kernels.attention import attention_mask, batched_attention
from llama4serve.kernels.flex_attention import (
    flex_attention_padded,
    flex_block_mask,
    paged_flex_attention,
    plan_paged,
)

HQ, HKV, D, BS, NUM_BLOCKS, C = 4, 2, 16, 4, 40, 16
SCALE = D**-0.5


def _tol(dtype):
    return dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)


def _paged_case(segments, dtype, max_query_len=None, seed=0):
    """segments: (kv_start, kv_len, num_rows) per sequence: its keys hold positions [kv_start, kv_start + kv_len)
    and its query rows are the last num_rows of them. Writes random keys into a pool at shuffled blocks and
    returns the paged inputs plus the reference's padded layout."""
    g = torch.Generator().manual_seed(seed)
    k_cache = torch.randn(NUM_BLOCKS * BS, HKV, D, generator=g).to(dtype)
    v_cache = torch.randn(NUM_BLOCKS * BS, HKV, D, generator=g).to(dtype)
    free = torch.randperm(NUM_BLOCKS, generator=g).tolist()
    nb = max(-(-n // BS) for _, n, _ in segments)
    tables, ref_k, ref_v, k_pos, q_pos = [], [], [], [], []
    lk, lq = nb * BS, max_query_len or max(r for _, _, r in segments)
    for start, n, _ in segments:
        blocks = [free.pop() for _ in range(-(-n // BS))]
        tables.append(blocks + [0] * (nb - len(blocks)))  # padding entries: any valid block
        slots = torch.tensor([blocks[j // BS] * BS + j % BS for j in range(n)], dtype=torch.long)
        pad = torch.zeros(lk - n, HKV, D, dtype=dtype)
        ref_k.append(torch.cat([k_cache[slots], pad]))
        ref_v.append(torch.cat([v_cache[slots], pad]))
        k_pos.append(list(range(start, start + n)) + [-1] * (lk - n))
    rows = []
    for b, (start, n, r) in enumerate(segments):
        rows += [(b, p) for p in range(start + n - r, start + n)]
        q_pos.append(list(range(start + n - r, start + n)) + [-1] * (lq - r))
    q = torch.randn(len(rows), HQ, D, generator=g).to(dtype)
    paged = dict(
        block_tables=torch.tensor(tables, dtype=torch.long),
        kv_start=torch.tensor([s for s, _, _ in segments]),
        kv_len=torch.tensor([n for _, n, _ in segments]),
        row_seq=torch.tensor([b for b, _ in rows]),
        row_pos=torch.tensor([p for _, p in rows]),
        block_size=BS,
        max_query_len=lq,
    )
    # Reference layout: q padded per sequence, keys in position order.
    q_pad = torch.zeros(len(segments), lq, HQ, D, dtype=dtype)
    row = 0
    for b, (_, _, r) in enumerate(segments):
        q_pad[b, :r] = q[row : row + r]
        row += r
    ref = dict(q=q_pad, k=torch.stack(ref_k), v=torch.stack(ref_v), q_pos=torch.tensor(q_pos),
               k_pos=torch.tensor(k_pos))
    return q, k_cache, v_cache, paged, ref


def _reference_rows(ref, chunk_size):
    """The reference output [T, Hq, D] of the valid query rows, computed in float32."""
    mask = attention_mask(ref["q_pos"], ref["k_pos"], chunk_size)
    out = batched_attention(ref["q"].float(), ref["k"].float(), ref["v"].float(), mask, SCALE)  # [B, Lq, Hq, D]
    return out[ref["q_pos"] >= 0]


def _reference_rows_in_dtype(ref, chunk_size):
    mask = attention_mask(ref["q_pos"], ref["k_pos"], chunk_size)
    return batched_attention(ref["q"], ref["k"], ref["v"], mask, SCALE)[ref["q_pos"] >= 0]


CASES = {
    # (kv_start, kv_len, rows): full pool tables start at 0; chunk pool tables at the chunk start (C = 16).
    "decode": ([(0, 6, 1), (0, 17, 1), (0, 31, 1)], [(0, 6, 1), (16, 1, 1), (16, 15, 1)]),
    "prefill": ([(0, 7, 7), (0, 11, 3)], [(0, 7, 7), (0, 11, 3)]),
    "mixed": ([(0, 9, 9), (0, 23, 1), (0, 14, 4), (0, 3, 1)], [(0, 9, 9), (16, 7, 1), (0, 14, 4), (0, 3, 1)]),
    # A prefill chunk over positions 12..20 crossing the chunk boundary at 16: causal over it on the full pool;
    # on the chunk pool two segments, rows 12..15 in chunk 0 and rows 16..20 in chunk 1.
    "cross_chunk": ([(0, 21, 9), (0, 5, 1)], [(0, 16, 4), (16, 5, 5), (0, 5, 1)]),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("pool", ["full", "chunk"])
@pytest.mark.parametrize("case", list(CASES))
def test_paged_matches_reference(case, pool, dtype):
    segments = CASES[case][0 if pool == "full" else 1]
    chunk_size = None if pool == "full" else C
    q, k_cache, v_cache, paged, ref = _paged_case(segments, dtype)
    plan = plan_paged(**paged, chunk_size=chunk_size)
    out = paged_flex_attention(q, k_cache, v_cache, plan, SCALE)
    assert out.shape == q.shape and out.dtype == dtype
    torch.testing.assert_close(out.float(), _reference_rows(ref, chunk_size), **_tol(dtype))
    if dtype != torch.float32:  # no further from float32 than the reference path in the same dtype
        err = (out.float() - _reference_rows(ref, chunk_size)).abs().max()
        ref_err = (_reference_rows_in_dtype(ref, chunk_size).float() - _reference_rows(ref, chunk_size)).abs().max()
        assert err <= 2 * ref_err + 1e-3


def test_chunk_rule_is_in_the_mask_mod():
    # One table holding positions 0..20 read as a chunked layer: rows 16..20 see only 16..row, rows 12..15 see
    # 0..row (the mask, not the table, enforces the chunk).
    q, k_cache, v_cache, paged, ref = _paged_case([(0, 21, 9), (0, 30, 2)], torch.float32)
    out = paged_flex_attention(q, k_cache, v_cache, plan_paged(**paged, chunk_size=C), SCALE)
    torch.testing.assert_close(out, _reference_rows(ref, C), atol=1e-5, rtol=1e-5)
    global_out = paged_flex_attention(q, k_cache, v_cache, plan_paged(**paged, chunk_size=None), SCALE)
    assert not torch.allclose(out[4:9], global_out[4:9])  # rows past the boundary differ from global attention
    torch.testing.assert_close(out[:4], global_out[:4], atol=1e-5, rtol=1e-5)


def test_padded_query_slots_are_dropped():
    # max_query_len larger than any sequence's rows (a fixed capture size): same rows out.
    segments = [(0, 6, 1), (0, 13, 2)]
    q, k_cache, v_cache, paged, ref = _paged_case(segments, torch.float32, max_query_len=4)
    out = paged_flex_attention(q, k_cache, v_cache, plan_paged(**paged, chunk_size=None), SCALE)
    torch.testing.assert_close(out, _reference_rows(ref, None), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_padded_face_matches_batched_attention(dtype):
    # The model runner's layout for a step that crosses a chunk boundary on the chunk pool: keys are the
    # cached context (positions 16..27 of chunk 1, padded) followed by the step's own tokens 28..35 (padded).
    g = torch.Generator().manual_seed(3)
    q_pos = torch.tensor([list(range(28, 36)), [40, -1, -1, -1, -1, -1, -1, -1]])
    ctx_pos = torch.tensor([list(range(16, 28)) + [-1] * 4, list(range(32, 40)) + [-1] * 8])
    k_pos = torch.cat([ctx_pos, q_pos], dim=1)  # [B, Lc + Lq]
    q = torch.randn(2, 8, HQ, D, generator=g).to(dtype)
    k = torch.randn(2, k_pos.shape[1], HKV, D, generator=g).to(dtype)
    v = torch.randn(2, k_pos.shape[1], HKV, D, generator=g).to(dtype)
    for chunk_size in (C, 32, None):
        out = flex_attention_padded(q, k, v, flex_block_mask(q_pos, k_pos, chunk_size), SCALE)
        mask = attention_mask(q_pos, k_pos, chunk_size)
        ref = batched_attention(q.float(), k.float(), v.float(), mask, SCALE)
        valid = q_pos >= 0
        torch.testing.assert_close(out[valid].float(), ref[valid], **_tol(dtype))
        assert not out[~valid].any()  # a query slot that sees nothing gives zeros, not NaN


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_kernel_matches(dtype):
    # The fused kernel (torch.compile; on CPU inductor's C++ flex template): ~20-45 s the first time on a cold
    # inductor cache, seconds after.
    q, k_cache, v_cache, paged, ref = _paged_case(CASES["mixed"][1], dtype)
    out = paged_flex_attention(q, k_cache, v_cache, plan_paged(**paged, chunk_size=C), SCALE, compiled=True)
    torch.testing.assert_close(out.float(), _reference_rows(ref, C), **_tol(dtype))


def test_runs_on_fake_cuda():
    # Mask construction, the plan and eager flex_attention on FakeTensorMode "cuda" tensors: no device mismatch,
    # no .item()/.tolist()/nonzero. (compiled=True cannot run here: inductor needs a real CUDA device.)
    with fake_cuda_mode():
        cuda = dict(device="cuda", dtype=torch.long)
        k_cache = torch.randn(NUM_BLOCKS * BS, HKV, D, device="cuda", dtype=torch.bfloat16)
        v_cache = torch.randn_like(k_cache)
        for rows_per_seq, lq in (([1, 1, 1], 1), ([5, 1, 3], 5)):  # decode, mixed
            b, t = len(rows_per_seq), sum(rows_per_seq)
            plan = plan_paged(
                block_tables=torch.randint(0, NUM_BLOCKS, (b, 6), **cuda),
                kv_start=torch.zeros(b, **cuda),
                kv_len=torch.randint(1, 6 * BS, (b,), **cuda),
                row_seq=torch.repeat_interleave(torch.arange(b, **cuda), torch.tensor(rows_per_seq, **cuda),
                                                output_size=t),
                row_pos=torch.randint(0, 6 * BS, (t,), **cuda),
                block_size=BS,
                max_query_len=lq,
                chunk_size=C,
            )
            q = torch.randn(t, HQ, D, device="cuda", dtype=torch.bfloat16)
            out = paged_flex_attention(q, k_cache, v_cache, plan, SCALE)
            assert out.device.type == "cuda" and out.shape == (t, HQ, D) and out.dtype == torch.bfloat16
        q_pos, k_pos = torch.zeros(2, 3, **cuda), torch.zeros(2, 7, **cuda)
        qp = torch.randn(2, 3, HQ, D, device="cuda")
        kv = torch.randn(2, 7, HKV, D, device="cuda")
        out = flex_attention_padded(qp, kv, kv, flex_block_mask(q_pos, k_pos, None), SCALE)
        assert out.device.type == "cuda" and out.shape == qp.shape
        with pytest.raises(Exception, match="device"):  # a pool left on the CPU is caught
            paged_flex_attention(q, k_cache.cpu(), v_cache.cpu(), plan, SCALE)

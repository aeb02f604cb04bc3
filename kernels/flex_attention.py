"""Chunked / global causal GQA attention with torch's `flex_attention`: the portable path that a GPU runs.

Two faces over one kernel:
- `flex_attention_padded` takes what `kernels.attention.batched_attention` takes today (q padded per sequence,
  keys and values already gathered), with the mask given as positions (`flex_block_mask(q_pos, k_pos, C)`).
  It also covers a prefill chunk that crosses an attention-chunk boundary, whose early rows' keys are not in
  the chunk pool (the model runner puts them after the context, as it does now).
- `plan_paged` + `paged_flex_attention` take ragged query rows (per-row sequence index and position) and a
  pool of the paged KV cache with per-sequence block tables, for steps whose keys are all in that pool (every
  decode step; every step of the full pool; prefill chunks that stay inside one attention chunk).

The chunk rule (RoPE layers: position p sees [floor(p / C) * C, p], transformers' create_chunked_causal_mask)
and causality (NoPE layers, C = None) are one `mask_mod`. NoPE temperature scaling stays on q before the call,
as in `actors/model/text_model.py`. Every shape is fixed by (B, Lq, Lk); nothing reads a tensor's value on the host, so a
decode step (Lq = 1) can be captured as a CUDA graph, and every function here runs on FakeTensorMode "cuda"
tensors (on a CPU-only build once a no-op CUDA device guard is registered, see tests/unit/fake_cuda.py; the
compiled kernel itself needs a real device).

Block mask: `create_block_mask` evaluates the mask_mod on the device (vmap over [B, 1, Lq, Lk]) and turns it
into 128 x 128 block tables with fixed-size sorts and sums, no host work, so it is built once per step and pool
(shared by every layer of the pool) and lets the fused kernel skip blocks past a sequence's last key and above
the causal diagonal. A score_mod-only mask would need no mask construction but visits every block.

Eager `flex_attention` (compiled=False) is torch's reference: float32 scores [B, Hq, Lq, Lk] with K/V repeated
per query head and the mask_mod vmapped over every (b, h, q, kv). Exact, any shape, no compile, but on CPU
10-25x slower than SDPA with a dense mask: for tiny checkpoints and checks. compiled=True uses
`torch.compile(flex_attention, dynamic=False)`, the fused kernel (Triton on CUDA; on CPU a C++ template about
as fast as SDPA, ~25-45 s for the first compile on a cold cache, 5-15 s per new shape). Each new (B, Lq, Lk)
compiles again (past torch._dynamo.config.recompile_limit, 8, dynamo falls back to eager), so callers bucket
Lq and Lk; dynamic shapes (dynamic=True, or the automatic dynamic of a recompile) fail on CPU in torch 2.13
(inductor emits C++ that does not compile).

Shapes: T query rows (ragged, grouped by sequence in batch order), B sequences, Lq query slots per sequence,
Lk key slots per sequence (NB * block_size for a paged plan), NB blocks per table, S slots of a pool,
Hq / Hkv heads, D head_dim. A position of -1 marks padding; padded query slots give zeros.
"""

from __future__ import annotations

import warnings
from functools import cache
from typing import Callable, NamedTuple

import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention


# Eager flex is chosen on purpose for tiny checkpoints on CPU (see above); torch's advice to compile is noise there.
warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")


@cache
def _compiled_flex() -> Callable:
    # One compile per (B, Lq, Lk) bucket and pool: a server sees a few dozen (batch sizes x table widths), more
    # than dynamo's default 8 recompiles, past which it would fall back to the unfused eager kernel.
    import torch._dynamo

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)
    return torch.compile(flex_attention, dynamic=False)


def chunked_causal_mask_mod(q_pos: torch.Tensor, k_pos: torch.Tensor, chunk_size: int | None) -> Callable:
    """mask_mod(b, h, q_idx, kv_idx) -> True where query slot q_idx of sequence b may see key slot kv_idx.

    q_pos [B, Lq], k_pos [B, Lk] positions (-1: padding). Causal: 0 <= key <= query; chunked (chunk_size C):
    also key >= floor(query / C) * C (kernels.attention.attention_mask, without its padding-row trick: flex
    gives a row that sees nothing zeros, not NaN).
    """

    def mask_mod(b, h, q_idx, kv_idx):
        q, k = q_pos[b, q_idx], k_pos[b, kv_idx]
        allowed = (k >= 0) & (k <= q)
        if chunk_size is not None:
            allowed = allowed & (k >= q // chunk_size * chunk_size)
        return allowed

    return mask_mod


def flex_block_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, chunk_size: int | None) -> BlockMask:
    """The BlockMask of `chunked_causal_mask_mod` for q_pos [B, Lq], k_pos [B, Lk], on their device; heads
    broadcast (one mask for all heads)."""
    (b, lq), lk = q_pos.shape, k_pos.shape[1]
    return create_block_mask(chunked_causal_mask_mod(q_pos, k_pos, chunk_size), b, None, lq, lk, device=q_pos.device)


def flex_attention_padded(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: BlockMask,
    scale: float,
    compiled: bool = False,
) -> torch.Tensor:
    """q [B, Lq, Hq, D], k/v [B, Lk, Hkv, D], block_mask from `flex_block_mask` -> out [B, Lq, Hq, D].

    GQA: query head h reads kv head h // (Hq / Hkv) (enable_gqa), as SDPA and transformers' repeat_kv do.
    """
    attend = _compiled_flex() if compiled else flex_attention
    out = attend(
        q.transpose(1, 2),  # [B, Hq, Lq, D]
        k.transpose(1, 2),  # [B, Hkv, Lk, D]
        v.transpose(1, 2),
        block_mask=block_mask,
        scale=scale,
        enable_gqa=q.shape[2] != k.shape[2],
    )  # [B, Hq, Lq, D]
    return out.transpose(1, 2)


class PagedPlan(NamedTuple):
    """Where one step reads one pool, built once per step and pool by `plan_paged`, used by every layer."""

    key_slots: torch.Tensor  # [B, Lk] pool slot of each key slot (padding: a slot of a padding block)
    q_index: torch.Tensor  # [B, Lq] the row feeding each query slot (padding: row 0; its output is dropped)
    row_slot: torch.Tensor  # [T] flat query slot b * Lq + i of each row
    block_mask: BlockMask  # over [B, Lq] x [B, Lk]


def plan_paged(
    block_tables: torch.Tensor,
    kv_start: torch.Tensor,
    kv_len: torch.Tensor,
    row_seq: torch.Tensor,
    row_pos: torch.Tensor,
    block_size: int,
    max_query_len: int,
    chunk_size: int | None,
) -> PagedPlan:
    """The step's reading plan for one pool.

    All int64, on the pool's device. block_tables [B, NB] physical blocks (padding entries: any valid block);
    the table's first slot holds position kv_start [B] (0 for the full pool, the chunk start for the chunk
    pool) and it holds kv_len [B] keys, this step's included (they are written before the layer reads).
    row_seq [T] / row_pos [T]: sequence index and position of each query row; rows grouped by sequence in
    order, at most max_query_len (Lq) rows per sequence (1 for decode). The caller guarantees both bounds
    (checking them would read values on the host). A step that crosses a chunk boundary on the chunk pool can
    be two entries ("segments"), one per chunk, when both chunks' keys are in the pool; otherwise use
    `flex_attention_padded` with the step's own keys after the context.
    """
    device = block_tables.device
    b, nb = block_tables.shape
    t, lq = row_seq.shape[0], max_query_len
    offsets = torch.arange(block_size, device=device)
    key_slots = (block_tables[:, :, None] * block_size + offsets).reshape(b, nb * block_size)  # [B, Lk]
    j = torch.arange(nb * block_size, device=device)  # [Lk]
    k_pos = torch.where(j < kv_len[:, None], kv_start[:, None] + j, -1)  # [B, Lk]

    rows = torch.arange(t, device=device)
    per_seq = torch.zeros(b, dtype=torch.long, device=device).index_add_(0, row_seq, torch.ones_like(row_seq))
    first_row = per_seq.cumsum(0) - per_seq  # [B] index of each sequence's first row
    row_slot = row_seq * lq + rows - first_row.index_select(0, row_seq)  # [T]
    q_pos = torch.full((b * lq,), -1, dtype=torch.long, device=device).index_copy_(0, row_slot, row_pos)
    q_index = torch.zeros(b * lq, dtype=torch.long, device=device).index_copy_(0, row_slot, rows)
    return PagedPlan(
        key_slots=key_slots,
        q_index=q_index.view(b, lq),
        row_slot=row_slot,
        block_mask=flex_block_mask(q_pos.view(b, lq), k_pos, chunk_size),
    )


def paged_flex_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    plan: PagedPlan,
    scale: float,
    compiled: bool = False,
) -> torch.Tensor:
    """q [T, Hq, D] ragged rows, k_cache/v_cache [S, Hkv, D] one layer's pool (KVCache.layer_k/layer_v, this
    step's keys already written) -> out [T, Hq, D]."""
    (b, lq), lk = plan.q_index.shape, plan.key_slots.shape[1]
    q_pad = q.index_select(0, plan.q_index.reshape(-1)).view(b, lq, *q.shape[1:])  # [B, Lq, Hq, D]
    keys = k_cache.index_select(0, plan.key_slots.reshape(-1)).view(b, lk, *k_cache.shape[1:])  # [B, Lk, Hkv, D]
    values = v_cache.index_select(0, plan.key_slots.reshape(-1)).view(b, lk, *v_cache.shape[1:])
    out = flex_attention_padded(q_pad, keys, values, plan.block_mask, scale, compiled)  # [B, Lq, Hq, D]
    return out.reshape(b * lq, *q.shape[1:]).index_select(0, plan.row_slot)

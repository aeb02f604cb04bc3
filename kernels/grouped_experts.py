"""Routed experts' SwiGLU with torch's `grouped_mm` over rows sorted by expert: the portable path a GPU runs.

Same math and inputs as `kernels.moe.grouped_swiglu` (stacked weights only, not the packed per-expert lists),
with fixed shapes: the step's N rows are the capacity. Rows whose expert id is outside this shard's range
(e.g. -1 for the padding rows of a fixed-size dispatch block) are sorted last, left out of every group, and
come back as zeros. Nothing reads a tensor's value on the host (counts via index_add, offsets via cumsum), so
a decode step can be captured as a CUDA graph.

`grouped_mm` in torch 2.13 (aten `_grouped_mm`):
- CPU: float32, bfloat16 and float16 all work (a loop of `mm` per group; the out dtype must equal the input
  dtype). Offsets are int32 ends of each group; rows past the last offset are left unwritten (garbage).
- CUDA: bfloat16 on sm90 / sm100 runs a CUTLASS kernel with no device-to-host copy. Every other dtype or GPU
  takes `_grouped_mm_fallback`, which copies the offsets to the host (a sync that breaks CUDA-graph capture),
  and its meta function (FakeTensorMode) accepts only bfloat16. So on CUDA other dtypes (float32 for exact
  parity runs) use `masked_swiglu` instead: every local expert over all N rows, each row keeping its own
  expert's result; E_local times the FLOPs, no sync, fine for tiny checkpoints.
- Strides of every operand must be multiples of 16 bytes: H and I multiples of 4 (float32) or 8 (16-bit);
  other shapes also use `masked_swiglu`.
Older torch (2.8 - 2.9) has only `torch._grouped_mm`; it is used when `F.grouped_mm` is missing.

Shapes: N rows, H hidden, E local experts, I expert intermediate size, A source ranks, C rows per source block.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_grouped_mm = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm")
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def uses_grouped_mm(x: torch.Tensor, gate_up: torch.Tensor) -> bool:
    """Whether `grouped_swiglu_mm` runs grouped_mm for these operands (else `masked_swiglu`): a shape and dtype
    rule, never a value."""
    if x.device.type == "cpu":
        ok_dtype = x.dtype in _DTYPES
    else:
        ok_dtype = x.dtype == torch.bfloat16  # the sync-free CUDA kernel
    align = 16 // x.element_size()
    h, two_i = gate_up.shape[1], gate_up.shape[2]
    return ok_dtype and gate_up.dtype == x.dtype and h % align == 0 and (two_i // 2) % align == 0


def _local_ids(expert_ids: torch.Tensor, first_expert: int, num_local: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Global ids [N] -> (local ids [N] with num_local for rows of other shards, valid [N] bool)."""
    local = expert_ids - first_expert
    valid = (local >= 0) & (local < num_local)
    return torch.where(valid, local, num_local), valid


def grouped_swiglu_mm(
    x: torch.Tensor,
    expert_ids: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    first_expert: int = 0,
) -> torch.Tensor:
    """Each row of x [N, H] through its expert's SwiGLU -> [N, H] in the row order of x.

    expert_ids [N] global ids; gate_up [E, H, 2I] (gate = first I columns) and down [E, I, H] hold experts
    [first_expert, first_expert + E), the checkpoint's fused layout, stacked. Rows of other experts -> zeros.
    """
    n, h = x.shape
    num_local = gate_up.shape[0]
    if n == 0:
        return x.new_zeros(0, h)
    if not uses_grouped_mm(x, gate_up):
        return masked_swiglu(x, expert_ids, gate_up, down, first_expert)
    local, valid = _local_ids(expert_ids, first_expert, num_local)
    order = torch.argsort(local, stable=True)  # [N] rows grouped by expert, other shards' rows last
    counts = torch.zeros(num_local + 1, dtype=torch.int32, device=x.device)
    counts.index_add_(0, local, torch.ones_like(local, dtype=torch.int32))  # [E + 1]
    offs = counts[:num_local].cumsum(0, dtype=torch.int32)  # [E] end row of each expert's group
    x_sorted = x.index_select(0, order)  # [N, H]
    gate, up = _grouped_mm(x_sorted, gate_up, offs=offs).chunk(2, dim=-1)  # [N, I] each
    act = F.silu(gate) * up  # [N, I], contiguous
    out_sorted = _grouped_mm(act, down, offs=offs)  # [N, H]; rows past offs[-1] unwritten
    out_sorted = torch.where(valid.index_select(0, order)[:, None], out_sorted, 0.0)
    return torch.empty_like(out_sorted).index_copy_(0, order, out_sorted)


def masked_swiglu(
    x: torch.Tensor,
    expert_ids: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    first_expert: int = 0,
) -> torch.Tensor:
    """`grouped_swiglu_mm` without grouped_mm: every local expert over all rows, each row keeps its expert's
    output (the others' rows masked). Same arguments and result; E times the FLOPs, fixed shapes, no sync."""
    num_local = gate_up.shape[0]
    local, _ = _local_ids(expert_ids, first_expert, num_local)
    out = torch.zeros_like(x)  # [N, H]
    for e in range(num_local):
        gate, up = (x @ gate_up[e]).chunk(2, dim=-1)  # [N, I] each
        out = torch.where((local == e)[:, None], (F.silu(gate) * up) @ down[e], out)
    return out


def expert_ids_from_counts(counts: torch.Tensor, capacity: int, first_expert: int = 0) -> torch.Tensor:
    """Expert ids of the rows of fixed-size dispatch blocks, from their headers' counts, without a host sync.

    counts [A, E] rows per local expert in each source's block (rows sorted by local expert, as
    `actors.router.Router` sends them), capacity C rows per block -> ids [A * C] global, -1 for padding rows,
    in block order: `grouped_swiglu_mm(recv_rows.view(A * C, H), ids, ...)` then serves every block at once.
    """
    ends = counts.cumsum(1)  # [A, E] end row of each expert in its block
    rows = torch.arange(capacity, device=counts.device).expand(counts.shape[0], capacity).contiguous()  # [A, C]
    local = torch.searchsorted(ends, rows, right=True)  # [A, C]; E past the last counted row
    return torch.where(local < counts.shape[1], local + first_expert, -1).reshape(-1)

"""The header of a dispatch block: the int32 row counts of the destination's local experts, as the bytes of
`header_rows` rows of the block's dtype (collectives and the shared slots copy bytes). `Router` writes them, the
expert ranks (`LocalExperts.serve_blocks`, `serve_moe_layer`) read them."""

from __future__ import annotations

import torch


def encode_counts(counts: torch.Tensor, rows: int, hidden_size: int, dtype: torch.dtype) -> torch.Tensor:
    """int counts [..., M] -> [..., rows, H] of `dtype` whose bytes are the int32 counts (collectives copy
    bytes)."""
    lead, m = counts.shape[:-1], counts.shape[-1]
    row_bytes = hidden_size * torch.empty(0, dtype=dtype).element_size()
    raw = torch.zeros(*lead, rows * row_bytes, dtype=torch.uint8, device=counts.device)
    raw[..., : 4 * m] = counts.to(torch.int32).view(torch.uint8)
    return raw.view(dtype).view(*lead, rows, hidden_size)


def decode_counts(header: torch.Tensor, num: int) -> torch.Tensor:
    """Inverse of encode_counts: [..., rows, H] -> int64 counts [..., num]."""
    lead = header.shape[:-2]
    raw = header.contiguous().view(*lead, -1).view(torch.uint8)
    return raw[..., : 4 * num].view(torch.int32).long()

"""Causal GQA attention over a padded batch of sequences, with optional chunked-local masking.

The caller lays a ragged batch out as B sequences padded to a common length (see `actors/runner/model_runner.py`).
Shapes: B sequences, Lq query slots, Lk key slots, Hq query heads, Hkv kv heads, D head_dim.
A key at position -1 is padding; a query at position -1 is padding (its output is garbage, never NaN).
"""

import torch
import torch.nn.functional as F


def attention_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, chunk_size: int | None) -> torch.Tensor:
    """Boolean mask [B, Lq, Lk], True where query may attend key.

    Causal: key position <= query position. Chunked (RoPE layers): also key >= floor(q / C) * C, i.e. the query
    sees only its own chunk (transformers' create_chunked_causal_mask).
    """
    q = q_pos[:, :, None]
    k = k_pos[:, None, :]
    mask = (k >= 0) & (k <= q)
    if chunk_size is not None:
        mask &= k >= torch.div(q, chunk_size, rounding_mode="floor") * chunk_size
    # Padded query rows attend to slot 0 only, so softmax never sees an all-masked row.
    pad_rows = (q_pos < 0)[:, :, None]
    first = torch.zeros_like(mask)
    first[..., 0] = True
    return torch.where(pad_rows, first, mask)


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Boolean mask from `attention_mask` -> 0 where allowed, -inf elsewhere, in `dtype`. SDPA on CPU converts a
    boolean mask like this on every call; converting once per step saves that work in every layer."""
    return torch.zeros(mask.shape, dtype=dtype).masked_fill_(~mask, float("-inf"))


def batched_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float
) -> torch.Tensor:
    """q [B, Lq, Hq, D], k/v [B, Lk, Hkv, D], mask [B, Lq, Lk] from `attention_mask` (boolean) or `additive_mask`
    -> out [B, Lq, Hq, D]."""
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        attn_mask=mask[:, None],
        scale=scale,
        enable_gqa=q.shape[2] != k.shape[2],
    )  # [B, Hq, Lq, D]
    return out.transpose(1, 2)

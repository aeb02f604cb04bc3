"""Llama 4 rotary embedding in complex form over interleaved pairs, plus NoPE temperature tuning.

Shapes: T tokens, H heads, D head_dim.
"""

import math

import torch


def rope_inv_freq(
    head_dim: int,
    theta: float,
    rope_type: str = "default",
    factor: float = 1.0,
    low_freq_factor: float = 1.0,
    high_freq_factor: float = 4.0,
    original_max_position_embeddings: int = 8192,
) -> torch.Tensor:
    """Inverse frequencies [D/2] (float32); `rope_type` "llama3" applies Llama 3.1 frequency scaling."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if rope_type == "default":
        return inv_freq
    if rope_type != "llama3":
        raise ValueError(f"rope_type is {rope_type!r}; supported: 'default', 'llama3'")
    # Mirrors transformers' _compute_llama3_parameters.
    low_freq_wavelen = original_max_position_embeddings / low_freq_factor
    high_freq_wavelen = original_max_position_embeddings / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (original_max_position_embeddings / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rope_freqs_cis(positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Complex rotations [T, D/2] for integer `positions` [T]."""
    freqs = positions[:, None].float() * inv_freq[None, :]
    return torch.polar(torch.ones_like(freqs), freqs)


def apply_rope(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """Rotates interleaved pairs (x[2i], x[2i+1]) of x [T, H, D] by freqs_cis [T, D/2]."""
    xc = torch.view_as_complex((x if x.dtype == torch.float32 else x.float()).unflatten(-1, (-1, 2)))  # [T, H, D/2]
    out = torch.view_as_real(xc * freqs_cis.unsqueeze(-2)).flatten(-2)
    return out if out.dtype == x.dtype else out.to(x.dtype)


def temperature_scales(positions: torch.Tensor, floor_scale: float, attn_scale: float) -> torch.Tensor:
    """Per-token query scale [T] for NoPE layers: 1 + attn_scale * log1p(floor((pos + 1) / floor_scale))."""
    return torch.log1p(torch.floor((positions.float() + 1.0) / floor_scale)) * attn_scale + 1.0

"""Normalisations. Shapes: x [..., D]."""

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama4TextRMSNorm: normalise in float32, cast back, then scale by `weight` [D]."""
    if x.dtype == torch.float32 and weight.dtype == torch.float32:
        return F.rms_norm(x, x.shape[-1:], weight, eps)  # one fused call; the same arithmetic in float32
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).type_as(x) * weight


def l2_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama4TextL2Norm, the weightless QK norm applied to q and k after RoPE on RoPE layers:
    x * rsqrt(mean(x^2) + eps), computed in float32 and cast back."""
    return F.rms_norm(x, x.shape[-1:], None, eps)

"""Normalisations. Shapes: x [..., D]."""

import torch
import torch.nn.functional as F

from llama4serve.kernels import native


def _float32_rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """x * rsqrt(mean(x^2) + eps) (* weight) over the last dim, all float32: the native kernel on CPU (a
    fraction of F.rms_norm's cost at decode sizes), else F.rms_norm."""
    lib = native.cpu_kernels() if x.device.type == "cpu" and x.is_contiguous() else None
    if lib is None:
        return F.rms_norm(x, x.shape[-1:], weight, eps)
    out = torch.empty_like(x)
    lib.rms_norm_f32(x.data_ptr(), None if weight is None else weight.data_ptr(), out.data_ptr(),
                     x.numel() // x.shape[-1], x.shape[-1], eps)
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama4TextRMSNorm: normalise in float32, cast back, then scale by `weight` [D]."""
    if x.dtype == torch.float32 and weight.dtype == torch.float32:
        return _float32_rms_norm(x, weight.contiguous(), eps)  # one call; the same arithmetic in float32
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).type_as(x) * weight


def l2_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama4TextL2Norm, the weightless QK norm applied to q and k after RoPE on RoPE layers:
    x * rsqrt(mean(x^2) + eps), computed in float32 and cast back."""
    if x.dtype == torch.float32:
        return _float32_rms_norm(x, None, eps)
    return F.rms_norm(x, x.shape[-1:], None, eps)

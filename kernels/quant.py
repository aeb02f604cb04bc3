"""Quantized linear weights held in memory: fp8 e4m3 with one scale per output column, int4 with one scale per
(group of input rows, output column). Pure tensor math; the checkpoint formats are read in actors/model/quantized.py.

Shapes: K input features, M output features, G = K / group_size groups, N rows. Weights are input-major [K, M],
as `kernels.linear` takes them: W[k, m] = code[k, m] * scale[m] (fp8) or code[k, m] * scale[k // group_size, m] (int4,
codes in [-8, 7]).
"""

from __future__ import annotations

import torch

FP8 = "fp8"
INT4 = "int4"
FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max


def quantize_fp8_columns(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [K, M] float -> (codes [K, M] float8_e4m3fn, scales [M] float32): scale = max |column| / 448."""
    w = w.float()
    scales = (w.abs().amax(dim=0) / FP8_MAX).clamp(min=1e-12)
    return (w / scales).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scales


def quantize_int4_groups(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """w [K, M] float -> (codes [K, M] int8 in [-8, 7], scales [G, M] float32), symmetric: scale = max |group| / 7.5
    rounded as compressed-tensors' W4A16 preset does (scale = absmax / ((q_max - q_min) / 2))."""
    k, m = w.shape
    groups = w.float().view(k // group_size, group_size, m)
    scales = (groups.abs().amax(dim=1) / 7.5).clamp(min=1e-12)  # [G, M]
    codes = torch.round(groups / scales[:, None, :]).clamp(-8, 7).to(torch.int8)
    return codes.view(k, m), scales


def quantize_fp8_rows(x: torch.Tensor, scale_ub: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token activation quantization: x [N, K] -> (codes [N, K] e4m3, scales [N, 1] float32), scale =
    min(max |row|, scale_ub) / 448 (fbgemm's quantize_fp8_per_row; compressed-tensors' FP8-dynamic has no bound)."""
    amax = x.abs().amax(dim=-1, keepdim=True).float()
    if scale_ub is not None:
        amax = amax.clamp(max=scale_ub)
    scales = (amax / FP8_MAX).clamp(min=1e-12)
    return (x.float() / scales).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scales


def scaled_mm_fp8(x: torch.Tensor, w: QuantizedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ fp8 w [K, M] (+ bias) -> [..., M] in x.dtype through `torch._scaled_mm`: x quantized per row
    (`quantize_fp8_rows`), w's per-column scales as scale_b [1, M]. On CUDA w's codes must be column-major
    (`QuantizedWeight.column_major`) and K, M multiples of 16."""
    k, m = w.shape
    codes, scales = quantize_fp8_rows(x.reshape(-1, k), w.activation_scale_ub)
    out = torch._scaled_mm(codes, w.codes, scale_a=scales, scale_b=w.scales.view(1, m), out_dtype=x.dtype)
    if bias is not None:
        out = out + bias
    return out.view(*x.shape[:-1], m)


def scaled_mm_fp8_reference(x: torch.Tensor, w: QuantizedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """What `scaled_mm_fp8` computes, in plain float32 ops: (codes_x * scale_x) @ (codes_w * scale_w)."""
    k, m = w.shape
    codes, scales = quantize_fp8_rows(x.reshape(-1, k), w.activation_scale_ub)
    out = (codes.float() * scales) @ w.dequantize(torch.float32)
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype).view(*x.shape[:-1], m)


class QuantizedWeight:
    """A [..., K, M] weight kept quantized (the torch path): `dequantize(dtype)` rebuilds it for one matmul.
    Leading dims stack experts ([E, K, M]: the portable path's routed experts, dequantized one layer at a time).

    fp8: codes float8_e4m3fn [..., K, M], scales float32 [..., M]. int4: two codes per byte, packed [..., K/2, M]
    uint8 (row 2r in the low nibble, row 2r + 1 in the high one, each stored + 8), scales float32 [..., G, M].
    `activation_scale_ub`: fbgemm_fp8's bound on activation row maxima for the scaled fp8 matmul (None: unbounded).
    """

    activation_scale_ub: float | None = None

    def __init__(self, scheme: str, codes: torch.Tensor, scales: torch.Tensor, group_size: int = 0):
        if scheme not in (FP8, INT4):
            raise ValueError(f"quantization scheme {scheme!r} is not supported; expected {FP8!r} or {INT4!r}")
        k = codes.shape[-2]
        if scheme == INT4:
            if codes.dtype != torch.int8 or k % group_size or k % 2:
                raise ValueError(f"int4 codes must be int8 [K, M] with K ({k}) a multiple of {group_size} and of 2")
            nib = (codes.to(torch.int16) + 8).to(torch.uint8)
            codes = nib[..., 0::2, :] | (nib[..., 1::2, :] << 4)  # [..., K/2, M]
        self.scheme, self.codes, self.scales, self.group_size = scheme, codes.contiguous(), scales.float(), group_size
        self.shape = (*codes.shape[:-2], k, codes.shape[-1])

    @staticmethod
    def stack(weights: list[QuantizedWeight]) -> QuantizedWeight:
        """Weights [K, M] of one scheme -> one [len(weights), K, M] (codes and scales stacked as they are)."""
        out = object.__new__(QuantizedWeight)
        first = weights[0]
        out.scheme, out.group_size, out.activation_scale_ub = first.scheme, first.group_size, first.activation_scale_ub
        out.codes = torch.stack([w.codes for w in weights])
        out.scales = torch.stack([w.scales for w in weights])
        out.shape = (len(weights), *first.shape)
        return out

    @property
    def device(self) -> torch.device:
        return self.codes.device

    def int_codes(self) -> torch.Tensor:
        """int4 codes [..., K, M] int8 in [-8, 7]."""
        low, high = (self.codes & 0xF), (self.codes >> 4)
        return torch.stack([low, high], dim=-2).view(self.shape).to(torch.int8) - 8

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """[..., K, M] in `dtype` (computed in float32, then cast)."""
        if self.scheme == FP8:
            return (self.codes.float() * self.scales.unsqueeze(-2)).to(dtype)
        scales = self.scales.repeat_interleave(self.group_size, dim=-2)  # [..., K, M]
        return (self.int_codes().float() * scales).to(dtype)

    def concat_columns(self, other: QuantizedWeight) -> QuantizedWeight:
        """[K, M1] and [K, M2] of the same scheme -> [K, M1 + M2] (q/k/v and gate/up are fused this way)."""
        out = object.__new__(QuantizedWeight)
        out.scheme, out.group_size, out.activation_scale_ub = self.scheme, self.group_size, self.activation_scale_ub
        out.codes = torch.cat([self.codes.view(torch.uint8), other.codes.view(torch.uint8)], dim=-1)
        if self.scheme == FP8:
            out.codes = out.codes.view(torch.float8_e4m3fn)
        out.scales = torch.cat([self.scales, other.scales], dim=-1)
        out.shape = (*self.shape[:-1], self.shape[-1] + other.shape[-1])
        return out

    def to(self, device: torch.device | str) -> QuantizedWeight:
        """This weight with its codes and scales on `device` (self when they are there already)."""
        if self.codes.device == torch.device(device):
            return self
        out = object.__new__(QuantizedWeight)
        out.__dict__.update(self.__dict__, codes=self.codes.to(device), scales=self.scales.to(device))
        return out

    def column_major(self) -> QuantizedWeight:
        """fp8 codes [K, M] stored as [M, K] rows (the checkpoint's own [out, in] layout): the mat2 layout
        `torch._scaled_mm` takes on CUDA; dequantize reads either."""
        if self.scheme != FP8 or self.codes.dim() != 2 or self.codes.stride(0) == 1:
            return self
        out = object.__new__(QuantizedWeight)
        out.__dict__.update(self.__dict__, codes=self.codes.t().contiguous().t())
        return out

    @property
    def nbytes(self) -> int:
        return self.codes.numel() * self.codes.element_size() + self.scales.numel() * 4

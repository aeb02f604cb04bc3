"""Linear layers over weights packed once at load time for the CPU kernels that suit decode.

Shapes: N rows, K input features, M output features.

float32 on CPUs with AVX-512: our own panel kernel (`panel_linear_f32` in `cpu_kernels.c`, built by
`kernels/native.py`). It streams a batch-1 GEMV at the machine's read bandwidth (oneDNN: about 60 %, MKL's
sgemm: a repack of the whole weight on every call for small N), beats oneDNN from N = 1 to a few hundred rows,
and accumulates every output in the same order whatever the batch, so a sequence's numbers do not depend on
what it is batched with.
Otherwise on CPU: oneDNN's inner product over a weight reordered once (`_reorder_linear_weight`). Elsewhere
(CUDA, float16, builds without oneDNN) the weight stays a plain input-major tensor [K, M] and `linear` is `x @ w`.
Quantized weights (`kernels.quant.QuantizedWeight`) off the native path: fp8 with bf16 activations on a GPU
that has fp8 matmuls (sm89+) runs `torch._scaled_mm` (activations quantized per token); anything else (int4,
float32 parity runs, older GPUs, CPU) is dequantized for the one product.
"""

from __future__ import annotations

import ctypes
from functools import cache

import torch

from llama4serve.kernels import native
from llama4serve.kernels.quant import FP8, INT4, QuantizedWeight, scaled_mm_fp8

_PANEL = 64  # output columns per panel (NR in cpu_kernels.c)
_KIND = {"f32": 0, FP8: 1, INT4: 2}  # Panels.kind in cpu_kernels.c
_ONEDNN_DTYPES = (torch.float32, torch.bfloat16)


@cache
def _panel_kernel():
    lib = native.cpu_kernels()
    return None if lib is None else lib.panel_linear_f32


class _Panels(ctypes.Structure):  # Panels in cpu_kernels.c, field for field
    _fields_ = [("data", ctypes.c_void_p), ("scales", ctypes.c_void_p), ("kind", ctypes.c_int64),
                ("group", ctypes.c_int64)]


def _to_panels(t: torch.Tensor) -> torch.Tensor:
    """[K, M] -> [ceil(M / 64), K, 64], the last panel zero-padded."""
    k, m = t.shape
    padded = t.new_zeros(k, -(-m // _PANEL) * _PANEL)
    padded[:, :m] = t
    return padded.view(k, -1, _PANEL).transpose(0, 1).contiguous()


class PanelWeight:
    """A float32 weight [K, M] in the panel layout of `cpu_kernels.c`: panels [ceil(M / 64), K, 64]. `ptr` is the
    address of its `Panels` descriptor, what every native kernel takes as a weight."""

    def __init__(self, weight_t: torch.Tensor):
        self.panels = _to_panels(weight_t.to(torch.float32))
        self.shape = tuple(weight_t.shape)
        self._describe(self.panels, None, "f32", 0)

    def _describe(self, data: torch.Tensor, scales: torch.Tensor | None, kind: str, group: int) -> None:
        self.desc = _Panels(data.data_ptr(), None if scales is None else scales.data_ptr(), _KIND[kind], group)
        self.ptr = ctypes.addressof(self.desc)  # a decode step makes dozens of calls: no per-call lookups

    def to_dense(self) -> torch.Tensor:
        k, m = self.shape
        return self.panels.transpose(0, 1).reshape(k, -1)[:, :m].contiguous()

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        k, m = self.shape
        rows = _rows(x, k)
        out = torch.empty(rows.shape[0], m, dtype=torch.float32)
        if rows.shape[0]:
            _panel_kernel()(rows.data_ptr(), self.ptr, None if bias is None else bias.contiguous().data_ptr(),
                            out.data_ptr(), rows.shape[0], k, m)
        return out if x.dim() == 2 else out.view(*x.shape[:-1], m)


class QuantPanelWeight(PanelWeight):
    """A `QuantizedWeight` in the panel layout, dequantized to float32 in registers by the native kernels.

    fp8: codes [P, K, 64] uint8; scales [P * 64] float32, each times 256 (the kernel decodes e4m3 through fp16,
    which gives 2^-8 of the value). int4: [P, K, 32] uint8, byte b of a row holding column b (low nibble) and
    column b + 32 (high), each + 8; scales [P, G, 64] float32."""

    def __init__(self, weight: QuantizedWeight):
        self.scheme, self.group_size, self.shape = weight.scheme, weight.group_size, weight.shape
        k, m = weight.shape
        if weight.scheme == FP8:
            self.panels = _to_panels(weight.codes.view(torch.uint8))
            scales = torch.zeros(self.panels.shape[0] * _PANEL)
            scales[:m] = weight.scales * 256.0
        else:
            nib = _to_panels((weight.int_codes() + 8).to(torch.uint8))  # [P, K, 64]
            self.panels = (nib[..., :32] | (nib[..., 32:] << 4)).contiguous()
            scales = _to_panels(weight.scales)  # [P, G, 64]
        self.scales = scales
        self._describe(self.panels, scales, weight.scheme, weight.group_size)
        # The panels are all that is kept: the weight's own storage goes (a [:0] view would keep it alive).
        weight.codes, weight.scales = weight.codes.new_empty(0), weight.scales.new_empty(0)

    def to_dense(self) -> torch.Tensor:
        k, m = self.shape
        if self.scheme == FP8:
            codes = self.panels.view(torch.float8_e4m3fn).float().transpose(0, 1).reshape(k, -1)[:, :m]
            return codes * (self.scales[:m] / 256.0)
        nib = torch.cat([self.panels & 0xF, self.panels >> 4], dim=-1).to(torch.int8) - 8  # [P, K, 64]
        codes = nib.float().transpose(0, 1).reshape(k, -1)[:, :m]
        return codes * self.scales.transpose(0, 1).reshape(self.scales.shape[1], -1)[:, :m].repeat_interleave(
            self.group_size, dim=0)


@cache
def _cuda_has_fp8(index: int | None) -> bool:
    return hasattr(torch, "_scaled_mm") and torch.cuda.get_device_capability(index) >= (8, 9)


def uses_scaled_mm(x: torch.Tensor, weight: QuantizedWeight) -> bool:
    """Whether `linear(x, weight)` runs `torch._scaled_mm`: fp8 [K, M] codes column-major on a CUDA device with fp8
    matmuls, x bfloat16 (the one output type row-wise scaling has), K and M multiples of 16. A shape, dtype and
    device rule, never a value."""
    k, m = weight.shape[-2:]
    return (weight.scheme == FP8 and x.device.type == "cuda" and x.dtype == torch.bfloat16
            and weight.codes.dim() == 2 and weight.codes.stride(0) == 1 and k % 16 == 0 and m % 16 == 0
            and _cuda_has_fp8(x.device.index))


def _rows(x: torch.Tensor, k: int) -> torch.Tensor:
    """x [..., K] as contiguous float32 rows [N, K] (x itself when it already is)."""
    if x.dim() == 2 and x.dtype == torch.float32 and x.is_contiguous():
        return x
    return x.reshape(-1, k).to(torch.float32).contiguous()


def panel_swiglu(x: torch.Tensor, gate_up: PanelWeight, down: PanelWeight) -> torch.Tensor:
    """SwiGLU in one native call: x [T, H] -> (silu(x @ gate) * (x @ up)) @ down [T, H] (gate = the first I
    columns of gate_up [H, 2I]; down [I, H])."""
    h, two_i = gate_up.shape
    rows = _rows(x, h)
    out = torch.empty(rows.shape[0], h, dtype=torch.float32)
    if rows.shape[0]:
        scratch = torch.empty(rows.shape[0], two_i, dtype=torch.float32)
        native.cpu_kernels().swiglu_f32(rows.data_ptr(), gate_up.ptr, down.ptr, scratch.data_ptr(), out.data_ptr(),
                                        rows.shape[0], h, two_i // 2)
    return out if x.dim() == 2 else out.view(*x.shape[:-1], h)


def pack_weight(weight_t, dtype: torch.dtype | None = None):
    """weight_t [K, M] input-major -> the weight `linear` takes: a `PanelWeight` for float32 on CPUs with the
    native kernel, a oneDNN-blocked [M, K] tensor on other CPUs, else weight_t made contiguous.

    A `QuantizedWeight` stays quantized: a `QuantPanelWeight` where the native kernel runs and the compute dtype
    is float32, else itself (`linear` dequantizes it per call)."""
    if isinstance(weight_t, QuantizedWeight):
        native_ok = _panel_kernel() is not None and dtype in (None, torch.float32) and weight_t.codes.is_cpu
        if native_ok:
            return QuantPanelWeight(weight_t)
        return weight_t.column_major() if weight_t.codes.is_cuda else weight_t
    if weight_t.device.type != "cpu":
        return weight_t.contiguous()
    if weight_t.dtype == torch.float32 and _panel_kernel() is not None:
        return PanelWeight(weight_t)
    if torch.backends.mkldnn.is_available() and weight_t.dtype in _ONEDNN_DTYPES:
        return torch.ops.mkldnn._reorder_linear_weight(weight_t.t().contiguous())
    return weight_t.contiguous()


def unpack_weight(weight: torch.Tensor | PanelWeight) -> torch.Tensor:
    """The inverse of `pack_weight`: a plain input-major [K, M] tensor."""
    if isinstance(weight, PanelWeight):
        return weight.to_dense()
    if isinstance(weight, QuantizedWeight):
        return weight.dequantize()
    return weight.to_dense().t() if weight.is_mkldnn else weight


def linear(x: torch.Tensor, weight: torch.Tensor | PanelWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ weight (from `pack_weight`, or a plain [K, M] tensor) (+ bias [M]) -> [..., M]."""
    if isinstance(weight, PanelWeight):
        return weight(x, bias)
    if isinstance(weight, QuantizedWeight):
        if uses_scaled_mm(x, weight):
            return scaled_mm_fp8(x, weight, bias)
        weight = weight.dequantize(x.dtype).to(x.device)  # the torch path: dequantized for this one product
    if weight.is_mkldnn:
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    if bias is None:
        return x @ weight
    return torch.addmm(bias, x.reshape(-1, x.shape[-1]), weight).view(*x.shape[:-1], weight.shape[-1])

"""Linear layers over weights packed once at load time for the CPU kernels that suit decode.

Shapes: N rows, K input features, M output features.

float32 on CPUs with AVX-512: our own panel kernel (`panel_linear_f32` in `cpu_kernels.c`, built by
`kernels/native.py`). It streams a batch-1 GEMV at the machine's read bandwidth (oneDNN: about 60 %, MKL's
sgemm: a repack of the whole weight on every call for small N), beats oneDNN from N = 1 to a few hundred rows,
and accumulates every output in the same order whatever the batch, so a sequence's numbers do not depend on
what it is batched with.
Otherwise on CPU: oneDNN's inner product over a weight reordered once (`_reorder_linear_weight`). Elsewhere
(CUDA, float16, builds without oneDNN) the weight stays a plain input-major tensor [K, M] and `linear` is `x @ w`.
"""

from __future__ import annotations

from functools import cache

import torch

from llama4serve.kernels import native

_PANEL = 64  # output columns per panel (NR in cpu_kernels.c)
_ONEDNN_DTYPES = (torch.float32, torch.bfloat16)


@cache
def _panel_kernel():
    lib = native.cpu_kernels()
    return None if lib is None else lib.panel_linear_f32


class PanelWeight:
    """A float32 weight [K, M] in the panel layout of `cpu_kernels.c`: panels [ceil(M / 64), K, 64]."""

    def __init__(self, weight_t: torch.Tensor):
        k, m = weight_t.shape
        padded = torch.zeros(k, -(-m // _PANEL) * _PANEL, dtype=torch.float32)
        padded[:, :m] = weight_t
        self.panels = padded.view(k, -1, _PANEL).transpose(0, 1).contiguous()
        self.shape = (k, m)
        self.ptr = self.panels.data_ptr()  # a decode step makes dozens of calls: no per-call lookups

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


def pack_weight(weight_t: torch.Tensor) -> torch.Tensor | PanelWeight:
    """weight_t [K, M] input-major -> the weight `linear` takes: a `PanelWeight` for float32 on CPUs with the
    native kernel, a oneDNN-blocked [M, K] tensor on other CPUs, else weight_t made contiguous."""
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
    return weight.to_dense().t() if weight.is_mkldnn else weight


def linear(x: torch.Tensor, weight: torch.Tensor | PanelWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ weight (from `pack_weight`, or a plain [K, M] tensor) (+ bias [M]) -> [..., M]."""
    if isinstance(weight, PanelWeight):
        return weight(x, bias)
    if weight.is_mkldnn:
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    if bias is None:
        return x @ weight
    return torch.addmm(bias, x.reshape(-1, x.shape[-1]), weight).view(*x.shape[:-1], weight.shape[-1])

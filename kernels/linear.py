"""Linear layers over weights packed once at load time for the CPU GEMM that suits decode.

Shapes: N rows, K input features, M output features.

On CPU, MKL's sgemm repacks the whole weight on every call when N is small (2..64 decode rows): about 3 GB/s
where a GEMV streams 20 GB/s. oneDNN's inner product over a weight reordered once (`_reorder_linear_weight`)
keeps 15-25 GB/s from N = 1 up and is about twice as fast at N = 32. Elsewhere (CUDA, builds without oneDNN,
float16) the weight stays a plain input-major tensor [K, M] and `linear` is `x @ w`.
"""

import torch

_PACKED_DTYPES = (torch.float32, torch.bfloat16)


def pack_weight(weight_t: torch.Tensor) -> torch.Tensor:
    """weight_t [K, M] input-major -> the weight `linear` takes: a oneDNN-blocked [M, K] tensor on CPU, else
    weight_t made contiguous."""
    cpu = weight_t.device.type == "cpu" and torch.backends.mkldnn.is_available()
    if not cpu or weight_t.dtype not in _PACKED_DTYPES:
        return weight_t.contiguous()
    return torch.ops.mkldnn._reorder_linear_weight(weight_t.t().contiguous())


def unpack_weight(weight: torch.Tensor) -> torch.Tensor:
    """The inverse of `pack_weight`: a plain input-major [K, M] tensor."""
    return weight.to_dense().t() if weight.is_mkldnn else weight


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ weight (from `pack_weight`, or a plain [K, M] tensor) (+ bias [M]) -> [..., M]."""
    if weight.is_mkldnn:
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    if bias is None:
        return x @ weight
    return torch.addmm(bias, x.reshape(-1, x.shape[-1]), weight).view(*x.shape[:-1], weight.shape[-1])

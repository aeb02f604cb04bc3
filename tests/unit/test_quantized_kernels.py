"""Quantized linear weights: the native panel kernels (fp8 e4m3 and int4 groups dequantized in registers) against
the torch path (dequantize, then matmul)."""

from __future__ import annotations

import pytest
import torch

from llama4serve.kernels import native
from llama4serve.kernels.linear import QuantPanelWeight, linear, pack_weight, unpack_weight
from llama4serve.kernels.moe import grouped_swiglu, swiglu
from llama4serve.kernels.quant import FP8, INT4, QuantizedWeight, quantize_fp8_columns, quantize_int4_groups

needs_native = pytest.mark.skipif(native.cpu_kernels() is None, reason=str(native.unavailable_reason()))
SHAPES = [(512, 200), (256, 64), (128, 1000), (64, 32)]


def _weight(scheme: str, k: int, m: int, seed: int = 0) -> QuantizedWeight:
    w = torch.randn(k, m, generator=torch.Generator().manual_seed(seed)) / k**0.5
    if scheme == FP8:
        return QuantizedWeight(FP8, *quantize_fp8_columns(w))
    group = 32 if k % 128 else 128
    return QuantizedWeight(INT4, *quantize_int4_groups(w, group), group)


def test_quantize_roundtrip_is_close():
    w = torch.randn(256, 96) / 16
    fp8 = QuantizedWeight(FP8, *quantize_fp8_columns(w)).dequantize()
    int4 = QuantizedWeight(INT4, *quantize_int4_groups(w, 128), 128).dequantize()
    assert (fp8 - w).abs().max() < 0.07 * w.abs().max()  # e4m3: 3 mantissa bits
    assert (int4 - w).abs().max() <= w.abs().max() / 7.5 / 2 + 1e-6  # half a step of the largest group
    codes = QuantizedWeight(INT4, *quantize_int4_groups(w, 128), 128)
    assert codes.codes.shape == (128, 96) and codes.int_codes().min() >= -8 and codes.int_codes().max() <= 7


def test_unknown_scheme_is_refused():
    with pytest.raises(ValueError, match="'nf4' is not supported"):
        QuantizedWeight("nf4", torch.zeros(2, 2), torch.ones(2))


@pytest.mark.parametrize("scheme", [FP8, INT4])
def test_torch_path_dequantizes_per_matmul(scheme):
    q = _weight(scheme, 256, 96)
    x = torch.randn(5, 256)
    torch.testing.assert_close(linear(x, q), x @ q.dequantize(), rtol=0, atol=0)
    torch.testing.assert_close(linear(x.bfloat16(), q).float(), (x.bfloat16() @ q.dequantize(torch.bfloat16)).float())


@needs_native
@pytest.mark.parametrize("scheme", [FP8, INT4])
@pytest.mark.parametrize("k,m", SHAPES)
def test_native_panels_match_dequantize_then_matmul(scheme, k, m):
    ref = _weight(scheme, k, m).dequantize()
    packed = pack_weight(_weight(scheme, k, m), torch.float32)
    assert isinstance(packed, QuantPanelWeight)
    assert torch.equal(unpack_weight(packed), ref)
    bias = torch.randn(m)
    for n in (1, 2, 7, 32, 61):
        x = torch.randn(n, k)
        torch.testing.assert_close(linear(x, packed, bias), x @ ref + bias, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(linear(x, packed)[:1], linear(x[:1], packed), rtol=0, atol=0)  # batch-invariant


@needs_native
@pytest.mark.parametrize("scheme", [FP8, INT4])
def test_native_swiglu_over_quantized_experts(scheme):
    h, i, e = 128, 64, 4
    gate_up = [_weight(scheme, h, 2 * i, seed) for seed in range(e)]
    down = [_weight(scheme, i, h, 10 + seed) for seed in range(e)]
    dense_gu, dense_d = [w.dequantize() for w in gate_up], [w.dequantize() for w in down]
    packed_gu, packed_d = [pack_weight(w, torch.float32) for w in gate_up], [pack_weight(w, torch.float32) for w in down]
    x, ids = torch.randn(9, h), torch.tensor([0, 3, 3, 1, 0, 2, 3, 1, 0])
    torch.testing.assert_close(swiglu(x, packed_gu[1], packed_d[1]), swiglu(x, dense_gu[1], dense_d[1]),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grouped_swiglu(x, ids, packed_gu, packed_d), grouped_swiglu(x, ids, dense_gu, dense_d),
                               rtol=1e-5, atol=1e-5)


@needs_native
def test_bfloat16_compute_keeps_the_torch_path():
    assert isinstance(pack_weight(_weight(FP8, 64, 64), torch.bfloat16), QuantizedWeight)

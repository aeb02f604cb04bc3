"""The GPU path of quantized weights, checked on this CPU machine.

- fp8: `torch._scaled_mm` with per-token activation scales and per-channel weight scales (`kernels.quant.
  scaled_mm_fp8`). Its math runs here on torch's CPU `_scaled_mm` and is compared with the plain-float reference
  that mirrors it and with the dequantized matmul. Under FakeTensorMode with device="cuda" tensors, `linear`
  takes the scaled path for bf16 activations (the meta function checks the operands' layouts, dtypes and
  alignment as the CUDA kernel does) and the dequantize path for int4 and float32.
- A prefill and a decode step of fp8 and int4 checkpoints on fake cuda, 1x0 and the expert side of 1x2: the
  routed experts stay quantized on the device and are dequantized per layer, without a host sync.
"""

from __future__ import annotations

import pytest
import torch
from fake_cuda import fake_cuda_mode
from test_fake_cuda_step import _run_attention_side, on_fake_cuda  # noqa: F401 (a fixture)

from torch._subclasses.fake_tensor import unset_fake_temporarily

from llama4serve.actors.attention_actor import AttentionActor
from llama4serve.actors.model.checkpoint import CheckpointReader
from llama4serve.actors.expert_actor import ExpertShardActor
from llama4serve.actors.model.config import load_model_config
from llama4serve.actors.model.experts import expert_split
from llama4serve.actors.parallel.router import ExpertLayout
from llama4serve.cluster.checkpoints.maker import write_checkpoint
from llama4serve.kernels import linear as linear_mod
from llama4serve.kernels.linear import linear, pack_weight, uses_scaled_mm
from llama4serve.kernels.quant import (FP8, INT4, QuantizedWeight, quantize_fp8_columns, quantize_fp8_rows,
                                       quantize_int4_groups, scaled_mm_fp8, scaled_mm_fp8_reference)

BLOCK = 8
REAL_GET = CheckpointReader.get  # before any fixture wraps it


class _HostRecord(list):
    """A small tensor's values, read on the host: what `.tolist()` of the real tensor gives, without an op under
    the fake mode (fake tensors hold no values to check)."""

    def tolist(self) -> list:
        return list(self)


def _fp8(k: int, m: int, seed: int = 0) -> QuantizedWeight:
    w = torch.randn(k, m, generator=torch.Generator().manual_seed(seed)) / k**0.5
    return QuantizedWeight(FP8, *quantize_fp8_columns(w))


def test_fp8_rows_quantize_per_token_with_the_bound():
    x = torch.tensor([[1.0, -3.0, 0.5], [2000.0, 1.0, -2.0]])
    codes, scales = quantize_fp8_rows(x, scale_ub=1200.0)
    assert codes.dtype == torch.float8_e4m3fn and scales.shape == (2, 1)
    torch.testing.assert_close(scales, torch.tensor([[3.0 / 448], [1200.0 / 448]]))
    assert codes.float()[1, 0] == 448.0  # clamped at the bound
    torch.testing.assert_close(codes.float()[0] * scales[0], x[0], rtol=0.07, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scaled_mm_on_cpu_matches_its_reference_and_the_dequantized_matmul(dtype):
    w = _fp8(256, 96)
    x = (torch.randn(7, 256) * 3).to(dtype)
    bias = torch.randn(96).to(dtype)
    for weight in (w, w.column_major()):  # the CUDA layout: same numbers
        got = scaled_mm_fp8(x, weight, bias)
        assert got.dtype == dtype and got.shape == (7, 96)
        ref = scaled_mm_fp8_reference(x, weight, bias)
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(got.float(), ref.float(), rtol=tol, atol=tol)
    dense = x.float() @ w.dequantize() + bias.float()
    err = (got.float() - dense).abs().max() / dense.abs().max()
    assert err < 0.05, f"activation quantization error {err:.3f} of the output range; e4m3 allows about 0.03"
    assert w.column_major().codes.stride() == (1, 256) and torch.equal(w.column_major().dequantize(), w.dequantize())


def test_cpu_never_takes_the_scaled_path():
    assert not uses_scaled_mm(torch.randn(2, 256, dtype=torch.bfloat16), _fp8(256, 96).column_major())


@pytest.fixture
def fp8_gpu(monkeypatch):
    """FakeTensorMode with cuda tensors, on a device that reports fp8 matmuls (sm90)."""
    monkeypatch.setattr(linear_mod, "_cuda_has_fp8", lambda index: True)
    with fake_cuda_mode():
        yield


def test_fake_cuda_linear_runs_scaled_mm_for_bf16_fp8(fp8_gpu, monkeypatch):
    calls = []
    real = torch._scaled_mm
    monkeypatch.setattr(torch, "_scaled_mm", lambda *a, **kw: calls.append(a) or real(*a, **kw))
    w = pack_weight(_fp8(256, 96).to("cuda"))  # column-major codes on the device
    assert isinstance(w, QuantizedWeight) and w.codes.device.type == "cuda" and w.codes.stride(0) == 1
    x = torch.randn(5, 3, 256, dtype=torch.bfloat16, device="cuda")
    out = linear(x, w, torch.zeros(96, dtype=torch.bfloat16, device="cuda"))
    assert out.shape == (5, 3, 96) and out.dtype == torch.bfloat16 and out.device.type == "cuda"
    assert len(calls) == 1 and calls[0][0].dtype == torch.float8_e4m3fn
    out = linear(x.float(), w)  # float32 parity runs: dequantized, no scaled matmul
    assert out.dtype == torch.float32 and len(calls) == 1
    ragged = pack_weight(_fp8(256, 40).to("cuda"))  # 40 outputs: not a multiple of 16
    assert not uses_scaled_mm(x, ragged) and linear(x, ragged).shape == (5, 3, 40)


def test_fake_cuda_int4_dequantizes_to_bf16(fp8_gpu):
    w = torch.randn(256, 96) / 16
    q = pack_weight(QuantizedWeight(INT4, *quantize_int4_groups(w, 128), 128).to("cuda"))
    x = torch.randn(4, 256, dtype=torch.bfloat16, device="cuda")
    assert not uses_scaled_mm(x, q)
    out = linear(x, q)
    assert out.shape == (4, 96) and out.dtype == torch.bfloat16 and out.device.type == "cuda"


@pytest.fixture(scope="module", params=[("fp8", "tiny-maverick"), ("int4", "tiny-scout")], ids=lambda p: p[0])
def quantized(request, tmp_path_factory):
    scheme, preset = request.param
    return str(write_checkpoint(tmp_path_factory.mktemp(scheme), preset, quantize=scheme))


def test_fake_cuda_steps_keep_experts_quantized(quantized, on_fake_cuda, monkeypatch):  # noqa: F811
    monkeypatch.setattr(linear_mod, "_cuda_has_fp8", lambda index: True)
    fake_get = CheckpointReader.get

    def get(self, name, *args, **kwargs):  # int4 `weight_shape` records: host values the loader checks
        if name.endswith(".weight_shape"):
            with unset_fake_temporarily():
                return _HostRecord(REAL_GET(self, name, *args, **kwargs).tolist())
        return fake_get(self, name, *args, **kwargs)

    monkeypatch.setattr(CheckpointReader, "get", get)
    calls, real = [], torch._scaled_mm
    monkeypatch.setattr(torch, "_scaled_mm", lambda *a, **kw: calls.append(a[1].shape) or real(*a, **kw))
    cfg = load_model_config(quantized)
    actor = AttentionActor(quantized, "auto", 32, 16, BLOCK, device="cuda", cuda_graph_batch_sizes=None)
    experts = actor.expert_load.routed
    for w in (*experts.stacked_gate_up.values(), *experts.stacked_down.values()):
        assert isinstance(w, QuantizedWeight) and w.device.type == "cuda"
    _run_attention_side(actor, cfg.attention_chunk_size)
    # fbgemm fp8: the dense MLPs' and shared experts' linears (gate_up, down) in every layer, both steps
    assert len(calls) == (2 * 2 * cfg.num_hidden_layers if "fp8" in quantized else 0), calls
    bounds = expert_split(cfg.num_experts, 2)
    shard = ExpertShardActor(quantized, "auto", bounds, 1, device="cuda")
    assert all(isinstance(w, QuantizedWeight) for w in shard.experts.stacked_down.values())
    shard.layout = ExpertLayout(bounds, 1, 3, shard.device)
    assert shard.serve_step(2).device.type == "cuda"

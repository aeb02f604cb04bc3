"""Each kernel against a plain-torch reference written here (loops, explicit formulas)."""

import ctypes
import math
import os
import time
from pathlib import Path

import pytest
import torch

from llama4serve.kernels.attention import additive_mask, attention_mask, batched_attention
from llama4serve.kernels import linear as linear_module, native
from llama4serve.kernels.linear import PanelWeight, linear, pack_weight, unpack_weight
from llama4serve.kernels.moe import grouped_swiglu, route_topk, swiglu
from llama4serve.kernels.norms import l2_norm, rms_norm
from llama4serve.kernels.rope import apply_rope, rope_freqs_cis, rope_inv_freq, temperature_scales
from llama4serve.kernels.sampling import sample_tokens, token_logprobs

torch.manual_seed(0)


@pytest.mark.parametrize("dim", [16, 20, 512])
@pytest.mark.parametrize("layout", ["contiguous", "strided"])  # strided: the torch fallback
def test_rms_norm_and_l2_norm(dim, layout):
    x = torch.randn(5, 3, 2 * dim)[..., :dim] if layout == "strided" else torch.randn(5, 3, dim)
    w = torch.randn(dim)
    ref = torch.stack([v / math.sqrt((v * v).mean() + 1e-5) for v in x.reshape(-1, dim)]).reshape(x.shape)
    torch.testing.assert_close(rms_norm(x, w, 1e-5), ref * w)
    torch.testing.assert_close(l2_norm(x, 1e-5), ref)
    xb = x.bfloat16()
    assert rms_norm(xb, w.bfloat16(), 1e-5).dtype == torch.bfloat16


def _llama3_reference(dim, theta, factor, low, high, old):
    out = []
    for i in range(0, dim, 2):
        f = 1.0 / theta ** (i / dim)
        wavelen = 2 * math.pi / f
        if wavelen < old / high:
            out.append(f)
        elif wavelen > old / low:
            out.append(f / factor)
        else:
            s = (old / wavelen - low) / (high - low)
            out.append((1 - s) * f / factor + s * f)
    return torch.tensor(out)


def test_rope_inv_freq_default_and_llama3():
    ref = torch.tensor([1.0 / 500000.0 ** (i / 64) for i in range(0, 64, 2)])
    torch.testing.assert_close(rope_inv_freq(64, 500000.0), ref)
    got = rope_inv_freq(64, 500000.0, "llama3", 8.0, 1.0, 4.0, 64)
    torch.testing.assert_close(got, _llama3_reference(64, 500000.0, 8.0, 1.0, 4.0, 64))
    assert not torch.equal(got, ref)  # scaling changed something
    with pytest.raises(ValueError, match="rope_type"):
        rope_inv_freq(64, 1e4, "yarn")


def test_apply_rope_rotates_interleaved_pairs():
    t, h, d = 7, 3, 8
    x = torch.randn(t, h, d)
    pos = torch.tensor([0, 1, 2, 30, 31, 5, 100])
    inv = rope_inv_freq(d, 10000.0)
    out = apply_rope(x, rope_freqs_cis(pos, inv))
    ref = torch.empty_like(x)
    for ti in range(t):
        for i in range(d // 2):
            a = pos[ti].item() * inv[i].item()
            c, s = math.cos(a), math.sin(a)
            x0, x1 = x[ti, :, 2 * i], x[ti, :, 2 * i + 1]
            ref[ti, :, 2 * i] = x0 * c - x1 * s
            ref[ti, :, 2 * i + 1] = x0 * s + x1 * c
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_temperature_scales():
    pos = torch.tensor([0, 6, 7, 15, 100])
    ref = torch.tensor([1 + 0.1 * math.log1p(math.floor((p + 1) / 8)) for p in pos.tolist()])
    torch.testing.assert_close(temperature_scales(pos, 8.0, 0.1), ref)


def _attention_reference(q, k, v, q_pos, k_pos, chunk, scale):
    """Loop over batch, query, head with an explicit softmax."""
    b, lq, hq, d = q.shape
    group = hq // k.shape[2]
    out = torch.zeros_like(q)
    for bi in range(b):
        for qi in range(lq):
            p = q_pos[bi, qi].item()
            if p < 0:
                continue
            lo = p // chunk * chunk if chunk else 0
            keep = [j for j in range(k.shape[1]) if 0 <= k_pos[bi, j].item() <= p and k_pos[bi, j].item() >= lo]
            for hi in range(hq):
                kk = k[bi, keep, hi // group]
                w = torch.softmax((kk @ q[bi, qi, hi]) * scale, dim=0)
                out[bi, qi, hi] = w @ v[bi, keep, hi // group]
    return out


@pytest.mark.parametrize("chunk", [None, 4])
def test_batched_attention_ragged_gqa(chunk):
    # Two sequences: one with 3 cached tokens + 5 new ones, one with 9 cached + 1 new (decode).
    hq, hkv, d = 4, 2, 8
    q_pos = torch.tensor([[3, 4, 5, 6, 7], [9, -1, -1, -1, -1]])
    ctx_pos = torch.tensor([[0, 1, 2, -1, -1, -1, -1, -1, -1], list(range(9))])
    k_pos = torch.cat([ctx_pos, q_pos], dim=1)
    q = torch.randn(2, 5, hq, d)
    k = torch.randn(2, 14, hkv, d)
    v = torch.randn(2, 14, hkv, d)
    out = batched_attention(q, k, v, attention_mask(q_pos, k_pos, chunk), d**-0.5)
    ref = _attention_reference(q, k, v, q_pos, k_pos, chunk, d**-0.5)
    valid = q_pos >= 0
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[valid], ref[valid], atol=1e-5, rtol=1e-4)


def test_additive_mask_gives_the_same_attention_as_the_boolean_mask():
    q_pos = torch.tensor([[3, 4, 5], [9, -1, -1]])
    k_pos = torch.cat([torch.tensor([[0, 1, 2, -1], [5, 6, 7, 8]]), q_pos], dim=1)
    q, k, v = torch.randn(2, 3, 4, 8), torch.randn(2, 7, 2, 8), torch.randn(2, 7, 2, 8)
    mask = attention_mask(q_pos, k_pos, 4)
    add = additive_mask(mask, torch.float32)
    assert torch.equal(add == 0, mask) and torch.isinf(add[~mask]).all()
    torch.testing.assert_close(batched_attention(q, k, v, add, 0.3), batched_attention(q, k, v, mask, 0.3))


@pytest.mark.parametrize("native_kernel", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [0, 1, 3, 32])
def test_packed_linear_matches_matmul(dtype, rows, native_kernel, monkeypatch):
    if not native_kernel:  # the oneDNN path that CPUs without AVX-512 or a compiler take
        monkeypatch.setattr(linear_module, "_panel_kernel", lambda: None)
    w_t = torch.randn(24, 40).to(dtype)  # [in, out]
    bias = torch.randn(40).to(dtype)
    x = torch.randn(rows, 24).to(dtype)
    packed = pack_weight(w_t)
    assert torch.equal(unpack_weight(packed), w_t)
    tol = {"atol": 1e-4, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 0.1, "rtol": 0.02}
    ref = x.float() @ w_t.float()
    torch.testing.assert_close(linear(x, packed).float(), ref, **tol)
    torch.testing.assert_close(linear(x, packed, bias).float(), ref + bias.float(), **tol)
    torch.testing.assert_close(linear(x, w_t, bias).float(), ref + bias.float(), **tol)  # unpacked fallback
    x3 = torch.randn(2, 5, 24).to(dtype)[:, ::2]  # non-contiguous, 3-D
    torch.testing.assert_close(linear(x3, packed).float(), x3.float() @ w_t.float(), **tol)


def _needs_panel_kernel():
    reason = native.unavailable_reason()
    if reason is not None and "AVX-512" in reason:
        pytest.skip(reason)  # every other reason (no compiler, a failed build) fails below
    assert native.cpu_kernels() is not None, reason


@pytest.mark.parametrize("k,m", [(1, 1), (7, 16), (24, 63), (24, 64), (40, 65), (512, 200)])
def test_panel_linear_matches_matmul_and_is_batch_invariant(k, m):
    _needs_panel_kernel()
    w_t, bias = torch.randn(k, m), torch.randn(m)
    packed = pack_weight(w_t)
    assert isinstance(packed, PanelWeight) and torch.equal(unpack_weight(packed), w_t)
    x = torch.randn(45, k)
    for rows in (0, 1, 2, 5, 6, 7, 13, 45):
        torch.testing.assert_close(linear(x[:rows], packed, bias), x[:rows] @ w_t + bias, atol=1e-4, rtol=1e-4)
    full = linear(x, packed)
    for i in (0, 6, 44):  # bit for bit the same row whatever else is in the batch
        assert torch.equal(linear(x[i : i + 1], packed), full[i : i + 1])


def test_native_build_is_cached_and_can_be_disabled(tmp_path, monkeypatch):
    _needs_panel_kernel()
    monkeypatch.setenv("LLAMA4SERVE_KERNEL_CACHE", str(tmp_path))
    source = Path(native.__file__).with_name("cpu_kernels.c")
    old, recent = tmp_path / "cpu_kernels-0123456789abcdef.so", tmp_path / "cpu_kernels-fedcba9876543210.so"
    old.write_bytes(b"a build of another source, untouched for two days")
    os.utime(old, (time.time() - 2 * 86400,) * 2)
    recent.write_bytes(b"another checkout's build, maybe about to be loaded")
    built = native._build(source)
    assert built.parent == tmp_path and native._build(source) == built  # second call reuses the file
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([built.name, recent.name])  # no temporary
    assert ctypes.CDLL(str(built)).panel_linear_f32 is not None
    monkeypatch.setenv("LLAMA4SERVE_NATIVE_KERNELS", "0")
    assert "LLAMA4SERVE_NATIVE_KERNELS=0" in native.unavailable_reason()


def test_router_top1_sigmoid():
    logits = torch.randn(6, 16)
    ids, scores = route_topk(logits, 1)
    torch.testing.assert_close(ids[:, 0], logits.argmax(-1))
    torch.testing.assert_close(scores[:, 0], torch.sigmoid(logits.max(-1).values))


def _swiglu_reference(x, gate, up, down):
    return (torch.nn.functional.silu(x @ gate) * (x @ up)) @ down


def test_grouped_swiglu_matches_per_token_loop_and_skips_idle_experts():
    e, h, i, n = 6, 8, 5, 11
    gate_up = torch.randn(e, h, 2 * i)
    down = torch.randn(e, i, h)
    x = torch.randn(n, h)
    ids = torch.tensor([4, 2, 4, 4, 5, 2, 2, 4, 5, 5, 4])  # experts 0, 1, 3 get no tokens
    gate_up[[0, 1, 3]] = float("nan")  # any work on an idle expert would poison the output
    down[[0, 1, 3]] = float("nan")
    out = grouped_swiglu(x, ids, gate_up, down)
    ref = torch.stack([_swiglu_reference(x[t], gate_up[ids[t], :, :i], gate_up[ids[t], :, i:], down[ids[t]]) for t in range(n)])
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    # A shard holding experts [4, 6) only, with global ids.
    mine = ids >= 4
    out_shard = grouped_swiglu(x[mine], ids[mine], gate_up[4:], down[4:], first_expert=4)
    torch.testing.assert_close(out_shard, ref[mine], atol=1e-4, rtol=1e-4)
    assert grouped_swiglu(x[:0], ids[:0], gate_up, down).shape == (0, h)
    # Per-expert packed weights (as LocalExperts holds them), and the single-row path.
    packed_gu, packed_dn = [pack_weight(w) for w in gate_up], [pack_weight(w) for w in down]
    torch.testing.assert_close(grouped_swiglu(x, ids, packed_gu, packed_dn), ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(grouped_swiglu(x[3:4], ids[3:4], packed_gu, packed_dn), ref[3:4], atol=1e-4, rtol=1e-4)


def test_native_swiglu_matches_reference_and_is_batch_invariant():
    _needs_panel_kernel()
    h, i = 24, 37  # 37: a masked tail in the activation and a partial panel
    gate_up, down = torch.randn(h, 2 * i), torch.randn(i, h)
    x = torch.randn(40, h) * 3  # gate values out to about +-50: both ends of the exp range
    packed_gu, packed_dn = pack_weight(gate_up), pack_weight(down)
    ref = _swiglu_reference(x, gate_up[:, :i], gate_up[:, i:], down)
    for rows in (1, 7, 40):
        torch.testing.assert_close(swiglu(x[:rows], packed_gu, packed_dn), ref[:rows], atol=1e-3, rtol=1e-4)
    assert torch.equal(swiglu(x[5:6], packed_gu, packed_dn), swiglu(x, packed_gu, packed_dn)[5:6])
    assert swiglu(x[:0], packed_gu, packed_dn).shape == (0, h)


def test_score_scales_expert_input_not_output():
    # Llama 4 applies the router score to the expert's input: expert(s * x) != s * expert(x) for SwiGLU.
    h, i = 8, 5
    gate_up, down = torch.randn(1, h, 2 * i), torch.randn(1, i, h)
    x = torch.randn(3, h)
    ids, scores = route_topk(torch.randn(3, 1), 1)
    got = grouped_swiglu(x * scores, ids[:, 0], gate_up, down)
    ref = _swiglu_reference(x * scores, gate_up[0, :, :i], gate_up[0, :, i:], down[0])
    torch.testing.assert_close(got, ref)
    assert not torch.allclose(got, scores * _swiglu_reference(x, gate_up[0, :, :i], gate_up[0, :, i:], down[0]))


def test_swiglu_fused_input_major():
    x = torch.randn(4, 8)
    g, u, dn = torch.randn(6, 8), torch.randn(6, 8), torch.randn(8, 6)  # nn.Linear layout [out, in]
    fused = torch.cat([g, u]).T.contiguous()  # [H, 2I]
    ref = torch.nn.functional.silu(x @ g.T) * (x @ u.T) @ dn.T
    torch.testing.assert_close(swiglu(x, fused, dn.T.contiguous()), ref)


def test_sampling_greedy_topk_topp_and_distribution():
    logits = torch.randn(4, 50)
    zeros = torch.zeros(4)
    greedy = sample_tokens(logits, zeros, torch.zeros(4, dtype=torch.long), torch.ones(4), torch.rand(4))
    torch.testing.assert_close(greedy, logits.argmax(-1))
    ones = torch.ones(4)
    top1 = sample_tokens(logits, ones, torch.ones(4, dtype=torch.long), torch.ones(4), torch.rand(4))
    torch.testing.assert_close(top1, logits.argmax(-1))
    tiny_p = sample_tokens(logits, ones, torch.zeros(4, dtype=torch.long), torch.full((4,), 1e-6), torch.rand(4))
    torch.testing.assert_close(tiny_p, logits.argmax(-1))
    # Inverse-CDF sampling over top-k=3 at temperature 2 matches the renormalised distribution.
    row = torch.randn(1, 10)
    u = torch.linspace(0, 1, 20001)[:-1]
    picks = sample_tokens(row.expand(len(u), -1), torch.full((len(u),), 2.0), torch.full((len(u),), 3), torch.ones(len(u)), u)
    top = (row[0] / 2).topk(3)
    expected = torch.softmax(top.values, 0)
    freq = torch.stack([(picks == t).float().mean() for t in top.indices])
    torch.testing.assert_close(freq, expected, atol=2e-3, rtol=0)
    assert set(picks.tolist()) <= set(top.indices.tolist())


def test_token_logprobs():
    logits = torch.randn(3, 20)
    ids = torch.tensor([1, 5, 19])
    lp, top_v, top_i = token_logprobs(logits, ids, 4)
    ref = torch.log_softmax(logits, -1)
    torch.testing.assert_close(lp, ref[torch.arange(3), ids])
    torch.testing.assert_close(top_v, ref.topk(4).values)
    torch.testing.assert_close(top_i, ref.topk(4).indices)

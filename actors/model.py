"""Llama 4 text model for one process: weights by checkpoint name, forward over a ragged batch with the paged
KV cache. Distribution wraps this from outside: routed experts are a callable (`RoutedExperts`), local or remote.

Shapes: T tokens of the step, B sequences, Lq padded query slots, Lc padded context slots, H hidden,
Hq/Hkv heads, D head_dim.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from ..kernels.attention import batched_attention
from ..kernels.moe import route_topk, swiglu_mlp
from ..kernels.norms import l2_norm, rms_norm
from ..kernels.rope import apply_rope
from .checkpoint import LM_HEAD, TEXT_PREFIX, CheckpointReader
from .config import ModelConfig
from .kv_cache import KVCache
from .weights import text_weight_shapes

# (layer, x [N, H] already score-scaled, expert_ids [N]) -> [N, H]
RoutedExperts = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class PoolView:
    """Where a step reads and writes one KV pool. ctx_slots/ctx_pos [B, Lc] (pos -1: padding);
    write_rows [N] token indices whose k/v are stored at write_slots [N]."""

    ctx_slots: torch.Tensor
    ctx_pos: torch.Tensor
    write_rows: torch.Tensor
    write_slots: torch.Tensor


@dataclass
class StepMeta:
    """Per-step tensors shared by all layers (built once by the model runner)."""

    positions: torch.Tensor  # [T]
    pad_index: torch.Tensor  # [B, Lq] token index, T for padding
    q_pos: torch.Tensor  # [B, Lq], -1 for padding
    unpad_index: torch.Tensor  # [T] index into the flattened [B * Lq]
    freqs_cis: torch.Tensor  # [T, D/2] complex
    temp_scales: torch.Tensor | None  # [T] NoPE query scales
    pools: dict[str, PoolView]


def _pad(x: torch.Tensor, pad_index: torch.Tensor) -> torch.Tensor:
    """[T, ...] -> [B, Lq, ...] with zero rows at padding."""
    return torch.cat([x, x.new_zeros(1, *x.shape[1:])])[pad_index]


class Llama4TextModel:
    def __init__(self, cfg: ModelConfig, reader: CheckpointReader, dtype: torch.dtype, routed: RoutedExperts):
        self.cfg = cfg
        self.dtype = dtype
        self.routed = routed
        shapes = text_weight_shapes(cfg)
        p = TEXT_PREFIX

        def get(name: str) -> torch.Tensor:
            return reader.get(p + name, dtype, shapes[p + name])

        self.embed = get("embed_tokens.weight")
        self.norm = get("norm.weight")
        self.lm_head = self.embed if cfg.tie_word_embeddings else reader.get(LM_HEAD, dtype, shapes[LM_HEAD])
        self.layers: list[dict[str, torch.Tensor]] = []
        for i in range(cfg.num_hidden_layers):
            a = f"layers.{i}.self_attn."
            w = {
                "input_norm": get(f"layers.{i}.input_layernorm.weight"),
                "post_norm": get(f"layers.{i}.post_attention_layernorm.weight"),
            }
            for n in ("q", "k", "v", "o"):
                w[n] = get(f"{a}{n}_proj.weight")
                if cfg.attention_bias:
                    w[n + "_bias"] = get(f"{a}{n}_proj.bias")
            f = f"layers.{i}.feed_forward."
            if cfg.is_moe_layer(i):
                w["router"] = get(f + "router.weight")
                for n in ("gate", "up", "down"):
                    w["shared_" + n] = get(f"{f}shared_expert.{n}_proj.weight")
            else:
                for n in ("gate", "up", "down"):
                    w["mlp_" + n] = get(f"{f}{n}_proj.weight")
            self.layers.append(w)

    def forward(self, token_ids: torch.Tensor, meta: StepMeta, kv: KVCache) -> torch.Tensor:
        """token_ids [T] -> final-normed hidden states [T, H]."""
        x = self.embed[token_ids]  # [T, H]
        for i, w in enumerate(self.layers):
            x = x + self.attention(i, w, rms_norm(x, w["input_norm"], self.cfg.rms_norm_eps), meta, kv)
            x = x + self.feed_forward(i, w, rms_norm(x, w["post_norm"], self.cfg.rms_norm_eps))
        return rms_norm(x, self.norm, self.cfg.rms_norm_eps)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.lm_head)

    def attention(self, i: int, w: dict, x: torch.Tensor, meta: StepMeta, kv: KVCache) -> torch.Tensor:
        cfg = self.cfg
        t = x.shape[0]
        q = F.linear(x, w["q"], w.get("q_bias")).view(t, cfg.num_attention_heads, cfg.head_dim)
        k = F.linear(x, w["k"], w.get("k_bias")).view(t, cfg.num_key_value_heads, cfg.head_dim)
        v = F.linear(x, w["v"], w.get("v_bias")).view(t, cfg.num_key_value_heads, cfg.head_dim)
        if cfg.use_rope[i]:
            q, k = apply_rope(q, meta.freqs_cis), apply_rope(k, meta.freqs_cis)
            if cfg.use_qk_norm:  # after RoPE, RoPE layers only (Llama4TextAttention.qk_norm)
                q, k = l2_norm(q, cfg.rms_norm_eps), l2_norm(k, cfg.rms_norm_eps)
        elif meta.temp_scales is not None:
            q = (q * meta.temp_scales[:, None, None]).to(q.dtype)

        view = meta.pools[kv.pool_of(i)]
        ctx_k, ctx_v = kv.read(i, view.ctx_slots)  # [B, Lc, Hkv, D]
        keys = torch.cat([ctx_k, _pad(k, meta.pad_index)], dim=1)
        values = torch.cat([ctx_v, _pad(v, meta.pad_index)], dim=1)
        key_pos = torch.cat([view.ctx_pos, meta.q_pos], dim=1)
        if view.write_rows.numel():
            kv.write(i, view.write_slots, k[view.write_rows], v[view.write_rows])
        chunk = cfg.attention_chunk_size if cfg.is_chunked[i] else None
        out = batched_attention(
            _pad(q, meta.pad_index), keys, values, meta.q_pos, key_pos, chunk, cfg.head_dim**-0.5
        )  # [B, Lq, Hq, D]
        out = out.reshape(-1, cfg.num_attention_heads * cfg.head_dim)[meta.unpad_index]  # [T, Hq*D]
        return F.linear(out, w["o"], w.get("o_bias"))

    def feed_forward(self, i: int, w: dict, x: torch.Tensor) -> torch.Tensor:
        if "router" not in w:
            return swiglu_mlp(x, w["mlp_gate"], w["mlp_up"], w["mlp_down"])
        expert_ids, scores = route_topk(F.linear(x, w["router"]), self.cfg.num_experts_per_tok)  # [T, k]
        top_k = expert_ids.shape[1]
        routed_in = (x[:, None, :] * scores[:, :, None]).reshape(-1, x.shape[1])  # [T*k, H]
        routed = self.routed(i, routed_in, expert_ids.reshape(-1)).view(x.shape[0], top_k, -1).sum(dim=1)
        return swiglu_mlp(x, w["shared_gate"], w["shared_up"], w["shared_down"]) + routed

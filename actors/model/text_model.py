"""Llama 4 text model for one process: weights by checkpoint name, forward over a ragged batch with the paged
KV cache. Distribution wraps this from outside: routed experts are a callable (`RoutedExperts`), local or remote.

Shapes: T tokens of the step, B sequences, Lq padded query slots, Lc padded context slots, H hidden,
Hq/Hkv heads, D head_dim.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from llama4serve.kernels.attention import batched_attention
from llama4serve.kernels.flex_attention import BlockMask, PagedPlan, flex_attention_padded, paged_flex_attention
from llama4serve.kernels.linear import linear, pack_weight
from llama4serve.kernels.moe import route_topk, swiglu
from llama4serve.kernels.norms import l2_norm, rms_norm
from llama4serve.kernels.rope import apply_rope
from llama4serve.actors.model.checkpoint import LM_HEAD, TEXT_PREFIX, CheckpointReader
from llama4serve.actors.model.config import ModelConfig
from llama4serve.actors.model.quantized import load_quant_format, read_linear
from llama4serve.actors.runner.kv_cache import KVCache
from llama4serve.actors.model.weights import text_weight_shapes

class RoutedExperts(Protocol):
    """Routed experts, local (`LocalExperts`) or on expert actors (`Router`). `start` sends the score-scaled
    rows x [N, H] with their expert_ids [N] on their way; the returned `finish()` gives the outputs [N, H].
    `capacity` bounds the rows any rank sends in this step (remote experts size their buffers by it)."""

    def start(
        self, layer: int, x: torch.Tensor, expert_ids: torch.Tensor, capacity: int
    ) -> Callable[[], torch.Tensor]: ...


@dataclass
class PoolView:
    """Where a step reads and writes one KV pool. ctx_slots [B, Lc] context slots to read; mask [B, Lq, Lc + Lq]
    (additive) over (context, then the step's own tokens); write_rows [N] token indices whose k/v go to
    write_slots [N]. When every token is written (write_rows None), key_slots [B, Lc + Lq] are the slots of
    (context, then the step's own tokens): the layer writes first and reads all its keys in one gather.
    Portable path (flex_attention): `plan` when every token is written (the layer writes, then reads the pool
    through the plan; ctx_slots and mask unused), else `block_mask` over (context, then own tokens) in place
    of `mask`."""

    ctx_slots: torch.Tensor | None
    mask: torch.Tensor | None
    write_rows: torch.Tensor | None
    write_slots: torch.Tensor
    key_slots: torch.Tensor | None = None
    plan: PagedPlan | None = None
    block_mask: BlockMask | None = None


@dataclass
class StepMeta:
    """Per-step tensors shared by all layers (built once by the model runner)."""

    positions: torch.Tensor  # [T]
    pad_index: torch.Tensor | None  # [B, Lq] token index, T for padding; None when the batch is rectangular
    unpad_index: torch.Tensor | None  # [T] index into the flattened [B * Lq]; None when rectangular
    batch_shape: tuple[int, int]  # (B, Lq)
    freqs_cis: torch.Tensor  # [T, D/2] complex
    temp_scales: torch.Tensor | None  # [T] NoPE query scales
    pools: dict[str, PoolView]
    moe_capacity: int = 0
    flex_compiled: bool = False  # portable path: torch.compile'd flex_attention (CUDA), else eager (CPU)


def _pad(x: torch.Tensor, meta: StepMeta) -> torch.Tensor:
    """[T, ...] -> [B, Lq, ...] with zero rows at padding."""
    if meta.pad_index is None:
        return x.view(*meta.batch_shape, *x.shape[1:])
    return torch.cat([x, x.new_zeros(1, *x.shape[1:])])[meta.pad_index]


class Llama4TextModel:
    def __init__(self, cfg: ModelConfig, reader: CheckpointReader, dtype: torch.dtype, routed: RoutedExperts,
                 device: torch.device | str = "cpu"):
        self.cfg = cfg
        self.device = torch.device(device)
        self.dtype = dtype
        self.routed = routed
        shapes = text_weight_shapes(cfg)
        p = TEXT_PREFIX

        def get(name: str) -> torch.Tensor:
            return reader.get(p + name, dtype, shapes[p + name]).to(device)  # one tensor at a time

        quant = load_quant_format(reader.model_dir)  # None for a float checkpoint

        def lin(*modules: str):  # linears [out, in] fused along outputs -> packed [in, sum(out)], kept quantized
            names = [p + m for m in modules]
            return read_linear(reader, quant, names, [shapes[n + ".weight"] for n in names], dtype, device)

        self.embed = get("embed_tokens.weight")  # [V, H], rows looked up
        self.norm = get("norm.weight")
        lm_head = self.embed if cfg.tie_word_embeddings else reader.get(LM_HEAD, dtype, shapes[LM_HEAD]).to(device)
        self.lm_head_t = pack_weight(lm_head.t())  # [H, V]
        self.layers: list[dict[str, torch.Tensor]] = []
        for i in range(cfg.num_hidden_layers):
            a = f"layers.{i}.self_attn."
            f = f"layers.{i}.feed_forward."
            # Linear weights are input-major ([in, out]) with q/k/v and gate/up fused, packed for `linear`.
            w = {
                "input_norm": get(f"layers.{i}.input_layernorm.weight"),
                "post_norm": get(f"layers.{i}.post_attention_layernorm.weight"),
                "qkv": lin(*[f"{a}{n}_proj" for n in "qkv"]),  # [H, (Hq+2Hkv)D]
                "o": lin(a + "o_proj"),  # [Hq*D, H]
            }
            if cfg.attention_bias:
                w["qkv_bias"] = torch.cat([get(f"{a}{n}_proj.bias") for n in "qkv"])
                w["o_bias"] = get(a + "o_proj.bias")
            mlp = f + "shared_expert." if cfg.is_moe_layer(i) else f
            if cfg.is_moe_layer(i):
                w["router"] = pack_weight(get(f + "router.weight").t())  # [H, E]
            w["mlp_gate_up"] = lin(mlp + "gate_proj", mlp + "up_proj")  # [H, 2I]
            w["mlp_down"] = lin(mlp + "down_proj")  # [I, H]
            self.layers.append(w)

    def forward(self, token_ids: torch.Tensor, meta: StepMeta, kv: KVCache,
                image_embeds: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """token_ids [T] -> final-normed hidden states [T, H]. image_embeds: (rows [R], features [R, H]) that
        replace the embeddings of those <|patch|> rows (Llama4ForConditionalGeneration's masked_scatter)."""
        x = self.embed[token_ids]  # [T, H]
        if image_embeds is not None:
            x[image_embeds[0]] = image_embeds[1].to(x.device, x.dtype)
        for i, w in enumerate(self.layers):
            x += self.attention(i, w, rms_norm(x, w["input_norm"], self.cfg.rms_norm_eps), meta, kv)
            x += self.feed_forward(i, w, rms_norm(x, w["post_norm"], self.cfg.rms_norm_eps), meta.moe_capacity)
        return rms_norm(x, self.norm, self.cfg.rms_norm_eps)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return linear(hidden, self.lm_head_t)

    def attention(self, i: int, w: dict, x: torch.Tensor, meta: StepMeta, kv: KVCache) -> torch.Tensor:
        cfg = self.cfg
        t, d = x.shape[0], cfg.head_dim
        qkv = linear(x, w["qkv"], w.get("qkv_bias"))
        hq, hkv = cfg.num_attention_heads, cfg.num_key_value_heads
        qk = qkv[:, : (hq + hkv) * d].view(t, hq + hkv, d)  # q and k heads side by side: rotated/normed at once
        v = qkv[:, (hq + hkv) * d :].view(t, hkv, d)
        if cfg.use_rope[i]:
            qk = apply_rope(qk, meta.freqs_cis)
            if cfg.use_qk_norm:  # after RoPE, RoPE layers only (Llama4TextAttention.qk_norm)
                qk = l2_norm(qk, cfg.rms_norm_eps)
        q, k = qk[:, :hq], qk[:, hq:]  # [T, Hq, D], [T, Hkv, D]
        if not cfg.use_rope[i] and meta.temp_scales is not None:
            q = (q * meta.temp_scales[:, None, None]).to(q.dtype)

        view = meta.pools[kv.pool_of(i)]
        if view.plan is not None:  # portable path, every key in the pool once this step's are written
            kv.write(i, view.write_slots, k, v)
            out = paged_flex_attention(q, kv.layer_k[i], kv.layer_v[i], view.plan, d**-0.5, meta.flex_compiled)
            return linear(out.reshape(t, hq * d), w["o"], w.get("o_bias"))  # [T, H]
        if view.key_slots is not None:
            kv.write(i, view.write_slots, k, v)
            keys, values = kv.read(i, view.key_slots)  # [B, Lc + Lq, Hkv, D]
        else:
            ctx_k, ctx_v = kv.read(i, view.ctx_slots)  # [B, Lc, Hkv, D]
            keys = torch.cat([ctx_k, _pad(k, meta)], dim=1)
            values = torch.cat([ctx_v, _pad(v, meta)], dim=1)
            if view.write_rows.numel():
                kv.write(i, view.write_slots, k[view.write_rows], v[view.write_rows])
        if view.block_mask is not None:  # portable path across a chunk boundary: own keys after the context
            out = flex_attention_padded(_pad(q, meta), keys, values, view.block_mask, d**-0.5, meta.flex_compiled)
        else:
            out = batched_attention(_pad(q, meta), keys, values, view.mask, d**-0.5)  # [B, Lq, Hq, D]
        out = out.reshape(-1, cfg.num_attention_heads * d)  # [B*Lq, Hq*D]
        if meta.unpad_index is not None:
            out = out[meta.unpad_index]  # [T, Hq*D]
        return linear(out, w["o"], w.get("o_bias"))

    def feed_forward(self, i: int, w: dict, x: torch.Tensor, moe_capacity: int) -> torch.Tensor:
        if "router" not in w:
            return swiglu(x, w["mlp_gate_up"], w["mlp_down"])
        expert_ids, scores = route_topk(linear(x, w["router"]), self.cfg.num_experts_per_tok)  # [T, k]
        top_k = expert_ids.shape[1]
        if top_k == 1:
            routed_in = x * scores  # [T, H]
        else:
            routed_in = (x[:, None, :] * scores[:, :, None]).reshape(-1, x.shape[1])  # [T*k, H]
        finish = self.routed.start(i, routed_in, expert_ids.reshape(-1), moe_capacity)
        shared = swiglu(x, w["mlp_gate_up"], w["mlp_down"])  # computed while routed rows are away
        routed = finish()  # [T*k, H]
        return shared + (routed if top_k == 1 else routed.view(x.shape[0], top_k, -1).sum(dim=1))

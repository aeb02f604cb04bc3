"""Decode steps through one native call per layer (`decode_layer_f32` in kernels/cpu_kernels.c).

A decode step reads every weight once, but on the torch path it also runs some forty small ops per layer
(norms, rotation, padding, cache gathers, masks, softmax, routing, expert grouping), each costing more to
dispatch than to compute at decode sizes. This path runs a whole layer for all the step's sequences in one call
and one parallel region. It is taken only where it computes what `Llama4TextModel.forward` computes (tests
compare the two): float32 weights in the native panel layout, top-1 routing, and a step in which every sequence
decodes one token, without image rows. With every routed expert in this process a MoE layer is one call too;
with the experts on expert actors the call stops after the router and the shared expert (split at the router):
the score-scaled rows go out through the routed experts' `start` (the router's exchange) and their results are
added when they are back.
"""

from __future__ import annotations

import ctypes
from functools import partial
from typing import Callable

import torch

from llama4serve.kernels import native
from llama4serve.kernels.linear import PanelWeight
from llama4serve.kernels.norms import rms_norm
from llama4serve.kernels.rope import rope_freqs_cis, temperature_scales
from llama4serve.actors.step_io import SeqStep, StepBatch
from llama4serve.actors.model.config import ModelConfig
from llama4serve.actors.runner.kv_cache import KVCache, slots_of

_i64, _f32, _ptr = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p


class _Dims(ctypes.Structure):
    _fields_ = [("hidden", _i64), ("q_heads", _i64), ("kv_heads", _i64), ("head_dim", _i64), ("eps", _f32),
                ("scale", _f32)]


class _Layer(ctypes.Structure):  # DecodeLayer in cpu_kernels.c, field for field
    _fields_ = [
        ("input_norm", _ptr), ("post_norm", _ptr), ("qkv", _ptr), ("qkv_bias", _ptr), ("o", _ptr),
        ("o_bias", _ptr), ("router", _ptr), ("mlp_gate_up", _ptr), ("mlp_down", _ptr), ("expert_gate_up", _ptr),
        ("expert_down", _ptr), ("mlp_inter", _i64), ("expert_inter", _i64), ("num_experts", _i64),
        ("k_cache", _ptr), ("v_cache", _ptr), ("ctx_slots", _ptr), ("ctx_offsets", _ptr), ("write_slots", _ptr),
        ("rope", _ptr), ("q_scales", _ptr), ("qk_norm", ctypes.c_int32), ("routed_rows", _ptr),
        ("shared_rows", _ptr),
    ]


def _add_experts(x: torch.Tensor, shared: torch.Tensor, finish: Callable[[], torch.Tensor]) -> None:
    """x += shared + the routed experts' rows, once they are back: the split layer's last part."""
    x += shared.add_(finish())


def _ptr_of(t: torch.Tensor | PanelWeight | None) -> int | None:
    if t is None:
        return None
    return t.ptr if isinstance(t, PanelWeight) else t.data_ptr()


class FusedDecode:
    @classmethod
    def create(cls, cfg: ModelConfig, model, kv: KVCache, experts, inv_freq: torch.Tensor) -> FusedDecode | None:
        """The fused path for this model, or None where it does not apply. experts: the `LocalExperts` holding
        every routed expert, or None (experts on expert actors: MoE layers split at the router)."""
        lib = native.cpu_kernels()
        matrices = [w[name] for w in model.layers for name in ("qkv", "o", "router", "mlp_gate_up", "mlp_down")
                    if name in w]
        if cfg.moe_layers:
            if cfg.num_experts_per_tok != 1 or experts is not None and experts.num_local_experts != cfg.num_experts:
                return None
            if experts is not None:
                matrices += [w for ws in (*experts.packed_gate_up.values(), *experts.packed_down.values())
                             for w in ws]
        if lib is None or model.dtype != torch.float32 or not all(isinstance(w, PanelWeight) for w in matrices):
            return None
        return cls(cfg, model, kv, experts, inv_freq, lib)

    def __init__(self, cfg: ModelConfig, model, kv: KVCache, experts, inv_freq: torch.Tensor, lib):
        self.cfg, self.model, self.kv, self.inv_freq, self.lib = cfg, model, kv, inv_freq, lib
        self.dims = _Dims(cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
                          cfg.rms_norm_eps, cfg.head_dim**-0.5)
        self.keep: list = []  # the pointer arrays the layer structs point into
        self.layers: list[_Layer] = []
        for i, w in enumerate(model.layers):
            layer = _Layer(
                input_norm=_ptr_of(w["input_norm"]), post_norm=_ptr_of(w["post_norm"]), qkv=_ptr_of(w["qkv"]),
                qkv_bias=_ptr_of(w.get("qkv_bias")), o=_ptr_of(w["o"]), o_bias=_ptr_of(w.get("o_bias")),
                router=_ptr_of(w.get("router")), mlp_gate_up=_ptr_of(w["mlp_gate_up"]),
                mlp_down=_ptr_of(w["mlp_down"]), mlp_inter=w["mlp_down"].shape[0],
                k_cache=kv.layer_k[i].data_ptr(), v_cache=kv.layer_v[i].data_ptr(),
                qk_norm=int(cfg.use_rope[i] and cfg.use_qk_norm),
            )
            if "router" in w:
                layer.num_experts = cfg.num_experts
            if "router" in w and experts is not None:
                gate_up = (_ptr * cfg.num_experts)(*[p.ptr for p in experts.packed_gate_up[i]])
                down = (_ptr * cfg.num_experts)(*[p.ptr for p in experts.packed_down[i]])
                self.keep += [gate_up, down]
                layer.expert_gate_up, layer.expert_down = ctypes.addressof(gate_up), ctypes.addressof(down)
                layer.expert_inter = cfg.intermediate_size
            self.layers.append(layer)
        self.split = bool(cfg.moe_layers) and experts is None
        self.max_inter = max(max(layer.mlp_inter, layer.expert_inter) for layer in self.layers)
        self.moe_layers = [i for i, layer in enumerate(self.layers) if layer.router]

    @staticmethod
    def applies(batch: StepBatch, image_rows) -> bool:
        return image_rows is None and all(len(s.token_ids) == 1 for s in batch.seqs)

    def _pool_slots(self, seqs: list[SeqStep]) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Per pool: (every row's context slots, row offsets into them [B + 1], the slot each token's k/v go to or
        -1 [B]), read and written as on the torch path."""
        bs, chunk = self.kv.block_size, self.cfg.attention_chunk_size
        out = {}
        for pool, layers in (("full", self.cfg.full_layers), ("chunk", self.cfg.chunked_layers)):
            if not layers:
                continue
            ctx, offsets, writes = [], [0], []
            for s in seqs:
                pos = s.start_pos
                if pool == "full":
                    ctx += slots_of(s.full_blocks, range(pos), 0, bs)
                    writes.append(slots_of(s.full_blocks, range(pos, pos + 1), 0, bs)[0])
                else:  # the current chunk; the token is kept only if the next position is in its chunk
                    base, write_base = pos // chunk * chunk, (pos + 1) // chunk * chunk
                    ctx += slots_of(s.chunk_read_blocks, range(base, pos), base, bs)
                    writes.append(slots_of(s.chunk_write_blocks, range(pos, pos + 1), write_base, bs)[0]
                                  if write_base <= pos else -1)
                offsets.append(len(ctx))
            out[pool] = tuple(torch.tensor(x, dtype=torch.long) for x in (ctx, offsets, writes))
        return out

    @torch.inference_mode()
    def forward(self, seqs: list[SeqStep], routed, capacity: int | None = None) -> torch.Tensor:
        """The final-normed hidden states [B, H] of the sequences' tokens. routed: the model's routed experts
        (an `ExpertLoad`, which counts the rows each expert gets, or plain `LocalExperts`; a `micro_batches` of 2
        makes the split path ping-pong); capacity: the step's MoE capacity (split at the router; default: the rows
        of this step)."""
        cfg, model, n, h = self.cfg, self.model, len(seqs), self.cfg.hidden_size
        positions = torch.tensor([s.start_pos for s in seqs])
        rope = torch.view_as_real(rope_freqs_cis(positions, self.inv_freq)).contiguous()  # [B, D/2, 2]
        q_scales = None
        if cfg.attn_temperature_tuning:
            q_scales = temperature_scales(positions, cfg.floor_scale, cfg.attn_scale).contiguous()
        pools = self._pool_slots(seqs)
        longest = max(int((offsets[1:] - offsets[:-1]).max()) for _, offsets, _ in pools.values())
        scratch = torch.empty(self.lib.decode_scratch_floats(ctypes.addressof(self.dims), n, cfg.num_experts,
                                                             self.max_inter, longest))
        routed_rows, shared_rows = (torch.empty(n, h), torch.empty(n, h)) if self.split else (None, None)
        ints = torch.empty(n + cfg.num_experts + 1, dtype=torch.long)
        chosen = torch.empty(len(self.layers), n, dtype=torch.long)
        x = model.embed[torch.tensor([s.token_ids[0] for s in seqs])].contiguous()  # [B, H], a copy
        # Ping-pong (split at the router, `routed.micro_batches` 2): rows [0, n/2) and [n/2, n) take turns, so one
        # half's attention computes while the other half's rows are at the experts. Each row is computed the same
        # way whatever the other rows are: the outputs are those of one batch.
        halves = [(0, n // 2), (n // 2, n)] if self.split and getattr(routed, "micro_batches", 1) == 2 else [(0, n)]
        pending: dict[int, Callable[[], None]] = {}  # by half: adds its last MoE layer's experts to x
        f32, i64 = 4, 8  # bytes: the per-row arrays are offset to a half's first row
        for i, layer in enumerate(self.layers):
            ctx, offsets, writes = pools[self.kv.pool_of(i)]
            split = self.split and bool(layer.router)
            for lane, (r0, r1) in enumerate(halves):
                if lane in pending:
                    pending.pop(lane)()
                layer.ctx_slots, layer.ctx_offsets = ctx.data_ptr(), offsets.data_ptr() + r0 * i64
                layer.write_slots = writes.data_ptr() + r0 * i64
                layer.rope = rope.data_ptr() + r0 * cfg.head_dim * f32 if cfg.use_rope[i] else None
                layer.q_scales = (q_scales.data_ptr() + r0 * f32 if q_scales is not None and not cfg.use_rope[i]
                                  else None)
                layer.routed_rows = routed_rows.data_ptr() + r0 * h * f32 if split else None
                layer.shared_rows = shared_rows.data_ptr() + r0 * h * f32 if split else None
                if r1 > r0:
                    self.lib.decode_layer_f32(ctypes.addressof(layer), ctypes.addressof(self.dims), r1 - r0,
                                              x.data_ptr() + r0 * h * f32, scratch.data_ptr(), ints.data_ptr(),
                                              chosen[i].data_ptr() + r0 * i64)
                if split:  # x += shared + routed experts(routed_rows), as the unsplit layer adds them
                    finish = routed.start(i, routed_rows[r0:r1], chosen[i][r0:r1], n if capacity is None else capacity,
                                          lane if len(halves) > 1 else None)
                    pending[lane] = partial(_add_experts, x[r0:r1], shared_rows[r0:r1], finish)
        for lane in sorted(pending):
            pending[lane]()
        if self.moe_layers and not self.split:
            routed.count([i for i in self.moe_layers for _ in range(n)], chosen[self.moe_layers].reshape(-1))
        return rms_norm(x, model.norm, cfg.rms_norm_eps)

"""Turns a StepBatch into tensors, runs the model once, and samples: one step of one attention actor.

Every per-step tensor is built on the KV cache's device from small host lists (one copy each, before the layer
loop); only the sampled ids and logprobs come back. On the portable path (`portable_path`: any GPU, or CPU with
the native kernels off) attention is flex_attention: one `plan_paged` per pool and step when every key of the
step is in that pool, with the sequence count, query length and block-table width bucketed to powers of two
(few shapes for compiled kernels); a prefill chunk that crosses an attention-chunk boundary reads the chunk
pool's context and its own keys through `flex_block_mask` instead.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from llama4serve.kernels.attention import additive_mask, attention_mask
from llama4serve.kernels.flex_attention import flex_block_mask, plan_paged
from llama4serve.kernels.rope import rope_freqs_cis, rope_inv_freq, temperature_scales
from llama4serve.kernels.sampling import apply_penalties, sample_tokens, token_logprobs
from llama4serve.actors.step_io import SeqOutput, SeqStep, StepBatch
from llama4serve.actors.model.config import ModelConfig
from llama4serve.actors.model.experts import portable_path
from llama4serve.actors.runner.fused_decode import FusedDecode
from llama4serve.actors.runner.grammar import RowGrammars
from llama4serve.actors.runner.kv_cache import KVCache, slots_of
from llama4serve.actors.model.text_model import Llama4TextModel, PoolView, StepMeta

_SEED_STRIDE = 1_000_003


class ModelRunner:
    def __init__(self, cfg: ModelConfig, model: Llama4TextModel, kv: KVCache, images=None, local_experts=None):
        """images: an `ImageFeatureCache` when the checkpoint takes images. local_experts: the `LocalExperts`
        when every routed expert is in this process, None when they are on expert actors (the fused decode path
        then splits its MoE layers at the router)."""
        self.cfg = cfg
        self.model = model
        self.kv = kv
        self.images = images
        self.device = kv.k["full"].device
        self.portable = portable_path(self.device)
        self.flex_compiled = self.device.type == "cuda"  # eager flex on CPU: tiny checkpoints, no compile per shape
        r = cfg.rope
        self.inv_freq = rope_inv_freq(
            cfg.head_dim, r.theta, r.rope_type, r.factor, r.low_freq_factor, r.high_freq_factor,
            r.original_max_position_embeddings,
        )
        self.fused = None if self.portable else FusedDecode.create(cfg, model, kv, local_experts, self.inv_freq)
        self.inv_freq = self.inv_freq.to(self.device)
        self.graphs = None  # a `DecodeGraphs`, set by the actor on CUDA
        self.grammars = RowGrammars()  # constrained sequences' matchers (structured outputs)

    def chunk_start(self, pos: int) -> int:
        c = self.cfg.attention_chunk_size
        return pos if c is None else pos // c * c

    def _paged_view(self, seqs: list[SeqStep], pool: str) -> PoolView | None:
        """The portable path's view of a pool whose blocks hold every key of the step (this step's written
        first), or None when a sequence's step starts before its chunk pool's current chunk."""
        bs, dev = self.kv.block_size, self.device
        tables, kv_start, kv_len, write_slots, row_seq, row_pos = [], [], [], [], [], []
        for b, s in enumerate(seqs):
            base, blocks = (0, s.full_blocks) if pool == "full" else (self.chunk_start(s.end_pos), s.chunk_write_blocks)
            if base > s.start_pos:
                return None
            tables.append(blocks)
            kv_start.append(base)
            kv_len.append(s.end_pos - base)
            write_slots.extend(slots_of(blocks, range(s.start_pos, s.end_pos), base, bs))
            row_seq.extend([b] * len(s.token_ids))
            row_pos.extend(range(s.start_pos, s.end_pos))
        num_pad = _bucket(len(seqs)) - len(seqs)  # padding sequences: no rows, no keys (B bucketed too)
        tables, kv_start, kv_len = tables + [[]] * num_pad, kv_start + [0] * num_pad, kv_len + [0] * num_pad
        nb = _bucket(max(-(-n // bs) for n in kv_len))
        lq = _bucket(max(len(s.token_ids) for s in seqs))
        table = [t[:nb] + [0] * (nb - len(t[:nb])) for t in tables]  # [B, NB]; padding: block 0, masked off
        chunk = self.cfg.attention_chunk_size if pool == "chunk" else None
        plan = plan_paged(*(torch.tensor(x, dtype=torch.long, device=dev) for x in (table, kv_start, kv_len, row_seq,
                                                                                   row_pos)), bs, lq, chunk)
        write = torch.tensor(write_slots, dtype=torch.long, device=dev)
        return PoolView(ctx_slots=None, mask=None, write_rows=None, write_slots=write, plan=plan)

    def _pool_view(self, seqs: list[SeqStep], pool: str, q_pos: torch.Tensor) -> PoolView:
        if self.portable:
            view = self._paged_view(seqs, pool)
            if view is not None:
                return view
        bs, dev = self.kv.block_size, self.device
        ctx_slots, ctx_pos, own_slots, write_rows = [], [], [], []
        row = 0
        for s in seqs:
            if pool == "full":  # every position [0, end)
                read_base, read_blocks, write_base, write_blocks = 0, s.full_blocks, 0, s.full_blocks
            else:  # the current chunk; only the last chunk's tokens outlive this step
                read_base, read_blocks = self.chunk_start(s.start_pos), s.chunk_read_blocks
                write_base, write_blocks = self.chunk_start(s.end_pos), s.chunk_write_blocks
            ctx = range(read_base, s.start_pos)
            write_from = max(s.start_pos, write_base)
            ctx_slots.append(slots_of(read_blocks, ctx, read_base, bs))
            ctx_pos.append(list(ctx))
            own_slots.append(slots_of(write_blocks, range(write_from, s.end_pos), write_base, bs))
            write_rows.extend(range(row + write_from - s.start_pos, row + len(s.token_ids)))
            row += len(s.token_ids)
        width, lq = max(len(x) for x in ctx_slots), q_pos.shape[1]
        ctx_pos_t = torch.tensor([x + [-1] * (width - len(x)) for x in ctx_pos], dtype=torch.long)
        chunk = self.cfg.attention_chunk_size if pool == "chunk" else None
        every_row = len(write_rows) == row  # then own_slots hold one slot per token of the step
        key_slots = None
        if every_row:  # (context, padding, own tokens, padding) per sequence, as the mask's columns
            key_slots = [c + [0] * (width - len(c)) + w + [0] * (lq - len(w)) for c, w in zip(ctx_slots, own_slots)]
        k_pos = torch.cat([ctx_pos_t, q_pos], dim=1)
        return PoolView(
            ctx_slots=torch.tensor([x + [0] * (width - len(x)) for x in ctx_slots], dtype=torch.long, device=dev),
            mask=None if self.portable else additive_mask(attention_mask(q_pos, k_pos, chunk), self.kv.dtype),
            write_rows=None if every_row else torch.tensor(write_rows, dtype=torch.long, device=dev),
            write_slots=torch.tensor([x for w in own_slots for x in w], dtype=torch.long, device=dev),
            key_slots=None if key_slots is None else torch.tensor(key_slots, dtype=torch.long, device=dev),
            block_mask=flex_block_mask(q_pos.to(dev), k_pos.to(dev), chunk) if self.portable else None,
        )

    def build_meta(self, batch: StepBatch) -> tuple[torch.Tensor, StepMeta]:
        seqs, dev = batch.seqs, self.device
        token_ids = torch.tensor([t for s in seqs for t in s.token_ids], dtype=torch.long, device=dev)
        positions = torch.tensor([p for s in seqs for p in range(s.start_pos, s.end_pos)], dtype=torch.long, device=dev)
        num_tokens = token_ids.shape[0]
        lq = max(len(s.token_ids) for s in seqs)
        rectangular = all(len(s.token_ids) == lq for s in seqs)
        pad_index, q_pos, unpad_index = [], [], []
        row = 0
        for b, s in enumerate(seqs):
            n = len(s.token_ids)
            pad_index.append(list(range(row, row + n)) + [num_tokens] * (lq - n))
            q_pos.append(list(range(s.start_pos, s.end_pos)) + [-1] * (lq - n))
            unpad_index.extend(range(b * lq, b * lq + n))
            row += n
        cfg = self.cfg
        q_pos_t = torch.tensor(q_pos, dtype=torch.long)
        meta = StepMeta(
            positions=positions,
            pad_index=None if rectangular else torch.tensor(pad_index, dtype=torch.long, device=dev),
            unpad_index=None if rectangular else torch.tensor(unpad_index, dtype=torch.long, device=dev),
            batch_shape=(len(seqs), lq),
            freqs_cis=rope_freqs_cis(positions, self.inv_freq),
            temp_scales=temperature_scales(positions, cfg.floor_scale, cfg.attn_scale)
            if cfg.attn_temperature_tuning
            else None,
            moe_capacity=batch.moe_capacity,
            flex_compiled=self.flex_compiled,
            pools={
                pool: self._pool_view(seqs, pool, q_pos_t)
                for pool, layers in (("full", cfg.full_layers), ("chunk", cfg.chunked_layers))
                if layers
            },
        )
        return token_ids, meta

    def hidden_states(self, batch: StepBatch, image_embeds=None) -> torch.Tensor:
        """The step's final-normed hidden states [T, H] on the device (KV cache written); no host sync.
        image_embeds: the step's image rows (`ImageFeatureCache.for_step`)."""
        if self.fused is not None and self.fused.applies(batch, image_embeds):
            return self.fused.forward(batch.seqs, self.model.routed, batch.moe_capacity)  # [B, H]
        token_ids, meta = self.build_meta(batch)
        return self.model.forward(token_ids, meta, self.kv, image_embeds)  # [T, H]

    @torch.inference_mode()
    def step(self, batch: StepBatch) -> list[SeqOutput]:
        image_embeds = self.images.for_step(batch) if self.images is not None else None
        self.grammars.begin_step(batch)
        outputs = [SeqOutput(seq_id=s.seq_id) for s in batch.seqs]
        if self.graphs is not None and self.graphs.applies(batch, image_embeds):
            self._sample(batch.seqs, self.graphs.logits(batch).float(), outputs)  # a decode step's CUDA graph
            return outputs
        hidden = self.hidden_states(batch, image_embeds)
        starts = [0]
        for s in batch.seqs:
            starts.append(starts[-1] + len(s.token_ids))  # first row of each sequence; starts[-1] = T

        # Prompt logprobs: rows whose next token is known (the first len(logprob_targets) rows of a sequence).
        rows = [r for b, s in enumerate(batch.seqs) for r in range(starts[b], starts[b] + len(s.logprob_targets))]
        if rows:
            targets = torch.tensor([t for s in batch.seqs for t in s.logprob_targets], device=hidden.device)
            num_top = max(s.num_prompt_top for s in batch.seqs if s.logprob_targets)
            scored = token_logprobs(self.model.logits(hidden[rows]), targets, num_top)  # [R], [R, n], [R, n]
            _split_prompt_logprobs(batch.seqs, outputs, *scored)

        # Sampling: from the last row of every sequence that samples this step.
        sampling = [b for b, s in enumerate(batch.seqs) if s.sampling is not None]
        if sampling:
            logits = self.model.logits(hidden[[starts[b + 1] - 1 for b in sampling]]).float()  # [N, V]
            self._sample([batch.seqs[b] for b in sampling], logits, [outputs[b] for b in sampling])
        return outputs

    def multi_step(self, batch: StepBatch) -> list[list[SeqOutput]]:
        """batch.num_steps decode steps, each sequence's sampled token fed back as the next step's input (its
        block tables already cover them): one list of outputs per step."""
        steps = [self.step(batch)]
        seqs = batch.seqs
        for _ in range(batch.num_steps - 1):
            seqs = [
                replace(s, token_ids=[out.token_id], start_pos=s.end_pos, num_generated=s.num_generated + 1,
                        chunk_read_blocks=s.chunk_write_blocks, grammar=None)  # the steps stay inside one chunk
                for s, out in zip(seqs, steps[-1])
            ]
            steps.append(self.step(StepBatch(seqs, batch.moe_capacity)))
        return steps

    def _sample(self, seqs: list[SeqStep], logits: torch.Tensor, outputs: list[SeqOutput]) -> None:
        specs, dev = [s.sampling for s in seqs], logits.device
        # One generator per row, seeded by (request seed, tokens generated so far): the draw depends on nothing
        # else in the batch, and a preempted request redraws the same token.
        uniform = torch.tensor([
            float(torch.rand((), generator=torch.Generator().manual_seed((sp.seed * _SEED_STRIDE + s.num_generated) % 2**63)))
            if sp.temperature > 0 else 0.0  # greedy rows draw nothing
            for s, sp in zip(seqs, specs)
        ], device=dev)
        penalized = _penalized(seqs, logits) if any(s.penalty_output_ids or s.penalty_prompt_ids for s in seqs) else logits
        chosen = sample_tokens(
            self.grammars.mask(seqs, penalized),  # constrained rows only, just before sampling
            torch.tensor([sp.temperature for sp in specs], device=dev),
            torch.tensor([sp.top_k for sp in specs], device=dev),
            torch.tensor([sp.top_p for sp in specs], device=dev),
            uniform,
        )
        # Logprobs describe the raw model distribution, before penalties, temperature and filtering.
        num_top = max((sp.logprobs for sp in specs if sp.logprobs is not None), default=None)
        if num_top is not None:
            lp, top_v, top_i = token_logprobs(logits, chosen, num_top)
            lp = lp.tolist()
            if num_top > 0:
                top_v, top_i = top_v.cpu(), top_i.cpu()
        chosen = chosen.tolist()  # the step's one copy back to the host (with the logprobs)
        self.grammars.accept(seqs, chosen, outputs)
        for j, (sp, out) in enumerate(zip(specs, outputs)):
            out.token_id = int(chosen[j])
            if sp.logprobs is not None:
                out.logprob = float(lp[j])
                if sp.logprobs > 0:
                    out.top_logprobs = list(zip(top_i[j, : sp.logprobs].tolist(), top_v[j, : sp.logprobs].tolist()))


def _split_prompt_logprobs(seqs: list[SeqStep], outputs: list[SeqOutput], lp: torch.Tensor,
                           top_values: torch.Tensor | None, top_ids: torch.Tensor | None) -> None:
    """Hands each sequence its rows of the prompt logprobs (lp [R]) and, when it asked for n alternatives, the
    first n of top_ids / top_values [R, num_top] of those rows as (id, logprob) lists."""
    values = lp.tolist()
    ids, tops = (top_ids.tolist(), top_values.tolist()) if top_ids is not None else ([], [])
    row = 0
    for out, s in zip(outputs, seqs):
        n, k = len(s.logprob_targets), s.num_prompt_top
        out.prompt_logprobs = values[row : row + n]
        if k > 0:
            rows_ids, rows_values = ids[row : row + n], tops[row : row + n]
            out.prompt_top_logprobs = [list(zip(i[:k], v[:k])) for i, v in zip(rows_ids, rows_values)]
        row += n


def _penalized(seqs: list[SeqStep], logits: torch.Tensor) -> torch.Tensor:
    """logits [N, V] with each row's presence/frequency/repetition penalties applied."""
    n, vocab = logits.shape
    prompt_mask = torch.zeros(n, vocab, dtype=torch.bool)
    counts = torch.zeros(n, vocab, dtype=torch.float32)
    for row, s in enumerate(seqs):
        prompt_mask[row, s.penalty_prompt_ids] = True
        counts[row].index_add_(0, torch.tensor(s.penalty_output_ids, dtype=torch.long), torch.ones(len(s.penalty_output_ids)))
    specs, dev = [s.sampling for s in seqs], logits.device
    return apply_penalties(
        logits, prompt_mask.to(dev), counts.to(dev),
        torch.tensor([sp.presence_penalty for sp in specs], device=dev),
        torch.tensor([sp.frequency_penalty for sp in specs], device=dev),
        torch.tensor([sp.repetition_penalty for sp in specs], device=dev),
    )


def _bucket(n: int) -> int:
    """The power of two >= n: query lengths and block-table widths come in few distinct shapes."""
    return 1 << max(0, n - 1).bit_length()

"""Decode steps as CUDA graphs: one graph per (batch size, block-table widths), captured on first use.

A graph replays fixed kernels over fixed buffers, so the step's data goes into static device buffers (token
ids, positions, both pools' block tables, chunk starts, write slots) and everything derived from them (the
paged plans, RoPE, NoPE temperature, the model, lm_head) is computed inside the graph: a replay with a new
step's values recomputes the plans, which is what keeps chunked attention right across a chunk boundary
(vLLM #28604 came from metadata fixed at capture time; scripts/gpu_check.py compares replay with eager there).

A batch of B sequences runs in the graph of the smallest captured size >= B; padding rows decode token 0 at
position 0 of a scratch block that no sequence owns (the KV pools' last block, reserved for this). Taken only
for decode steps of sequences that all sample, without prompt logprobs or images, with experts in this process
(an expert-parallel step's capacity changes per step, and so would the collectives' shapes).

Shapes: B rows (a captured batch size), NBf / NBc full / chunk block-table widths, V vocabulary.
"""

from __future__ import annotations

import torch

from llama4serve.kernels.flex_attention import plan_paged
from llama4serve.kernels.rope import rope_freqs_cis, temperature_scales
from llama4serve.actors.step_io import StepBatch
from llama4serve.actors.model.text_model import PoolView, StepMeta
from llama4serve.actors.runner.kv_cache import slots_of

DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64)


class DecodeGraph:
    """One decode step of `num_rows` rows over static buffers; `capture=False` runs the same function eagerly
    (what a CPU or FakeTensorMode check can run)."""

    def __init__(self, runner, num_rows: int, nb_full: int, nb_chunk: int, capture: bool = True, pool=None):
        self.runner, dev = runner, runner.device
        self.num_rows = num_rows

        def zeros(*shape):
            return torch.zeros(*shape, dtype=torch.long, device=dev)

        self.buf = {"ids": zeros(num_rows), "pos": zeros(num_rows), "full": zeros(num_rows, nb_full),
                    "chunk": zeros(num_rows, nb_chunk), "chunk_start": zeros(num_rows),
                    "full_slots": zeros(num_rows), "chunk_slots": zeros(num_rows)}
        self.rows = torch.arange(num_rows, device=dev)
        self.graph = None
        if capture:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    self._step()  # compiles flex and warms up allocations outside the capture
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph, pool=pool):
                self.out = self._step()

    def _step(self) -> torch.Tensor:
        runner, cfg, b, bs = self.runner, self.runner.cfg, self.buf, self.runner.kv.block_size
        pools = {}
        for pool, table, start, slots in (("full", b["full"], torch.zeros_like(b["pos"]), b["full_slots"]),
                                          ("chunk", b["chunk"], b["chunk_start"], b["chunk_slots"])):
            chunk = cfg.attention_chunk_size if pool == "chunk" else None
            plan = plan_paged(table, start, b["pos"] - start + 1, self.rows, b["pos"], bs, 1, chunk)
            pools[pool] = PoolView(None, None, None, slots, plan=plan)
        meta = StepMeta(
            positions=b["pos"], pad_index=None, unpad_index=None, batch_shape=(self.num_rows, 1),
            freqs_cis=rope_freqs_cis(b["pos"], runner.inv_freq),
            temp_scales=temperature_scales(b["pos"], cfg.floor_scale, cfg.attn_scale)
            if cfg.attn_temperature_tuning else None,
            pools=pools, moe_capacity=self.num_rows, flex_compiled=runner.flex_compiled)
        return runner.model.logits(runner.model.forward(b["ids"], meta, runner.kv))  # [B, V]

    def fill(self, batch: StepBatch, pad_full: int, pad_chunk: int) -> None:
        """Copies the step's values into the buffers (one host-to-device copy per buffer)."""
        runner, bs = self.runner, self.runner.kv.block_size
        nbf, nbc = self.buf["full"].shape[1], self.buf["chunk"].shape[1]
        host = {k: [] for k in self.buf}
        for s in batch.seqs:
            p, c0 = s.start_pos, runner.chunk_start(s.start_pos)
            host["ids"].append(s.token_ids[0])
            host["pos"].append(p)
            host["full"].append((s.full_blocks + [pad_full] * nbf)[:nbf])
            host["chunk"].append((s.chunk_write_blocks + [pad_chunk] * nbc)[:nbc])
            host["chunk_start"].append(c0)
            host["full_slots"] += slots_of(s.full_blocks, range(p, p + 1), 0, bs)
            host["chunk_slots"] += slots_of(s.chunk_write_blocks, range(p, p + 1), c0, bs)
        for _ in range(self.num_rows - len(batch.seqs)):  # padding rows: the scratch blocks
            for k, v in (("ids", 0), ("pos", 0), ("chunk_start", 0), ("full_slots", pad_full * bs),
                         ("chunk_slots", pad_chunk * bs)):
                host[k].append(v)
            host["full"].append([pad_full] * nbf)
            host["chunk"].append([pad_chunk] * nbc)
        for k, v in host.items():
            self.buf[k].copy_(torch.tensor(v, dtype=torch.long), non_blocking=True)

    def run(self) -> torch.Tensor:
        if self.graph is None:
            return self._step()
        self.graph.replay()
        return self.out


class DecodeGraphs:
    """The runner's decode graphs. pad_full / pad_chunk: the scratch block of each pool (its last block)."""

    def __init__(self, runner, batch_sizes: tuple[int, ...], pad_full: int, pad_chunk: int, capture: bool = True):
        self.runner, self.batch_sizes = runner, tuple(sorted(batch_sizes))
        self.pad_full, self.pad_chunk, self.capture = pad_full, pad_chunk, capture
        self.graphs: dict[tuple[int, int, int], DecodeGraph] = {}
        self.pool = torch.cuda.graph_pool_handle() if capture else None

    def applies(self, batch: StepBatch, image_embeds) -> bool:
        return (image_embeds is None and batch.seqs and len(batch.seqs) <= self.batch_sizes[-1]
                and all(len(s.token_ids) == 1 and s.sampling is not None and not s.logprob_targets
                        # not the last token of a chunk (its chunk-pool key is not kept: the padded path)
                        and self.runner.chunk_start(s.start_pos) == self.runner.chunk_start(s.end_pos)
                        for s in batch.seqs))

    def logits(self, batch: StepBatch) -> torch.Tensor:
        """The step's logits [len(batch.seqs), V], through the graph for its (batch size, table width)."""
        from llama4serve.actors.runner.model_runner import _bucket

        runner = self.runner
        rows = next(n for n in self.batch_sizes if n >= len(batch.seqs))
        bs = runner.kv.block_size
        nb_full = _bucket(max(-(-(s.start_pos + 1) // bs) for s in batch.seqs))  # powers of two: few graphs
        nb_chunk = _bucket(max(-(-(s.start_pos + 1 - runner.chunk_start(s.start_pos)) // bs) for s in batch.seqs))
        key = (rows, nb_full, nb_chunk)
        if key not in self.graphs:
            self.graphs[key] = DecodeGraph(runner, rows, nb_full, nb_chunk, self.capture, self.pool)
        graph = self.graphs[key]
        graph.fill(batch, self.pad_full, self.pad_chunk)
        return graph.run()[: len(batch.seqs)]

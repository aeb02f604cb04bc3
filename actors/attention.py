"""AttentionActor: one Ray actor holding the text model (embeddings, attention, dense MLPs, shared experts,
router, lm_head), its iRoPE KV cache, and — when `expert_actors = 0` — all routed experts.

Per step it receives a StepBatch (token ids, positions, block tables) and returns sampled tokens, never logits.
"""

from __future__ import annotations

import os

import torch

from .batch import SeqOutput, StepBatch
from .checkpoint import CheckpointReader
from .config import load_model_config
from .experts import LocalExperts
from .kv_cache import KVCache
from .model import Llama4TextModel
from .model_runner import ModelRunner
from .process_group import join, master_address
from .router import ExpertLayout, Router

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class AttentionActor:
    def __init__(
        self,
        model_dir: str,
        dtype: str,
        num_full_blocks: int,
        num_chunk_blocks: int,
        block_size: int,
        torch_threads: int | None = None,
        expert_bounds: list[tuple[int, int]] | None = None,
        num_attention_ranks: int = 1,
    ):
        """expert_bounds: expert ranges of the expert actors (ranks num_attention_ranks, ...); None keeps every
        routed expert in this actor."""
        if torch_threads:
            torch.set_num_threads(torch_threads)
        cfg = load_model_config(model_dir)
        reader = CheckpointReader(model_dir)
        self.dtype = torch_dtype = DTYPES[dtype]
        self.router: Router | None = None
        if expert_bounds:
            world_size = num_attention_ranks + len(expert_bounds)
            layout = ExpertLayout(expert_bounds, num_attention_ranks, world_size)
            self.router = routed = Router(layout, cfg.hidden_size, cfg.moe_layers, torch_dtype)
        else:
            routed = LocalExperts(cfg, reader, 0, cfg.num_experts, torch_dtype)
        model = Llama4TextModel(cfg, reader, torch_dtype, routed)
        reader.close()
        self.kv = KVCache(cfg, num_full_blocks, num_chunk_blocks, block_size, torch_dtype)
        self.runner = ModelRunner(cfg, model, self.kv)

    def ready(self) -> dict:
        import ray

        return {"pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id(),
                "kv_cache_bytes": self.kv.nbytes(), "torch_threads": torch.get_num_threads()}

    def master_address(self) -> tuple[str, int]:
        return master_address()

    def join_group(self, master: tuple[str, int], rank: int, world_size: int, timeout_s: float) -> str:
        return join(master, rank, world_size, timeout_s)

    def exchange_stats(self) -> tuple[float, int]:
        """(seconds from dispatch to combined results, MoE-layer exchanges) since start."""
        return (self.router.exchange_seconds, self.router.exchanges) if self.router else (0.0, 0)

    def step(self, batch: StepBatch) -> list[SeqOutput]:
        if not batch.seqs:
            if self.router is not None:
                self.router.idle_step(batch.moe_capacity)  # every rank joins every collective
            return []
        return self.runner.step(batch)

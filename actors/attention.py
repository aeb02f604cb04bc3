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
    ):
        if torch_threads:
            torch.set_num_threads(torch_threads)
        cfg = load_model_config(model_dir)
        reader = CheckpointReader(model_dir)
        torch_dtype = DTYPES[dtype]
        experts = LocalExperts(cfg, reader, 0, cfg.num_experts, torch_dtype)
        model = Llama4TextModel(cfg, reader, torch_dtype, experts)
        reader.close()
        self.kv = KVCache(cfg, num_full_blocks, num_chunk_blocks, block_size, torch_dtype)
        self.runner = ModelRunner(cfg, model, self.kv)

    def ready(self) -> dict:
        return {"pid": os.getpid(), "kv_cache_bytes": self.kv.nbytes(), "torch_threads": torch.get_num_threads()}

    def step(self, batch: StepBatch) -> list[SeqOutput]:
        return self.runner.step(batch)

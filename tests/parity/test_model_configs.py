"""Config variants the reference accepts, checked in-process (no Ray): prompt log-probs of one prefill and of
prefill + cached decode against transformers."""

from __future__ import annotations

import pytest
import torch

from hf_reference import MAVERICK_LIKE, SCOUT_LIKE, hf_logprobs, load_hf, write_hf_checkpoint
from llama4serve.actors.attention_actor import DTYPES
from llama4serve.actors.step_io import SeqStep, StepBatch
from llama4serve.actors.model.checkpoint import CheckpointReader
from llama4serve.actors.model.config import load_model_config
from llama4serve.actors.model.experts import LocalExperts
from llama4serve.actors.runner.kv_cache import KVCache
from llama4serve.actors.model.text_model import Llama4TextModel
from llama4serve.actors.runner.model_runner import ModelRunner
from llama4serve.cluster.engine.block_manager import BlockManager

VARIANTS = {
    "explicit_moe_layers": dict(SCOUT_LIKE, moe_layers=[0, 2]),
    "nope_pattern_0_3": dict(SCOUT_LIKE, no_rope_layers=[0, 1, 1, 0]),
    "no_qk_norm_no_temperature": dict(SCOUT_LIKE, use_qk_norm=False, attn_temperature_tuning=False),
    "interleave_3": dict(MAVERICK_LIKE, interleave_moe_layer_step=3, num_hidden_layers=6),
    "top2_experts": dict(SCOUT_LIKE, num_experts_per_tok=2),
    "long_chunk": dict(MAVERICK_LIKE, attention_chunk_size=4096),
    "attention_bias": dict(SCOUT_LIKE, attention_bias=True),
}


def _score(path, ids: list[int], dtype: str = "float32", split: int | None = None) -> torch.Tensor:
    """Prompt log-probs from our model: one prefill, or a prefill of ids[:split] then one token per step."""
    cfg = load_model_config(path)
    reader = CheckpointReader(path)
    torch_dtype = DTYPES[dtype]
    model = Llama4TextModel(cfg, reader, torch_dtype, LocalExperts(cfg, reader, 0, cfg.num_experts, torch_dtype))
    chunk = cfg.attention_chunk_size if cfg.chunked_layers else None
    blocks = BlockManager(64, 64, 8, chunk, bool(cfg.full_layers), bool(cfg.chunked_layers))
    runner = ModelRunner(cfg, model, KVCache(cfg, 64, 64, 8, torch_dtype))
    split = split or len(ids)
    pieces = [(0, split)] + [(p, p + 1) for p in range(split, len(ids))]
    logprobs = []
    for start, end in pieces:
        full, read, write = blocks.append(0, start, end)
        targets = ids[start + 1 : min(end, len(ids) - 1) + 1]
        step = SeqStep(0, ids[start:end], start, full, read, write, logprob_targets=targets)
        logprobs += runner.step(StepBatch([step]))[0].prompt_logprobs
        blocks.finish_step(0)
    return torch.tensor(logprobs)


def _ids(n: int = 60) -> list[int]:
    return torch.randint(3, 290, (n,), generator=torch.Generator().manual_seed(7)).tolist()


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_variant_matches_transformers(tmp_path, name):
    path = write_hf_checkpoint(tmp_path, VARIANTS[name])
    ids = _ids()
    ref = hf_logprobs(load_hf(path), ids)
    torch.testing.assert_close(_score(path, ids), ref, atol=1e-3, rtol=0)
    torch.testing.assert_close(_score(path, ids, split=20), ref, atol=1e-3, rtol=0)


def test_tied_embeddings_single_file_checkpoint(tmp_path):
    path = write_hf_checkpoint(tmp_path, SCOUT_LIKE, tie=True, max_shard_size="1GB")
    assert (path / "model.safetensors").is_file() and not (path / "model.safetensors.index.json").exists()
    ids = _ids()
    torch.testing.assert_close(_score(path, ids), hf_logprobs(load_hf(path), ids), atol=1e-3, rtol=0)


def test_bfloat16_checkpoint(tmp_path):
    path = write_hf_checkpoint(tmp_path, MAVERICK_LIKE, dtype=torch.bfloat16)
    ids = _ids()
    ref = hf_logprobs(load_hf(path), ids)  # bf16 weights computed in float32
    torch.testing.assert_close(_score(path, ids), ref, atol=1e-3, rtol=0)
    low = _score(path, ids, dtype="bfloat16")  # bf16 compute: same answers within bf16 precision
    assert (low - ref).abs().mean() < 0.05

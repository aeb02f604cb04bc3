"""The chunked-layer pool holds at most one chunk (+1 block) per sequence, also under chunked prefill."""

from __future__ import annotations

import torch

from hf_reference import SCOUT_LIKE, write_hf_checkpoint
from llama4serve.cluster import LLM, SamplingParams

CHUNK = SCOUT_LIKE["attention_chunk_size"]
BLOCK = 4


def test_chunk_pool_bounded_at_long_context(ray_session, tmp_path):
    path = write_hf_checkpoint(tmp_path, SCOUT_LIKE)
    prompt = torch.randint(3, 290, (8 * CHUNK,), generator=torch.Generator().manual_seed(3)).tolist()
    params = SamplingParams(max_tokens=2 * CHUNK, temperature=0, ignore_eos=True)
    limit = CHUNK // BLOCK + 1
    # One step per call, so that the blocks held can be observed after every step.
    with LLM(path, dtype="float32", block_size=BLOCK, max_num_batched_tokens=20, num_scheduler_steps=1) as llm:
        engine = llm.engine
        state = llm.add_request(prompt, params)
        peak_chunk = peak_full = steps = 0
        while llm.has_work():
            llm.step()
            full, chunk = engine.blocks.held(state.seq.seq_id)
            peak_chunk, peak_full = max(peak_chunk, chunk), max(peak_full, full)
            steps += 1
        chunked_prefill = llm.completion(state).token_ids
        one_shot = llm.generate(prompt, params)[0].token_ids
    assert steps > 8 * CHUNK // 20  # prefill really went in pieces
    assert peak_chunk <= limit, f"chunk pool held {peak_chunk} blocks; at most {limit} allowed"
    assert peak_full == -(-(10 * CHUNK) // BLOCK)  # the NoPE pool holds the whole history
    assert chunked_prefill == one_shot
    assert engine.blocks.usage() == {"full": 0.0, "chunk": 0.0}  # everything released

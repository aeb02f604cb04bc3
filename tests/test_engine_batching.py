"""Engine behaviour that must not change outputs: staggered arrivals, chunked prefill, and preemption."""

from __future__ import annotations

import pytest
import torch

from hf_reference import SCOUT_LIKE, write_hf_checkpoint
from llama4serve.cluster import LLM, SamplingParams

GREEDY = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
SEEDED = SamplingParams(max_tokens=10, temperature=0.9, top_p=0.95, seed=11, ignore_eos=True)


@pytest.fixture(scope="module")
def setup(ray_session, tmp_path_factory):
    path = write_hf_checkpoint(tmp_path_factory.mktemp("batching"), SCOUT_LIKE)
    g = torch.Generator().manual_seed(9)
    prompts = [torch.randint(3, 290, (int(n),), generator=g).tolist() for n in torch.randint(1, 60, (40,), generator=g)]
    with LLM(path, dtype="float32", block_size=8) as llm:
        alone = [llm.generate(p, [GREEDY, SEEDED][i % 2])[0].token_ids for i, p in enumerate(prompts)]
    return path, prompts, alone


def _staggered(llm: LLM, prompts: list[list[int]]) -> list:
    """Submits a few prompts every step, so prefills of new requests mix with decodes of older ones."""
    engine, seqs, pending = llm.engine, [], list(enumerate(prompts))
    while pending or engine.has_work():
        for _ in range(3):
            if pending:
                i, p = pending.pop(0)
                seqs.append(engine.add_request(p, [GREEDY, SEEDED][i % 2]))
        engine.step()
    return seqs


def test_staggered_arrivals_with_chunked_prefill_match_alone(setup):
    path, prompts, alone = setup
    with LLM(path, dtype="float32", block_size=8, max_num_batched_tokens=48, max_num_seqs=16) as llm:
        assert [s.output_ids for s in _staggered(llm, prompts)] == alone


def test_kv_budget_too_small_completes_through_preemption(setup):
    path, prompts, alone = setup
    # 24 blocks of 8 tokens hold only a few of the 40 sequences at once.
    with LLM(path, dtype="float32", block_size=8, num_full_blocks=24, num_chunk_blocks=12) as llm:
        seqs = _staggered(llm, prompts)
        assert llm.engine.blocks.usage() == {"full": 0.0, "chunk": 0.0}
    assert sum(s.num_preemptions for s in seqs) > 0  # the budget really forced preemptions
    assert [s.output_ids for s in seqs] == alone

"""Engine behaviour that must not change outputs: staggered arrivals, chunked prefill, and preemption."""

from __future__ import annotations

import dataclasses

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
    engine, seqs, pending = llm, [], list(enumerate(prompts))
    while pending or engine.has_work():
        for _ in range(3):
            if pending:
                i, p = pending.pop(0)
                seqs.append(engine.add_request(p, [GREEDY, SEEDED][i % 2]).seq)
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


def _count_multi_steps(llm: LLM) -> list[int]:
    """Records the number of decode steps of every actor call the engine makes."""
    sizes: list[int] = []
    scheduler = llm.engine.replicas[0].scheduler
    limit = scheduler.decode_steps_limit

    def recording(*args):
        sizes.append(limit(*args))
        return sizes[-1]

    scheduler.decode_steps_limit = recording
    return sizes


@pytest.mark.parametrize("expert_actors", [0, 2])
def test_multi_step_decode_matches_one_step_per_call(setup, expert_actors):
    """num_scheduler_steps: several decode steps per actor call, the sampled tokens fed back in the actor, give
    the same greedy and seeded tokens and logprobs; a stop token ends a sequence in the middle of a call; block
    tables grow ahead but never cross a chunk (SCOUT_LIKE's chunk is 16 tokens, block_size 8)."""
    path, prompts, alone = setup
    picked = list(range(0, 40, 5))
    stop_at = alone[picked[1]][4]  # a seeded prompt's fifth token: that request stops there, mid-call
    params = [[GREEDY, SEEDED][i % 2] for i in picked]
    params[0] = SamplingParams(max_tokens=23, temperature=0, ignore_eos=True, logprobs=2)  # crosses chunks
    params[1] = dataclasses.replace(SEEDED, stop_token_ids=[stop_at])
    with LLM(path, dtype="float32", block_size=8, expert_actors=expert_actors, num_scheduler_steps=1) as llm:
        reference = llm.generate([prompts[i] for i in picked], params)
    with LLM(path, dtype="float32", block_size=8, expert_actors=expert_actors, num_scheduler_steps=6) as llm:
        sizes = _count_multi_steps(llm)
        outs = llm.generate([prompts[i] for i in picked], params)
        assert llm.engine.blocks.usage() == {"full": 0.0, "chunk": 0.0}
    assert max(sizes) == 6 and 1 < min(s for s in sizes if s > 1) < 6  # chunk ends and max_tokens cut calls short
    assert [o.token_ids for o in outs] == [o.token_ids for o in reference]
    assert outs[0].logprobs == reference[0].logprobs and outs[0].top_logprobs == reference[0].top_logprobs
    assert outs[1].token_ids == alone[picked[1]][: alone[picked[1]].index(stop_at) + 1]
    assert [o.token_ids for o in outs[2:]] == [alone[i] for i in picked[2:]]

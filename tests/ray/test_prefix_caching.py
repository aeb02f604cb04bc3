"""Prefix caching changes no output: the same tokens and logprobs with the cache on and off, on the topologies
1x0, 1x2 and 2x0, with a shared prefix longer than attention_chunk_size (SCOUT_LIKE's chunk is 16 tokens, so
chunk boundaries lie inside it), under a KV budget that forces preemption, with prompt logprobs, and with images.
The later requests really start after their cached prefix, on the attention actor that holds it. The portable
path (flex_attention over the paged pools: what a GPU runs) is checked too, in a child pytest."""

from __future__ import annotations


import pytest
import torch

from hf_reference import SCOUT_LIKE, write_hf_checkpoint
from llama4serve.cluster import LLM, SamplingParams

PREFIX_LEN = 45  # chunks [0, 16) [16, 32) [32, 48): a later prompt's cached prefix ends inside the third
GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=2)
SEEDED = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.95, seed=5, ignore_eos=True, logprobs=0)
SCORED = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True, prompt_logprobs=2)
OPTIONS = dict(dtype="float32", block_size=4, num_scheduler_steps=1)
ATOL = 1e-5  # float32: the cached k/v were computed in another batch than a full prefill computes them


@pytest.fixture(scope="module")
def setup(ray_session, tmp_path_factory):
    path = write_hf_checkpoint(tmp_path_factory.mktemp("prefix"), SCOUT_LIKE)
    g = torch.Generator().manual_seed(3)
    prefix = torch.randint(3, 290, (PREFIX_LEN,), generator=g).tolist()
    tails = [torch.randint(3, 290, (int(n),), generator=g).tolist() for n in (1, 5, 9, 16, 3, 20)]
    prompts = [prefix + t for t in tails] + [prefix[:30] + tails[0], prefix[:16] + tails[1]]
    params = [[GREEDY, SEEDED][i % 2] for i in range(len(prompts))]
    with LLM(path, enable_prefix_caching=False, **OPTIONS) as llm:
        reference = llm.generate(prompts, params)
        scored = llm.generate(prompts[:2], SCORED)
    return path, prompts, params, reference, scored


def _same(outs, reference) -> None:
    for out, ref in zip(outs, reference, strict=True):
        assert out.token_ids == ref.token_ids
        torch.testing.assert_close(torch.tensor(out.logprobs), torch.tensor(ref.logprobs), atol=ATOL, rtol=0)
        for top, ref_top in zip(out.top_logprobs or [], ref.top_logprobs or [], strict=True):
            assert [t for t, _ in top] == [t for t, _ in ref_top]


def _first_then_rest(llm: LLM, prompts, params) -> list:
    """The first prompt alone (it fills the cache), then the others together."""
    return llm.generate(prompts[:1], params[:1]) + llm.generate(prompts[1:], params[1:])


@pytest.mark.parametrize("attention, experts", [(1, 0), (1, 2), (2, 0)])
def test_cache_on_gives_the_outputs_of_cache_off(setup, attention, experts):
    path, prompts, params, reference, _ = setup
    with LLM(path, attention_actors=attention, expert_actors=experts, **OPTIONS) as llm:
        outs = _first_then_rest(llm, prompts, params)
        schedulers = [r.scheduler for r in llm.engine.replicas]
        hits = sum(s.prefix_cache_hits for s in schedulers)
        assert sum(s.prefix_cache_queries for s in schedulers) == sum(map(len, prompts))
        # the 5 later full-prefix prompts reuse 44 tokens (11 blocks; the first one's prefill wrote chunk
        # [32, 48) to the chunk pool), the two shorter ones 16 (up to a chunk boundary: the chunk pool holds
        # nothing of [16, 32))
        assert hits == 5 * 44 + 16 + 16
        if attention == 2:  # every later request went to the actor holding the prefix
            assert sorted(r.num_assigned for r in llm.engine.replicas) == [0, len(prompts)]
        assert all(r.blocks.usage() == {"full": 0.0, "chunk": 0.0} for r in llm.engine.replicas)
    _same(outs, reference)


def test_routing_ties_go_to_the_least_loaded_actor(setup):
    path, prompts, params, _, _ = setup
    with LLM(path, attention_actors=2, **OPTIONS) as llm:
        llm.generate(prompts[:1], params[:1])  # actor 0 caches the prefix
        states = [llm.add_request(p, params[0]) for p in ([[7, 8, 9]] * 2 + [prompts[2]])]
        owners = [llm.engine._owner[s.seq.seq_id].name for s in states]
        assert owners == ["attention-0", "attention-1", "attention-0"]  # no hit: least loaded; then the prefix
        while llm.has_work():
            llm.step()


def test_prompt_logprobs_are_all_recomputed(setup):
    path, prompts, params, _, scored = setup
    with LLM(path, **OPTIONS) as llm:
        llm.generate(prompts[:2], params[:2])  # cached
        outs = llm.generate(prompts[:2], SCORED)
        scheduler = llm.engine.replicas[0].scheduler
        assert scheduler.prefix_cache_queries == sum(map(len, prompts[:2])) and scheduler.prefix_cache_hits == 0
    for out, ref in zip(outs, scored, strict=True):
        assert out.token_ids == ref.token_ids and len(out.prompt_logprobs) == len(ref.prompt_logprobs)
        torch.testing.assert_close(torch.tensor(out.prompt_logprobs[1:]), torch.tensor(ref.prompt_logprobs[1:]),
                                   atol=ATOL, rtol=0)
        assert [[t for t, _ in top] for top in out.prompt_top_logprobs[1:]] == \
            [[t for t, _ in top] for top in ref.prompt_top_logprobs[1:]]


def test_tight_kv_budget_preempts_and_changes_nothing(setup):
    path, prompts, params, reference, _ = setup
    # 40 blocks of 4 tokens: a couple of 60-token sequences at once, so later ones wait and get preempted
    with LLM(path, num_full_blocks=40, num_chunk_blocks=16, max_num_batched_tokens=24, **OPTIONS) as llm:
        states = [llm.add_request(p, sp) for p, sp in zip(prompts, params)]
        while llm.has_work():
            llm.step()
        outs = [llm.completion(s) for s in states]
        scheduler = llm.engine.replicas[0].scheduler
        assert sum(s.seq.num_preemptions for s in states) > 0 and scheduler.prefix_cache_hits > 0
        assert llm.engine.blocks.usage() == {"full": 0.0, "chunk": 0.0}
    _same(outs, reference)


"""The prefix cache alone (plain Python, no torch, no Ray): block hashes, the caching pool's references and LRU,
the two pools' hit rule, and the scheduler admitting sequences after their cached prefix."""

from __future__ import annotations

from llama4serve.cluster.engine.block_manager import BlockManager
from llama4serve.cluster.engine.prefix_cache import BlockHasher, CachingBlockPool
from llama4serve.cluster.engine.scheduler import Scheduler, SeqImages, Sequence
from llama4serve.cluster.sampling_params import SamplingParams


def _seq(i: int, prompt: list[int], max_tokens: int = 4, **params) -> Sequence:
    return Sequence(seq_id=i, prompt_ids=list(prompt), params=SamplingParams(max_tokens=max_tokens, **params), seed=i)


def _run(sched: Scheduler, steps) -> None:
    """Pretend the actor ran `steps`, then record them as the engine does (postprocess)."""
    from llama4serve.actors.step_io import SeqOutput

    outs = [SeqOutput(s.seq_id, token_id=7 if s.sampling is not None else None) for _, s in steps]
    sched.postprocess(steps, outs, 1)


def _hashes(bm: BlockManager, ids: list[int]) -> list[bytes]:
    return BlockHasher(bm.block_size).extend(ids, len(ids))


def test_block_hashes_chain_tokens_and_image_tiles():
    a = BlockHasher(4).extend(list(range(12)), 12)
    assert len(a) == 3 and len(set(a)) == 3
    assert BlockHasher(4).extend(list(range(12)) + [5, 5], 14) == a  # only full blocks
    b = BlockHasher(4).extend([99] + list(range(1, 12)), 12)
    assert all(x != y for x, y in zip(a, b))  # a different first block changes every later hash (the chain)
    # patch rows at positions 5, 6 (tile 0) and 9, 10 (tile 1): block 0 has no image row, blocks 1 and 2 do
    same = BlockHasher(4, [5, 6, 9, 10], [b"t0", b"t1"]).extend(list(range(12)), 12)
    other_tile1 = BlockHasher(4, [5, 6, 9, 10], [b"t0", b"XX"]).extend(list(range(12)), 12)
    assert same[0] == a[0] and same[1] != a[1]
    assert other_tile1[:2] == same[:2] and other_tile1[2] != same[2]  # tile 1 rows start in block 2


def test_pool_counts_references_and_evicts_least_recently_released_cached_block_last():
    pool = CachingBlockPool(4)
    a, b, c = pool.allocate(3)
    pool.set_hash(a, b"A")
    pool.set_hash(b, b"B")
    pool.set_hash(c, b"A")  # a duplicate of a cached hash stays uncached
    assert pool.lookup(b"A") == a and c not in pool.hash_of
    pool.touch([a])  # shared by a second sequence
    pool.release([a, b, c])
    assert pool.num_free == 3 and pool.ref_count[a] == 1 and pool.lookup(b"B") == b
    pool.release([a])
    assert pool.num_free == 4
    # never-cached blocks go first (the spare one, then c), then the cached ones, least recently released first
    assert pool.allocate(2) == [c, 3] and pool.lookup(b"A") == a
    assert pool.allocate(1) == [b] and pool.lookup(b"B") is None and pool.lookup(b"A") == a
    pool.touch([a])  # a hit on a free cached block takes it out of the eviction queue
    assert pool.num_free == 0 and pool.ref_count[a] == 1
    pool.release([a])
    assert pool.num_free == 1 and pool.lookup(b"A") == a
    assert CachingBlockPool(2, enable_caching=False).lookup(b"A") is None


def test_hit_rule_of_the_two_pools():
    bm = BlockManager(num_full_blocks=64, num_chunk_blocks=64, block_size=4, chunk_size=8)
    ids = list(range(1, 21))  # 20 tokens: chunks [0, 8) [8, 16) [16, 20)
    hashes = _hashes(bm, ids)
    bm.take_prefix(0, hashes, 0)
    bm.append(0, 0, 20)  # one step: the chunk pool gets only the last chunk's blocks
    bm.cache_computed(0, hashes, 20)
    bm.finish_step(0)
    assert len(bm.full_pool.cached) == 5 and len(bm.chunk_pool.cached) == 1  # block [16, 20) of the chunk pool
    assert bm.cached_prefix(hashes, 21) == 20  # ends in the last chunk, whose blocks are cached
    assert bm.cached_prefix(hashes, 20) == 16  # the last token is always computed: ends on a chunk boundary
    assert bm.cached_prefix(hashes[:4] + [b"x"], 19) == 16  # chunk [16, 20) is not needed for a 16-token prefix
    bm.free(0)
    assert bm.full_pool.num_free == 64 and bm.cached_prefix(hashes, 21) == 20  # freed blocks stay cached
    # A sequence that decodes through [8, 16) leaves that chunk's blocks (but the last, see cache_computed).
    ids2 = [50] + ids[1:]
    h2 = _hashes(bm, ids2)
    bm.take_prefix(1, h2, 0)
    for end in range(9, 21):
        bm.append(1, end - 1 if end > 9 else 0, end)
        bm.cache_computed(1, h2, end)
        bm.finish_step(1)
    assert bm.cached_prefix(h2, 14) == 12  # [8, 12) of the chunk pool is cached
    assert bm.cached_prefix(h2, 17) == 16 and bm.cached_prefix(h2, 21) == 20
    no_chunk = BlockManager(64, 0, 4, None)
    no_chunk.take_prefix(0, hashes, 0)
    no_chunk.append(0, 0, 20)
    no_chunk.cache_computed(0, hashes, 20)
    assert no_chunk.cached_prefix(hashes, 21) == 20 and no_chunk.cached_prefix(hashes[:2], 21) == 8
    off = BlockManager(64, 64, 4, 8, enable_caching=False)
    off.take_prefix(0, hashes, 0)
    off.append(0, 0, 20)
    off.cache_computed(0, hashes, 20)
    assert off.cached_prefix(hashes, 21) == 0


def test_second_request_starts_after_the_shared_prefix_and_shares_its_blocks():
    bm = BlockManager(num_full_blocks=32, num_chunk_blocks=32, block_size=4, chunk_size=8)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=64)
    prefix = list(range(1, 15))  # 14 tokens: 3 full blocks
    a, b = _seq(0, prefix + [40]), _seq(1, prefix + [60, 61])  # a's prefill ends in chunk [8, 16)
    sched.add(a)
    _run(sched, sched.schedule())
    sched.add(b)
    steps = sched.schedule()  # b's prefill alone: a decodes in the next step
    assert [(s.seq_id, s.start_pos, len(s.token_ids)) for _, s in steps] == [(1, 12, 4)]
    [(_, step_b)] = steps
    _run(sched, steps)
    (_, step_a), _ = sched.schedule()
    assert step_a.start_pos == 15
    assert step_b.full_blocks[:3] == step_a.full_blocks[:3]  # shared, not copied
    assert step_b.chunk_read_blocks == step_a.chunk_read_blocks[:1]  # chunk [8, 16): its block [8, 12)
    assert sched.prefix_cache_queries == 15 + 16 and sched.prefix_cache_hits == 12
    assert bm.full_pool.ref_count[step_a.full_blocks[0]] == 2
    sched.abort(0)
    assert bm.full_pool.ref_count[step_a.full_blocks[0]] == 1
    sched.abort(1)
    assert bm.usage() == {"full": 0.0, "chunk": 0.0} and bm.cached_prefix(_hashes(bm, prefix + [60]), 15) == 12


def test_prompt_logprobs_recompute_everything_but_fill_the_cache():
    bm = BlockManager(32, 32, 4, 8)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=64)
    prompt = list(range(1, 12))
    scored = _seq(0, prompt, prompt_logprobs=True)
    sched.add(scored)
    [(_, step)] = sched.schedule()
    assert step.start_pos == 0 and len(step.logprob_targets) == 10
    _run(sched, [(scored, step)])
    sched.add(again := _seq(1, prompt, prompt_logprobs=True))
    sched.add(plain := _seq(2, prompt))
    steps = {s.seq_id: s for _, s in sched.schedule()}
    assert steps[1].start_pos == 0 and steps[2].start_pos == 8
    assert sched.prefix_cache_queries == 11 and sched.prefix_cache_hits == 8  # scored requests do not count
    assert again.num_computed == 0 and plain.num_computed == 8


def test_preemption_under_a_tight_budget_keeps_the_cache_consistent():
    bm = BlockManager(num_full_blocks=6, num_chunk_blocks=100, block_size=4, chunk_size=None)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=100)
    prefix = list(range(1, 9))
    a, b = _seq(0, prefix + [20, 21], max_tokens=8), _seq(1, prefix + [30, 31], max_tokens=8)
    sched.add(a)
    _run(sched, sched.schedule())
    sched.add(b)
    steps = sched.schedule()  # b (alone: a decodes next) shares a's two prefix blocks: 3 + 1 blocks in use
    assert [(s.seq_id, s.start_pos) for _, s in steps] == [(1, 8)]
    for _ in range(100):
        if not sched.has_work():
            break
        _run(sched, steps)
        steps = sched.schedule()
    assert b.num_preemptions + a.num_preemptions > 0  # 6 blocks could not hold both (5 + 5 - 2 shared) to the end
    assert len(a.output_ids) == len(b.output_ids) == 8 and not sched.has_work()
    assert bm.usage() == {"full": 0.0, "chunk": 0.0}
    assert all(c == 0 for c in bm.full_pool.ref_count)


def test_image_pixels_go_with_the_first_step_after_a_cached_prefix():
    bm = BlockManager(32, 32, 4, 8)
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=64)
    prompt = [1, 2, 3, 4, 5, 9, 9, 9, 9, 6, 7]  # patch rows at 5..8, one tile
    first = Sequence(0, prompt, SamplingParams(max_tokens=2), 0, images=SeqImages("px", [5, 6, 7, 8], tile_hashes=[b"a"]))
    sched.add(first)
    _run(sched, sched.schedule())
    same = Sequence(1, prompt, SamplingParams(max_tokens=2), 0, images=SeqImages("px", [5, 6, 7, 8], tile_hashes=[b"a"]))
    other = Sequence(2, prompt, SamplingParams(max_tokens=2), 0, images=SeqImages("py", [5, 6, 7, 8], tile_hashes=[b"b"]))
    sched.add(same)
    sched.add(other)
    steps = {s.seq_id: s for _, s in sched.schedule()}
    assert (steps[1].start_pos, steps[1].image_pixels, steps[1].image_offset) == (8, "px", 3)
    assert (steps[2].start_pos, steps[2].image_pixels, steps[2].image_offset) == (0, "py", 0)  # another image: only block 0 matches, and
    # the chunk pool has no block [0, 4)


def test_on_by_default_in_the_options_the_serve_config_and_the_chart():
    import json
    from pathlib import Path

    import yaml

    from llama4serve.cluster.config import EngineOptions
    from llama4serve.cluster.serving.serve_config import ServeConfig

    chart = Path(__file__).resolve().parents[2] / "helm" / "llama4serve"
    assert EngineOptions().enable_prefix_caching and ServeConfig().enable_prefix_caching
    assert ServeConfig(enable_prefix_caching=False).enable_prefix_caching is False
    assert yaml.safe_load((chart / "values.yaml").read_text())["serve"]["args"]["enable_prefix_caching"] is True
    schema = json.loads((chart / "values.schema.json").read_text())
    args = schema["properties"]["serve"]["properties"]["args"]["properties"]
    assert args["enable_prefix_caching"]["type"] == "boolean"
    dashboard = json.loads((chart / "dashboards" / "llama4serve.json").read_text())
    [panel] = [p for p in dashboard["panels"] if "hit rate" in p["title"]]
    expr = panel["targets"][0]["expr"]
    assert "llama4serve_prefix_cache_hits_total" in expr and "llama4serve_prefix_cache_queries_total" in expr

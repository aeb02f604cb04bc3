"""Scheduler and block manager alone: plain Python, no torch, no Ray."""

from __future__ import annotations

from llama4serve.cluster.engine.block_manager import BlockManager
from llama4serve.cluster.sampling_params import SamplingParams
from llama4serve.cluster.engine.scheduler import Scheduler, Sequence


def _seq(i: int, n: int, max_tokens: int = 4) -> Sequence:
    return Sequence(seq_id=i, prompt_ids=list(range(1, n + 1)), params=SamplingParams(max_tokens=max_tokens), seed=i)


def _run(sched: Scheduler, steps) -> None:
    """Pretend the actor ran `steps`: advance num_computed and append a token where one was sampled."""
    for seq, step in steps:
        seq.num_computed = step.end_pos
        sched.blocks.finish_step(seq.seq_id)
        if step.sampling is not None:
            seq.output_ids.append(7)


def test_chunk_pool_keeps_one_chunk_and_releases_finished_chunks():
    bm = BlockManager(num_full_blocks=100, num_chunk_blocks=10, block_size=4, chunk_size=8)
    full, read, write = bm.append(0, 0, 7)
    assert len(full) == 2 and read == [] and len(write) == 2
    bm.finish_step(0)
    full, read, write = bm.append(0, 7, 9)  # crosses into chunk [8, 16)
    assert read != write and len(write) == 1 and bm.held(0) == (3, 3)
    bm.finish_step(0)
    assert bm.held(0) == (3, 1) and bm.chunk_pool.num_free == 9
    bm.free(0)
    assert bm.full_pool.num_free == 100 and bm.chunk_pool.num_free == 10


def test_chunked_prefill_under_token_budget():
    bm = BlockManager(100, 100, 4, 8)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=10)
    a, b = _seq(0, 25), _seq(1, 3)
    sched.add(a)
    sched.add(b)
    steps = sched.schedule()
    assert [(s.seq_id, s.start_pos, len(s.token_ids)) for _, s in steps] == [(0, 0, 10)]
    assert steps[0][1].sampling is None  # mid-prompt: nothing sampled
    _run(sched, steps)
    steps = sched.schedule()
    assert [(s.seq_id, s.start_pos, len(s.token_ids)) for _, s in steps] == [(0, 10, 10)]
    _run(sched, steps)
    steps = sched.schedule()  # the last 5 prompt tokens of a, then b's whole prompt in the same step
    assert [(s.seq_id, s.start_pos, len(s.token_ids)) for _, s in steps] == [(0, 20, 5), (1, 0, 3)]
    assert all(s.sampling is not None for _, s in steps)
    _run(sched, steps)
    steps = sched.schedule()  # decode: one token each
    assert [(s.seq_id, s.start_pos, len(s.token_ids)) for _, s in steps] == [(0, 25, 1), (1, 3, 1)]


def test_admission_limited_by_both_pools_and_max_num_seqs():
    # Chunk pool of 3 blocks: one sequence's chunk (2 blocks) fits, a second does not.
    sched = Scheduler(BlockManager(100, 3, 4, 8), max_num_seqs=8, max_num_batched_tokens=100)
    for i in range(2):
        sched.add(_seq(i, 6))
    assert [s.seq_id for _, s in sched.schedule()] == [0]
    # Full pool of 3 blocks: 6-token prompts need 2 blocks each.
    sched = Scheduler(BlockManager(3, 100, 4, 8), max_num_seqs=8, max_num_batched_tokens=100)
    for i in range(2):
        sched.add(_seq(i, 6))
    assert [s.seq_id for _, s in sched.schedule()] == [0]
    sched = Scheduler(BlockManager(100, 100, 4, 8), max_num_seqs=2, max_num_batched_tokens=100)
    for i in range(3):
        sched.add(_seq(i, 2))
    assert [s.seq_id for _, s in sched.schedule()] == [0, 1]


def test_preemption_frees_newest_and_resumes_by_recompute():
    bm = BlockManager(num_full_blocks=4, num_chunk_blocks=100, block_size=4, chunk_size=None)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=100)
    a, b = _seq(0, 8, max_tokens=8), _seq(1, 8, max_tokens=8)
    sched.add(a)
    sched.add(b)
    _run(sched, sched.schedule())  # both prefilled: 2 + 2 blocks, pool full
    assert bm.full_pool.num_free == 0
    steps = sched.schedule()  # a needs a 3rd block at position 8 -> b (newest) is preempted
    assert [s.seq_id for _, s in steps] == [0]
    assert b.num_computed == 0 and b.num_preemptions == 1 and sched.waiting[0] is b
    _run(sched, steps)
    sched.finish(a, "length")
    steps = sched.schedule()  # b is recomputed from its prompt and its generated token
    assert [(s.seq_id, s.start_pos, s.token_ids) for _, s in steps] == [(1, 0, b.all_ids)]


def test_abort_frees_blocks_at_once():
    bm = BlockManager(10, 10, 4, 8)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=100)
    sched.add(_seq(0, 9))
    _run(sched, sched.schedule())
    assert bm.full_pool.num_free < 10
    assert sched.abort(0).finish_reason == "abort"
    assert bm.full_pool.num_free == 10 and bm.chunk_pool.num_free == 10 and not sched.has_work()


def test_multi_step_decode_limit_and_block_growth():
    bm = BlockManager(num_full_blocks=8, num_chunk_blocks=4, block_size=4, chunk_size=8)
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=64, max_model_len=100)
    a, b = _seq(0, 3, max_tokens=10), _seq(1, 2, max_tokens=3)
    sched.add(a)
    assert sched.decode_steps_limit(sched.schedule(), 8) == 1  # a prefill is scheduled
    sched.add(b)
    _run(sched, sched.schedule())  # a decodes its first token while b prefills
    steps = sched.schedule()  # both decode: a at position 3, b at 2
    assert sched.decode_steps_limit(steps, 8) == 2  # b may sample only 2 more tokens (max_tokens 3)
    sched.max_model_len = 5
    assert sched.decode_steps_limit(steps, 8) == 1  # max_model_len 5: b's 4th token would be the 5th
    sched.max_model_len = 100
    sched.add(_seq(2, 1))
    assert sched.decode_steps_limit(steps, 8) == 1  # someone waits for admission
    sched.waiting.clear()
    b.params = SamplingParams(max_tokens=3, presence_penalty=0.5)
    assert sched.decode_steps_limit(steps, 8) == 1  # penalties read the tokens sampled so far
    b.params = SamplingParams(max_tokens=30)
    # a's chunk is [0, 8): from position 3 the tables may grow to end at 7 (ending at 8 would retire it)
    assert sched.decode_steps_limit(steps, 8) == 4
    assert sched.decode_steps_limit(steps, 3) == 3
    sched.extend_decode(steps, 4)
    (_, step_a), (_, step_b) = steps
    assert len(step_a.full_blocks) == len(step_a.chunk_write_blocks) == 2  # positions 0..6
    assert len(step_b.full_blocks) == 2 and bm.held(1) == (2, 2)  # positions 0..5
    big = Scheduler(BlockManager(num_full_blocks=3, num_chunk_blocks=8, block_size=4, chunk_size=8), 4, 64)
    big.add(_seq(3, 3, max_tokens=30))
    big.add(_seq(4, 3, max_tokens=30))
    _run(big, big.schedule())
    assert big.decode_steps_limit(big.schedule(), 8) == 1  # 4 steps each need 2 full blocks, 1 free


def test_a_step_prefills_or_decodes_not_both():
    sched = Scheduler(BlockManager(100, 100, 4, 8), max_num_seqs=2, max_num_batched_tokens=100)
    a, b, c = _seq(0, 5, max_tokens=8), _seq(1, 6, max_tokens=8), _seq(2, 3, max_tokens=8)
    sched.add(a)
    _run(sched, sched.schedule())
    sched.add(b)
    steps = sched.schedule()  # b's prompt runs alone; a (decoding) waits one step
    assert [(s.seq_id, s.start_pos) for _, s in steps] == [(1, 0)]
    _run(sched, steps)
    sched.add(c)  # max_num_seqs 2: c cannot be admitted, so both decode
    assert [(s.seq_id, s.start_pos) for _, s in sched.schedule()] == [(0, 5), (1, 6)]


def test_a_prompt_that_needs_a_decoding_sequence_blocks_lets_it_decode():
    """4 blocks: a (decoding) holds 2; b's prompt could only finish by preempting: a decodes, b is preempted."""
    sched = Scheduler(BlockManager(4, 100, 4, None), max_num_seqs=4, max_num_batched_tokens=4)
    a, b = _seq(0, 8, max_tokens=6), _seq(1, 12, max_tokens=2)
    sched.add(a)
    for _ in range(2):
        _run(sched, sched.schedule())
    sched.add(b)
    for _ in range(100):
        if not sched.has_work():
            break
        steps = sched.schedule()
        assert steps, "a step with nothing to run while sequences wait"
        _run(sched, steps)
        for seq in (a, b):
            if len(seq.output_ids) >= seq.params.max_tokens and seq.finish_reason is None:
                sched.finish(seq, "length")
    assert not sched.has_work() and b.num_preemptions > 0

"""The asyncio engine that servers use: streaming deltas, stop strings, abort, staggered arrivals, penalties."""

from __future__ import annotations

import asyncio
import random

import pytest
import torch

from hf_reference import load_hf
from llama4serve.cluster import LLM, SamplingParams
from llama4serve.cluster.engine.async_engine import AsyncEngine
from llama4serve.cluster.checkpoints.maker import write_checkpoint
from llama4serve.cluster.config import EngineConfig

GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
SEEDED = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.95, seed=5, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, ray_session):
    path = write_checkpoint(tmp_path_factory.mktemp("async") / "tiny-scout", "tiny-scout")
    engine = AsyncEngine(EngineConfig(model=str(path), dtype="float32", block_size=8, max_num_batched_tokens=64))
    yield path, engine
    engine.shutdown()


async def _collect(engine: AsyncEngine, prompt, params: SamplingParams, request_id: str | None = None) -> list:
    return [out async for out in engine.generate(prompt, params, request_id)]


def _joined(updates: list) -> tuple[list[int], str]:
    return [t for u in updates for t in u.token_ids], "".join(u.text for u in updates)


def test_streamed_deltas_concatenate_to_the_final_text_with_multibyte_characters(tiny):
    _, engine = tiny
    params = [SamplingParams(max_tokens=40, temperature=1.0, seed=s, ignore_eos=True) for s in range(8)]

    async def run():
        return await asyncio.gather(*(_collect(engine, "Grüße aus München: ", p) for p in params))

    multibyte = 0
    for updates, p in zip(asyncio.run(run()), params):
        ids, text = _joined(updates)
        assert updates[-1].finished and updates[-1].finish_reason == "length" and len(ids) == 40
        assert sum(len(u.token_ids) for u in updates[:-1]) < 40  # really streamed, not one final update
        assert text == engine.tokenizer.decode(ids)
        multibyte += any(ord(c) > 127 and c != "\ufffd" for c in text)
    assert multibyte, "no output had a multi-byte character; pick other seeds"


def test_stop_string_is_never_emitted(tiny):
    _, engine = tiny
    base = asyncio.run(_collect(engine, "The quick brown fox", GREEDY))
    _, text = _joined(base)
    stop = next(text[i : i + 3] for i in range(5, len(text) - 3) if text.find(text[i : i + 3]) == i and text[i : i + 3].strip())
    updates = asyncio.run(_collect(engine, "The quick brown fox", SamplingParams(**{**vars(GREEDY), "stop": [stop]})))
    assert updates[-1].finish_reason == "stop"
    assert all(stop not in u.text for u in updates)
    assert _joined(updates)[1] == text[: text.find(stop)]


def test_abort_and_early_close_free_the_blocks_at_once(tiny):
    _, engine = tiny
    long = SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)

    async def run():
        stream = engine.generate("Tell me a long story", long, "to-abort")
        first = await stream.__anext__()
        await engine.abort("to-abort")
        rest = [u async for u in stream]
        held_after_abort = engine.core.blocks.usage()
        closed = engine.generate("Another long one", long, "to-close")
        await closed.__anext__()
        await closed.aclose()  # a client that goes away
        return first, rest, held_after_abort, engine.core.blocks.usage()

    first, rest, held_after_abort, held_after_close = asyncio.run(run())
    assert not first.finished and rest[-1].finished and rest[-1].finish_reason == "abort"
    assert held_after_abort == held_after_close == {"full": 0.0, "chunk": 0.0}
    assert engine.stats()["num_requests_running"] == 0


def test_bad_request_raises_before_any_output_and_engine_keeps_serving(tiny):
    _, engine = tiny
    with pytest.raises(ValueError, match="max_model_len"):
        asyncio.run(_collect(engine, [5] * (engine.max_model_len + 1), GREEDY))
    with pytest.raises(ValueError, match="vocabulary"):
        asyncio.run(_collect(engine, [10**9], GREEDY))
    assert _joined(asyncio.run(_collect(engine, "still serving", GREEDY)))[0]


def test_staggered_async_arrivals_match_each_prompt_alone(tiny):
    path, engine = tiny
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 500, (int(n),), generator=g).tolist() for n in torch.randint(1, 90, (40,), generator=g)]
    params = [[GREEDY, SEEDED][i % 2] for i in range(40)]
    with LLM(path, dtype="float32", block_size=8) as llm:
        alone = [llm.generate(p, sp)[0].token_ids for p, sp in zip(prompts, params)]
    delays = random.Random(0).choices([0.0, 0.005, 0.02, 0.05], k=40)

    async def one(i):
        await asyncio.sleep(sum(delays[: i + 1]))
        return _joined(await _collect(engine, prompts[i], params[i]))[0]

    async def run():
        return await asyncio.gather(*(one(i) for i in range(40)))

    assert asyncio.run(run()) == alone


def test_repetition_penalty_matches_transformers(tiny):
    path, engine = tiny
    prompt = engine.tokenizer.encode("the the the the cat cat")
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, repetition_penalty=1.8)
    ours = _joined(asyncio.run(_collect(engine, prompt, params)))[0]
    hf = load_hf(path)
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=12, min_new_tokens=12, do_sample=False,
                          repetition_penalty=1.8, pad_token_id=0)[0, len(prompt):].tolist()
    assert ours == ref
    plain = _joined(asyncio.run(_collect(engine, prompt, GREEDY)))[0]
    assert plain != ours  # the penalty changed something


def test_frequency_and_presence_penalties_steer_away_from_repeats(tiny):
    _, engine = tiny
    prompt = "aaaa"
    plain = _joined(asyncio.run(_collect(engine, prompt, SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))))[0]
    penalized = _joined(asyncio.run(_collect(
        engine, prompt, SamplingParams(max_tokens=30, temperature=0, ignore_eos=True, frequency_penalty=2.0,
                                       presence_penalty=2.0))))[0]
    assert len(set(penalized)) > len(set(plain))


def test_multi_step_streams_in_bursts_with_the_same_tokens_text_and_stop_strings(tiny):
    """num_scheduler_steps=5: deltas carry several tokens, the text still concatenates exactly (multi-byte
    characters split across bursts), and a stop string inside a burst ends the request there."""
    path, engine = tiny
    params = [SamplingParams(max_tokens=40, temperature=1.0, seed=s, ignore_eos=True) for s in range(4)]
    base = asyncio.run(_collect(engine, "The quick brown fox", GREEDY))
    _, text = _joined(base)
    stop = next(text[i : i + 3] for i in range(5, len(text) - 3) if text.find(text[i : i + 3]) == i and text[i : i + 3].strip())
    stopped = SamplingParams(**{**vars(GREEDY), "stop": [stop]})

    async def run(target):
        return await asyncio.gather(*(_collect(target, "Grüße aus München: ", p) for p in params),
                                    _collect(target, "The quick brown fox", stopped))

    multi = AsyncEngine(EngineConfig(model=str(path), dtype="float32", block_size=8, max_num_batched_tokens=64,
                                     num_scheduler_steps=5))
    try:
        bursts = asyncio.run(run(multi))
    finally:
        multi.shutdown()
    for got, want in zip(bursts, asyncio.run(run(engine))):
        assert _joined(got) == _joined(want)
        assert got[-1].finish_reason == want[-1].finish_reason
    assert max(len(u.token_ids) for updates in bursts[:-1] for u in updates) > 1  # really in bursts
    assert bursts[-1][-1].finish_reason == "stop" and _joined(bursts[-1])[1] == text[: text.find(stop)]


def test_next_step_runs_while_outputs_are_processed_and_a_new_prompt_is_prefilled_in_the_next_step(tiny):
    """Overlap: step N+1 is launched between recording step N and detokenizing it. Admission: a prompt that
    arrives while six streams decode gets its first token from the step after the one in flight."""
    _, engine = tiny
    core, events = engine.core, []
    launch, collect, process = core.launch, core.collect_async, engine._process

    async def collect_recorded(plan, refs):
        events.append("collect")
        return await collect(plan, refs)

    core.launch = lambda: (events.append("launch"), launch())[1]
    core.collect_async = collect_recorded
    engine._process = lambda updated: (events.append("process"), process(updated))[1]
    decode = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)

    async def run():
        streams = asyncio.gather(*(_collect(engine, f"{i} go", decode) for i in range(6)))
        deadline = asyncio.get_running_loop().time() + 60
        while engine.loop_times.steps < 5 and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.002)
        arrival = engine.loop_times.steps
        late = engine.generate("a late prompt of a few words", SamplingParams(max_tokens=2, temperature=0))
        first = await asyncio.wait_for(anext(late), timeout=60)
        first_step = engine.loop_times.steps
        rest = [u async for u in late]
        return arrival, first, first_step, rest, await asyncio.wait_for(streams, timeout=120)

    try:
        arrival, first, first_step, rest, streams = asyncio.run(run())
    finally:
        del core.launch, core.collect_async, engine._process  # the instance attributes set above
    assert first.token_ids and rest[-1].finished and all(len(_joined(s)[0]) == 30 for s in streams)
    assert arrival >= 5 and first_step - arrival <= 2, (arrival, first_step)
    overlapped = sum(events[i:i + 3] == ["collect", "launch", "process"] for i in range(len(events)))
    assert overlapped >= 25, events[:40]

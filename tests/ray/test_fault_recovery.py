"""Surviving a failed data-plane actor: SIGKILL an actor's process (its pid from `ready()`) and every request
still finishes with the tokens (and logprobs) of a failure-free run on the same engine; past the restart budget,
or when the replacement cannot load, the instance goes down with the cause. One engine per topology."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import time

import pytest
import ray
import torch

from hf_reference import MAVERICK_LIKE, write_hf_checkpoint
from llama4serve.cluster import LLM, SamplingParams
from llama4serve.cluster.errors import DataPlaneError

NEW_TOKENS = 24


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_hf_checkpoint(tmp_path_factory.mktemp("recovery"), MAVERICK_LIKE)


def _engine(path, a: int, e: int, **kwargs) -> LLM:
    kwargs = {"collective_timeout_s": 30, **kwargs}
    return LLM(path, attention_actors=a, expert_actors=e, dtype="float32", block_size=8, num_scheduler_steps=1,
               **kwargs)


@pytest.fixture(scope="module")
def engine_1x2(ray_session, checkpoint, tmp_path_factory):
    path = tmp_path_factory.mktemp("own") / "ckpt"  # its own copy: the last test deletes a shard file
    shutil.copytree(checkpoint, path)
    with _engine(path, 1, 2, max_actor_restarts=10) as llm:
        yield llm


@pytest.fixture(scope="module")
def engine_2x2(ray_session, checkpoint):
    # No prefix cache here: the failure-free run would cache the prompts, and the kill must land mid-prefill.
    with _engine(checkpoint, 2, 2, max_num_batched_tokens=32, enable_prefix_caching=False) as llm:
        yield llm


def _requests() -> tuple[list[list[int]], list[SamplingParams]]:
    g = torch.Generator().manual_seed(11)
    prompts = [torch.randint(3, 290, (n,), generator=g).tolist() for n in (37, 9, 21, 4)]
    greedy = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True, logprobs=True)
    seeded = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.9, top_p=0.9, seed=1234, ignore_eos=True,
                            logprobs=True)
    return prompts, [greedy, seeded, greedy, seeded]


def _pid(llm: LLM, name: str) -> int:
    return llm.engine.data_plane.actor_info[name]["pid"]


def _kill_during_next_step(llm: LLM, *names: str) -> list[int]:
    """SIGKILLs the actors `names` right after the next step is launched, while its calls run."""
    data_plane, pids = llm.engine.data_plane, [_pid(llm, n) for n in names]
    launch = data_plane.launch

    def launch_then_kill(*args, **kwargs):
        data_plane.launch = launch  # once
        refs = launch(*args, **kwargs)
        for pid in pids:
            os.kill(pid, 9)
        return refs

    data_plane.launch = launch_then_kill
    return pids


def _assert_same(outs, expected) -> None:
    for out, ref in zip(outs, expected):
        assert out.token_ids == ref.token_ids
        torch.testing.assert_close(torch.tensor(out.logprobs), torch.tensor(ref.logprobs), atol=1e-4, rtol=0)


def _run(llm: LLM, kills: dict[int, tuple[str, ...]], prompts=None, params=None) -> tuple[list, list]:
    """Generates the requests, killing kills[k] during step k; (completions, failure-free completions)."""
    if prompts is None:
        prompts, params = _requests()
    expected = llm.generate(prompts, params)
    states = [llm.add_request(p, q) for p, q in zip(prompts, params)]
    step, before = 0, llm.engine.recovery.num_recoveries
    while llm.has_work():
        if step in kills:
            old = _kill_during_next_step(llm, *kills[step])
        llm.step()
        if step in kills:
            assert all(_pid(llm, n) not in old for n in kills[step])  # replaced, same name
        step += 1
    assert llm.engine.recovery.num_recoveries > before
    return [llm.completion(s) for s in states], expected


def test_expert_killed_mid_decode_1x2(engine_1x2, caplog):
    caplog.set_level(logging.WARNING, logger="llama4serve.recovery")
    outs, expected = _run(engine_1x2, {5: ("expert-1",)})
    _assert_same(outs, expected)
    assert "replaced expert-1 (pid" in caplog.text and "in its placement-group bundle" in caplog.text
    data_plane = engine_1x2.engine.data_plane  # the replacement answers to the old name (the Ray dashboard's)
    renamed = ray.get_actor("expert-1", namespace=data_plane.namespace)
    assert ray.get(renamed.ready.remote(), timeout=30)["pid"] == _pid(engine_1x2, "expert-1")
    assert engine_1x2.engine.recovery.budget._times["expert-1"]


def test_two_kills_in_a_row(engine_1x2):
    """Both expert actors at once, then the new expert-1 again on the very next step."""
    outs, expected = _run(engine_1x2, {3: ("expert-0", "expert-1"), 4: ("expert-1",)})
    _assert_same(outs, expected)


def test_kill_while_idle(engine_1x2):
    """The attention actor dies between requests: the next request's step finds it dead and replaces it."""
    llm = engine_1x2
    prompts, params = _requests()
    expected = llm.generate(prompts, params)
    before, pid = llm.engine.recovery.num_recoveries, _pid(llm, "attention-0")
    os.kill(pid, 9)
    time.sleep(1.0)  # idle: nothing notices until the next step
    _assert_same(llm.generate(prompts, params), expected)
    assert llm.engine.recovery.num_recoveries == before + 1 and _pid(llm, "attention-0") != pid


def test_replacement_cannot_load_takes_the_instance_down(engine_1x2):
    """Last on this engine: its shard files are gone, so the new expert-0 fails to load, naming the cause."""
    llm = engine_1x2
    model = llm.engine.config.model
    for shard in os.listdir(model):
        if shard.endswith(".safetensors"):
            os.remove(os.path.join(model, shard))
    llm.add_request([3, 4, 5], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    _kill_during_next_step(llm, "expert-0")
    with pytest.raises(DataPlaneError, match="expert-0 failed .* its replacement could not start: .*safetensors"):
        llm.step()
    with pytest.raises(DataPlaneError, match="this model instance is down: expert-0 failed"):
        llm.generate([1, 2, 3], SamplingParams(max_tokens=2))


def test_expert_killed_mid_decode_2x3(ray_session, checkpoint):
    with _engine(checkpoint, 2, 3) as llm:
        outs, expected = _run(llm, {4: ("expert-2",)})
    _assert_same(outs, expected)


def _other_replica_undisturbed(llm: LLM, victim: str, kill_step: int) -> tuple[list, list, bool, list]:
    """Like `_run` with attention actor `victim` killed during step `kill_step`; also whether the sequences of
    the other attention actor kept their KV (never restarted from position 0), and the victim's sequences at
    the kill as (tokens computed, prompt length, tokens generated)."""
    prompts, params = _requests()
    prompts[0] = prompts[0] * 3  # 111 tokens: a prefill of 4 steps at max_num_batched_tokens=32
    expected = llm.generate(prompts, params)
    states = [llm.add_request(p, q) for p, q in zip(prompts, params)]
    others = [s.seq for s in states if llm.engine._owner[s.seq.seq_id].name != victim]
    mine = [s.seq for s in states if llm.engine._owner[s.seq.seq_id].name == victim]
    assert others and mine
    step, undisturbed, computed, at_kill = 0, True, {}, []
    while llm.has_work():
        if step == kill_step:
            _kill_during_next_step(llm, victim)
            at_kill = [(s.num_computed, len(s.prompt_ids), len(s.output_ids)) for s in mine]
        llm.step()
        for seq in others:
            undisturbed &= seq.num_computed >= computed.get(seq.seq_id, 0)
            computed[seq.seq_id] = seq.num_computed
        step += 1
    return [llm.completion(s) for s in states], expected, undisturbed, at_kill


def test_attention_killed_mid_decode_2x2(engine_2x2):
    llm = engine_2x2
    outs, expected, undisturbed, at_kill = _other_replica_undisturbed(llm, "attention-1", 8)
    _assert_same(outs, expected)
    assert undisturbed and all(generated > 0 for _, _, generated in at_kill)  # decoding


def test_attention_killed_mid_prefill_2x2(engine_2x2):
    """attention-0 holds the 111-token prompt (the first request goes to the least loaded actor): killed
    during its second prefill chunk, its sequences start over on the replacement."""
    llm = engine_2x2
    outs, expected, undisturbed, at_kill = _other_replica_undisturbed(llm, "attention-0", 1)
    _assert_same(outs, expected)
    assert undisturbed and 0 < at_kill[0][0] < at_kill[0][1]  # the long prompt was part-way through prefill


def test_crash_loop_exhausts_the_budget(ray_session, checkpoint):
    with _engine(checkpoint, 1, 1, max_actor_restarts=2, actor_restart_window_s=600) as llm:
        prompts, params = _requests()
        expected = llm.generate(prompts, params)
        states = [llm.add_request(p, q) for p, q in zip(prompts, params)]
        kills = 0
        with pytest.raises(DataPlaneError) as info:
            while llm.has_work():
                _kill_during_next_step(llm, "expert-0")
                kills += 1
                llm.step()
        assert kills == 3  # two replacements, then the budget is spent
        message = str(info.value)
        assert "expert-0 failed (ActorDiedError" in message and "restarted 2 times in the last 600 s" in message
        assert "max_actor_restarts is 2" in message
        for state, ref in zip(states, expected):  # what was produced before the end matches
            assert state.seq.output_ids == ref.token_ids[: len(state.seq.output_ids)]
        with pytest.raises(DataPlaneError, match="this model instance is down: expert-0 failed"):
            llm.generate([1, 2, 3], SamplingParams(max_tokens=2))


def test_hung_actor_is_caught_by_the_collective_timeout(ray_session, checkpoint):
    """SIGSTOP: the process lives but never answers. The other rank's collective times out
    (collective_timeout_s), the stopped actor is declared hung a grace period later, killed and replaced."""
    with _engine(checkpoint, 1, 1, collective_timeout_s=4) as llm:
        prompts, params = _requests()
        expected = llm.generate(prompts, params)
        states = [llm.add_request(p, q) for p, q in zip(prompts, params)]
        llm.step()
        pid = _pid(llm, "expert-0")
        os.kill(pid, signal.SIGSTOP)
        t0 = time.monotonic()
        try:
            llm.step()
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)  # Ray's kill of a stopped process may still be under way
        assert time.monotonic() - t0 < 4 + 10 + 30  # timeout + grace + the replacement, not the 34 s deadline
        assert _pid(llm, "expert-0") != pid and llm.engine.recovery.num_recoveries == 1
        while llm.has_work():
            llm.step()
        _assert_same([llm.completion(s) for s in states], expected)

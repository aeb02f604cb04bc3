"""Expert-parallel data plane: outputs independent of topology, shard loading, dead-peer errors."""

from __future__ import annotations

import time

import pytest
import ray
import torch

from hf_reference import MAVERICK_LIKE, SCOUT_LIKE, hf_greedy, hf_logprobs, load_hf, write_hf_checkpoint
from llama4serve.actors.model.checkpoint import CheckpointReader
from llama4serve.actors.model.config import load_model_config
from llama4serve.actors.model.experts import LocalExperts, expert_split
from llama4serve.actors.step_io import PING_PONG_MIN_ROWS
from llama4serve.cluster import LLM, SamplingParams
from llama4serve.cluster.errors import DataPlaneError

# (attention actors, expert actors, transport): on one machine "auto" is shared memory, whose expert actors serve
# in a standing loop; the collective (gloo all_to_all) gets a call per step
TOPOLOGIES = [(1, 0, "auto"), (1, 1, "auto"), (1, 2, "auto"), (2, 3, "auto"), (3, 2, "auto"), (2, 2, "collective")]
NEW_TOKENS = 12


@pytest.fixture(scope="module", params=["scout", "maverick"])
def checkpoint(request, tmp_path_factory):
    text = SCOUT_LIKE if request.param == "scout" else MAVERICK_LIKE
    path = write_hf_checkpoint(tmp_path_factory.mktemp(request.param), text)
    return path, load_hf(path)


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(5)
    return [torch.randint(3, 290, (n,), generator=g).tolist() for n in (41, 7, 23, 2, 34)]


def test_outputs_independent_of_topology(ray_session, checkpoint):
    path, hf = checkpoint
    prompts = _prompts()
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True, prompt_logprobs=True)
    expected_tokens = [hf_greedy(hf, p, NEW_TOKENS) for p in prompts]
    expected_lp = [hf_logprobs(hf, p) for p in prompts]
    for a, e, transport in TOPOLOGIES:
        with LLM(path, attention_actors=a, expert_actors=e, dtype="float32", block_size=8,
                 expert_transport=transport) as llm:
            outs = llm.generate(prompts, params)
            assert all(r.num_assigned >= 1 for r in llm.engine.replicas)  # spread over the attention actors
            assert len(llm.engine.data_plane.experts) == e
        for out, tokens, lp in zip(outs, expected_tokens, expected_lp):
            assert out.token_ids == tokens, f"{a}x{e} {transport}"
            torch.testing.assert_close(torch.tensor(out.prompt_logprobs[1:]), lp, atol=1e-3, rtol=0)


def test_ping_pong_micro_batches_give_one_batchs_outputs(ray_session, checkpoint):
    """10 sequences decoding on one attention actor with ping_pong: from PING_PONG_MIN_ROWS rows a decode step
    exchanges each MoE layer's rows as two micro-batches, one per lane of the shared-memory exchange. Tokens and
    logprobs are those of the experts-local instance."""
    path, _ = checkpoint
    g = torch.Generator().manual_seed(9)
    prompts = [torch.randint(3, 290, (n,), generator=g).tolist() for n in range(3, 13)]
    assert len(prompts) >= PING_PONG_MIN_ROWS
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True, logprobs=2)
    with LLM(path, attention_actors=1, expert_actors=0, dtype="float32") as llm:
        expected = llm.generate(prompts, params)
    with LLM(path, attention_actors=1, expert_actors=2, dtype="float32", ping_pong=True) as llm:
        outs = llm.generate(prompts, params)
        lanes = ray.get(llm.engine.data_plane.attention[0].__ray_call__.remote(
            lambda actor: [lane.seq for lane in actor.router.exchange.lanes]))
    assert len(lanes) == 2 and lanes[1] > 0, lanes  # the second lane carried the other halves
    for out, ref in zip(outs, expected):
        assert out.token_ids == ref.token_ids
        torch.testing.assert_close(torch.tensor(out.logprobs), torch.tensor(ref.logprobs), atol=1e-4, rtol=0)


def test_a_new_group_stops_the_running_loops(ray_session, checkpoint):
    """Re-forming the process group of a healthy instance (what a recovery does for the survivors) stops the
    expert actors' standing loops, each returning the rows it served, and new loops serve the same tokens."""
    path, _ = checkpoint
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    with LLM(path, attention_actors=1, expert_actors=2, dtype="float32") as llm:
        before = [out.token_ids for out in llm.generate(_prompts()[:2], params)]
        data_plane = llm.engine.data_plane
        old = list(data_plane.loops)
        assert len(old) == 2
        data_plane.start_group()
        assert sum(ray.get(old, timeout=60)) > 0 and data_plane.loops != old
        assert [out.token_ids for out in llm.generate(_prompts()[:2], params)] == before


def test_expert_split_uneven():
    assert expert_split(16, 3) == [(0, 6), (6, 11), (11, 16)]
    assert expert_split(16, 16)[-1] == (15, 16)
    with pytest.raises(ValueError, match="expert_actors is 17; allowed 1..16"):
        expert_split(16, 17)


def test_shard_reads_only_its_experts(tmp_path):
    path = write_hf_checkpoint(tmp_path, SCOUT_LIKE)
    cfg = load_model_config(path)
    per_expert = 3 * cfg.hidden_size * cfg.intermediate_size * 4  # gate_up + down, float32
    total = per_expert * cfg.num_experts * len(cfg.moe_layers)
    for e0, e1 in expert_split(cfg.num_experts, 3):
        reader = CheckpointReader(path)
        experts = LocalExperts(cfg, reader, e0, e1, torch.float32)
        share = total * (e1 - e0) / cfg.num_experts
        assert reader.bytes_read <= 1.1 * share, (reader.bytes_read, share)
        # and exactly the right experts: equal to the same rows of the full tensor
        full = CheckpointReader(path).get("language_model.model.layers.0.feed_forward.experts.gate_up_proj", torch.float32)
        assert torch.equal(experts.gate_up[0], full[e0:e1])


def test_dead_expert_actor_raises_within_timeout(ray_session, tmp_path):
    path = write_hf_checkpoint(tmp_path, MAVERICK_LIKE)
    llm = LLM(path, attention_actors=1, expert_actors=2, dtype="float32", collective_timeout_s=8,
              max_actor_restarts=0)  # fail-stop; recovery: test_fault_recovery.py
    try:
        engine = llm
        engine.add_request(list(range(3, 40)), SamplingParams(max_tokens=500, temperature=0, ignore_eos=True))
        engine.step()
        ray.kill(llm.engine.data_plane.experts[1])
        t0 = time.monotonic()
        with pytest.raises(DataPlaneError, match="expert|died|did not finish"):
            while engine.has_work():
                engine.step()
        assert time.monotonic() - t0 < 8 + 30 + 10
        with pytest.raises(DataPlaneError, match="this model instance is down"):
            llm.generate([1, 2, 3], SamplingParams(max_tokens=2))
    finally:
        llm.shutdown()

"""Defaults that fit the model and the cluster: the block size follows attention_chunk_size, and a topology
that can never be placed fails at once with the shortfall and the fix."""

from __future__ import annotations

import time

import pytest
import torch

from hf_reference import SCOUT_LIKE, hf_greedy, hf_logprobs, load_hf, write_hf_checkpoint
from llama4serve.cluster import LLM, SamplingParams
from llama4serve.cluster.engine.block_manager import default_block_size
from llama4serve.cluster.engine.data_plane import check_fits

NEW_TOKENS = 10


def test_default_block_size_divides_the_chunk():
    assert [default_block_size(c) for c in (8192, 16, 8, 4, 12, 6, 3, None)] == [16, 16, 8, 4, 4, 2, 1, 16]


@pytest.mark.parametrize("chunk", [8, 4])
def test_small_chunk_default_block_size_matches_transformers(ray_session, tmp_path, chunk):
    path = write_hf_checkpoint(tmp_path, dict(SCOUT_LIKE, attention_chunk_size=chunk))
    hf = load_hf(path)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 290, (n,), generator=g).tolist() for n in (19, 5)]
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True, prompt_logprobs=True)
    for expert_actors in (0, 2):
        with LLM(path, expert_actors=expert_actors, dtype="float32") as llm:  # no block_size given
            assert llm.engine.block_size == chunk
            outs = llm.generate(prompts, params)
        for prompt, out in zip(prompts, outs):
            assert out.token_ids == hf_greedy(hf, prompt, NEW_TOKENS), f"1x{expert_actors}"
            torch.testing.assert_close(torch.tensor(out.prompt_logprobs[1:]), hf_logprobs(hf, prompt),
                                       atol=1e-3, rtol=0)


def test_explicit_block_size_that_does_not_divide_is_refused(ray_session, tmp_path):
    path = write_hf_checkpoint(tmp_path, dict(SCOUT_LIKE, attention_chunk_size=8))
    with pytest.raises(ValueError, match=r"block_size is 16; it must divide attention_chunk_size \(8\)"):
        LLM(path, dtype="float32", block_size=16)


def test_unplaceable_topology_fails_at_once(ray_session, tmp_path):
    path = write_hf_checkpoint(tmp_path, SCOUT_LIKE)
    total = int(ray_session.cluster_resources()["CPU"])
    start = time.monotonic()
    with pytest.raises(RuntimeError) as err:
        LLM(path, attention_actors=1, expert_actors=total, dtype="float32")
    assert time.monotonic() - start < 5
    assert str(err.value) == (
        f"{total + 1} actors need {total + 1} CPU; this Ray cluster has {total} in total: start Ray with more "
        "logical CPUs (ray.init(num_cpus=...)) or lower num_cpus_per_actor"
    )
    assert not ray_session.util.placement_group_table() or all(
        pg["state"] == "REMOVED" for pg in ray_session.util.placement_group_table().values()
    )


def test_check_fits_names_each_resource():
    bundles = [{"CPU": 1.0, "GPU": 1.0, "node_a": 1.0}] * 3
    check_fits(bundles, {"CPU": 3, "GPU": 3, "node_a": 3}, shared_local=False)
    with pytest.raises(RuntimeError, match=r"3 actors need 3 GPU; this Ray cluster has 2 in total: add GPU nodes"):
        check_fits(bundles, {"CPU": 8, "GPU": 2, "node_a": 3}, shared_local=False)
    with pytest.raises(RuntimeError, match=r"need 3 node_a; .* has 0 in total: add nodes with the custom resource"):
        check_fits(bundles, {"CPU": 8, "GPU": 8}, shared_local=False)
    with pytest.raises(RuntimeError, match=r"earlier instance that is still running: shut that one down first"):
        check_fits(bundles, {"CPU": 2, "GPU": 8, "node_a": 3}, shared_local=True)


GROW_SCRIPT = """
import sys, time
from llama4serve.cluster import LLM, SamplingParams
path, params = sys.argv[1], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
first = LLM(path, attention_actors=1, expert_actors=2, dtype="float32")
tokens = first.generate([[5, 6, 7]], params)[0].token_ids
start = time.monotonic()
try:
    LLM(path, attention_actors=2, expert_actors=3, dtype="float32")
except RuntimeError as err:
    print("REFUSED", round(time.monotonic() - start, 1), err)
first.shutdown()
with LLM(path, attention_actors=2, expert_actors=3, dtype="float32") as second:  # grows the local Ray
    assert second.generate([[5, 6, 7]], params)[0].token_ids == tokens
print("GREW")
"""


def test_local_ray_grows_for_a_later_instance(tmp_path):
    """The process starts its own Ray (no shared cluster): a later, larger instance either grows it (when the
    earlier one is shut down) or is refused at once, saying why."""
    import subprocess
    import sys

    path = write_hf_checkpoint(tmp_path, SCOUT_LIKE)
    run = subprocess.run([sys.executable, "-c", GROW_SCRIPT, str(path)], capture_output=True, text=True, timeout=300,
                         env={**__import__("os").environ, "RAY_ADDRESS": ""})
    assert run.returncode == 0, run.stderr[-3000:]
    refused = next(line for line in run.stdout.splitlines() if line.startswith("REFUSED"))
    assert float(refused.split()[1]) < 5
    assert "5 actors need 5 CPU" in refused and "shut that one down first" in refused
    assert run.stdout.strip().endswith("GREW")

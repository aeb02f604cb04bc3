"""Parity with transformers' Llama 4 on random checkpoints that transformers writes (float32)."""

from __future__ import annotations

import pytest
import torch

from hf_reference import MAVERICK_LIKE, SCOUT_LIKE, hf_greedy, hf_logprobs, load_hf, write_hf_checkpoint
from llama4serve.cluster import LLM, SamplingParams

NEW_TOKENS = 24


def _prompts(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    # 70 tokens = 4+ attention chunks of 16; the others end mid-chunk and on a boundary.
    return [torch.randint(3, vocab - 30, (n,), generator=g).tolist() for n in (70, 37, 16, 5)]


@pytest.fixture(scope="module", params=["scout", "maverick"])
def checkpoint(request, tmp_path_factory):
    text = SCOUT_LIKE if request.param == "scout" else MAVERICK_LIKE
    path = write_hf_checkpoint(tmp_path_factory.mktemp(request.param), text)
    return path, load_hf(path)


def test_greedy_and_prompt_logprobs_match_transformers(ray_session, checkpoint):
    path, hf = checkpoint
    prompts = _prompts(SCOUT_LIKE["vocab_size"])
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True, prompt_logprobs=True, logprobs=True)
    with LLM(path, dtype="float32", block_size=8) as llm:
        batch = llm.generate(prompts, params)
        singles = [llm.generate(p, params)[0] for p in prompts]
        # Decode through the KV cache equals recomputing from scratch: score prompt + output in one prefill.
        rescored = llm.generate([p + c.token_ids for p, c in zip(prompts, batch)],
                                SamplingParams(max_tokens=0, prompt_logprobs=True))
    for prompt, out, single, again in zip(prompts, batch, singles, rescored):
        assert out.token_ids == hf_greedy(hf, prompt, NEW_TOKENS)
        ref = hf_logprobs(hf, prompt)
        assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
        torch.testing.assert_close(torch.tensor(out.prompt_logprobs[1:]), ref, atol=1e-3, rtol=0)
        assert single.token_ids == out.token_ids
        torch.testing.assert_close(torch.tensor(single.logprobs), torch.tensor(out.logprobs), atol=1e-4, rtol=0)
        recomputed = torch.tensor(again.prompt_logprobs[len(prompt):])
        torch.testing.assert_close(torch.tensor(out.logprobs), recomputed, atol=1e-4, rtol=0)
        assert out.finish_reason == "length"

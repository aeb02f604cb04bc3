"""The public LLM API end to end on our own tiny checkpoints: text prompts, stops, seeds, logprobs."""

from __future__ import annotations

import pytest
import torch

from hf_reference import hf_greedy, load_hf
from llama4serve.cluster import LLM, SamplingParams
from llama4serve.cluster.checkpoints.maker import write_checkpoint

PROMPTS = ["The quick brown fox", "Llama 4 uses a mixture of experts, and", "héllo wörld 你好"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, ray_session):
    path = write_checkpoint(tmp_path_factory.mktemp("tiny") / "tiny-maverick", "tiny-maverick")
    with LLM(path, dtype="float32") as llm:
        yield path, llm


def test_text_prompts_match_transformers_greedy(tiny):
    path, llm = tiny
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))
    hf = load_hf(path)
    for prompt, out in zip(PROMPTS, outs):
        ids = llm.tokenizer.encode(prompt)
        assert out.prompt_token_ids == ids and ids[0] == llm.tokenizer.bos_token_id
        assert out.token_ids == hf_greedy(hf, ids, 20)
        assert out.text == llm.tokenizer.decode(out.token_ids)


def test_stop_string_and_stop_token(tiny):
    _, llm = tiny
    base = llm.generate(PROMPTS[0], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))[0]
    text = base.text
    stop = next(text[i : i + 2] for i in range(4, len(text) - 2) if text[i : i + 2].strip() and text.find(text[i : i + 2]) == i)
    out = llm.generate(PROMPTS[0], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, stop=[stop]))[0]
    assert out.finish_reason == "stop" and stop not in out.text and out.text == text[: text.find(stop)]
    token = base.token_ids[5]
    out = llm.generate(PROMPTS[0], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, stop_token_ids=[token]))[0]
    assert out.finish_reason == "stop" and out.token_ids == base.token_ids[: base.token_ids.index(token) + 1]


def test_seeded_sampling_is_independent_of_the_batch(tiny):
    _, llm = tiny
    params = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, top_k=50, seed=1234, ignore_eos=True)
    alone = llm.generate(PROMPTS[1], params)[0].token_ids
    others = SamplingParams(max_tokens=16, temperature=0.7, seed=5, ignore_eos=True)
    batched = llm.generate(PROMPTS, [others, params, others])[1].token_ids
    assert alone == batched
    other_seed = llm.generate(PROMPTS[1], SamplingParams(max_tokens=16, temperature=1.0, seed=99, ignore_eos=True))[0]
    assert other_seed.token_ids != alone


def test_logprobs_and_scoring(tiny):
    _, llm = tiny
    out = llm.generate(PROMPTS[2], SamplingParams(max_tokens=6, temperature=0, logprobs=3, ignore_eos=True))[0]
    assert len(out.logprobs) == len(out.top_logprobs) == 6
    for token, lp, top in zip(out.token_ids, out.logprobs, out.top_logprobs):
        assert len(top) == 3 and top[0][0] == token and abs(top[0][1] - lp) < 1e-6  # greedy = most likely
        assert top[0][1] >= top[1][1] >= top[2][1]
    scored = llm.generate(PROMPTS[2], SamplingParams(max_tokens=0, prompt_logprobs=True))[0]
    assert scored.token_ids == [] and scored.finish_reason == "length"
    assert scored.prompt_logprobs[0] is None and len(scored.prompt_logprobs) == len(scored.prompt_token_ids)
    assert all(lp <= 0 for lp in scored.prompt_logprobs[1:])
    assert torch.isfinite(torch.tensor(scored.prompt_logprobs[1:])).all()

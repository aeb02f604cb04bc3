"""A quantized checkpoint serves the same outputs, within float tolerance, as a float checkpoint holding its
dequantized weights, on 1x0 and 1x2 topologies; that float copy is checked against transformers."""

from __future__ import annotations

import pytest
import torch

from hf_reference import hf_greedy, hf_logprobs, load_hf
from llama4serve.cluster import LLM, SamplingParams
from llama4serve.cluster.checkpoints.maker import write_checkpoint
from llama4serve.cluster.checkpoints.quantize import write_dequantized_copy

NEW_TOKENS = 8
TOPOLOGIES = [(1, 0), (1, 2)]


@pytest.fixture(scope="module", params=[("fp8", "tiny-maverick"), ("int4", "tiny-scout")], ids=lambda p: p[0])
def checkpoints(request, tmp_path_factory):
    scheme, preset = request.param
    root = tmp_path_factory.mktemp(scheme)
    quantized = write_checkpoint(root / "q", preset, quantize=scheme)
    copy = write_dequantized_copy(quantized, root / "float")
    return quantized, copy, load_hf(copy)


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(3)
    return [torch.randint(3, 250, (n,), generator=g).tolist() for n in (29, 6, 17)]


def test_quantized_matches_its_float_copy_and_transformers(ray_session, checkpoints):
    quantized, copy, hf = checkpoints
    prompts = _prompts()
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True, prompt_logprobs=True)
    expected_tokens = [hf_greedy(hf, p, NEW_TOKENS) for p in prompts]
    expected_lp = [hf_logprobs(hf, p) for p in prompts]
    with LLM(copy, dtype="float32", block_size=8) as llm:  # the float copy against transformers
        for out, tokens, lp in zip(llm.generate(prompts, params), expected_tokens, expected_lp):
            assert out.token_ids == tokens
            torch.testing.assert_close(torch.tensor(out.prompt_logprobs[1:]), lp, atol=1e-3, rtol=0)
    for a, e in TOPOLOGIES:
        with LLM(quantized, attention_actors=a, expert_actors=e, dtype="float32", block_size=8) as llm:
            outs = llm.generate(prompts, params)
        for out, tokens, lp in zip(outs, expected_tokens, expected_lp):
            assert out.token_ids == tokens, f"{a}x{e}"
            torch.testing.assert_close(torch.tensor(out.prompt_logprobs[1:]), lp, atol=1e-3, rtol=0)

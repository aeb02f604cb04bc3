"""Prompt logprobs with their top alternatives (`prompt_logprobs=n`; OpenAI `echo` + `logprobs=n`), checked
against a transformers forward pass on the same checkpoint: through `LLM.generate` (one step, chunked prefill
across steps, preemption and recompute) and through the real Serve app with the `openai` client."""

from __future__ import annotations

import socket

import pytest
import torch
from openai import OpenAI

from hf_reference import SCOUT_LIKE, load_hf, write_hf_checkpoint
from llama4serve.cluster import LLM, SamplingParams
from llama4serve.cluster.checkpoints.maker import write_checkpoint
from llama4serve.cluster.serving.openai.formatters import TokenText
from llama4serve.cluster.cli.serve_cmd import APP_NAME, start_serve
from llama4serve.cluster.serving.serve_config import ServeConfig
from llama4serve.cluster.inputs.tokenizer import Tokenizer

ATOL = 1e-3  # as the other logprob parity tests (float32, different op order than transformers)


@torch.no_grad()
def hf_log_softmax(model, ids: list[int]) -> torch.Tensor:
    """log_softmax of the next-token logits after each prefix ids[:i + 1], one forward without a cache. [L, V]"""
    return torch.log_softmax(model(input_ids=torch.tensor([ids]), use_cache=False).logits[0].float(), -1)


def assert_top_matches(top: list[tuple[int, float]], ref_row: torch.Tensor, n: int) -> None:
    """top: our n (id, logprob) at one position, most likely first; ref_row: the reference's log_softmax [V]."""
    ref_values, ref_ids = ref_row.topk(n)
    assert len(top) == n
    torch.testing.assert_close(torch.tensor([v for _, v in top]), ref_values, atol=ATOL, rtol=0)
    for (token_id, value), ref_id in zip(top, ref_ids.tolist()):
        if token_id != ref_id:  # only a near-tie may swap ids; then both are the reference's top-n values
            assert abs(value - float(ref_row[token_id])) < ATOL and abs(value - float(ref_row[ref_id])) < ATOL
        torch.testing.assert_close(value, float(ref_row[token_id]), atol=ATOL, rtol=0)


def assert_prompt_matches(completion, prompt: list[int], ref: torch.Tensor, n: int) -> None:
    assert completion.prompt_logprobs[0] is None and completion.prompt_top_logprobs[0] is None
    assert len(completion.prompt_logprobs) == len(completion.prompt_top_logprobs) == len(prompt)
    expected = ref[:-1].gather(1, torch.tensor(prompt[1:])[:, None]).squeeze(1)
    torch.testing.assert_close(torch.tensor(completion.prompt_logprobs[1:]), expected, atol=ATOL, rtol=0)
    for i in range(1, len(prompt)):
        assert_top_matches(completion.prompt_top_logprobs[i], ref[i - 1], n)


def test_sampling_params_prompt_logprobs_values():
    assert [SamplingParams(prompt_logprobs=v).num_prompt_logprobs for v in (False, None, True, 0, 3, 20)] == \
        [None, None, 0, 0, 3, 20]
    assert SamplingParams(prompt_logprobs=0).prompt_logprobs is True  # stored as True, as documented
    for bad in (21, -1, 1.5, "2"):
        with pytest.raises(ValueError, match="prompt_logprobs"):
            SamplingParams(prompt_logprobs=bad)


def test_completion_formatter_lists_prompt_alternatives(tmp_path):
    """Unit: the echo entries of a response with prompt_top_logprobs (the token itself first, then its
    alternatives; None at the first position; no alternatives and no engine output: the token alone)."""
    from llama4serve.cluster.serving.openai.protocol import CompletionRequest
    from llama4serve.cluster.serving.openai.formatters import CompletionFormatter
    from llama4serve.cluster.outputs import RequestOutput
    from llama4serve.cluster.checkpoints.tokenizer_files import write_tokenizer_files

    write_tokenizer_files(tmp_path, 64)
    tok = Tokenizer.from_dir(tmp_path)
    tt, ids = TokenText(tok), tok.encode("ab cd")
    body = CompletionRequest(model="m", prompt="ab cd", echo=True, logprobs=2, max_tokens=0)
    other = next(t for t in range(300) if t not in ids)
    # odd positions: the token itself is the second most likely; even ones: it is not among the top 2
    top = [None] + [[(ids[0], -0.25), (ids[k], -1.0) if k % 2 else (other, -1.5)] for k in range(1, len(ids))]
    out = RequestOutput("r", ids, [], "", True, "length", [], None, [None] + [-1.0] * (len(ids) - 1), 0, top)
    formatter = CompletionFormatter("cmpl-1", "m", tok, ["ab cd"], body)
    formatter.add(0, out)
    entries = formatter.response()["choices"][0]["logprobs"]["top_logprobs"]
    assert entries[0] is None
    for k in range(1, len(ids)):
        expected = {tt.token(ids[k]): -1.0}
        for t, v in top[k]:
            expected.setdefault(tt.token(t), v)
        assert list(entries[k].items()) == list(expected.items())  # the token itself first
        assert len(entries[k]) == (2 if k % 2 else 3)
    assert len(ids) > 3


# ------------------------------------------------------------------------------------------------- Python API
@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory):
    path = write_hf_checkpoint(tmp_path_factory.mktemp("prompt-top"), SCOUT_LIKE)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 290, (n,), generator=g).tolist() for n in (45, 9, 17, 2)]
    return path, load_hf(path), prompts


def test_prompt_logprobs_n_match_transformers(ray_session, hf_checkpoint):
    path, hf, prompts = hf_checkpoint
    with LLM(path, dtype="float32", block_size=8) as llm:
        outs = llm.generate(prompts, SamplingParams(max_tokens=3, temperature=0, ignore_eos=True, prompt_logprobs=3))
        plain = llm.generate(prompts[1], SamplingParams(max_tokens=0, prompt_logprobs=True))[0]
        zero = llm.generate(prompts[1], SamplingParams(max_tokens=0, prompt_logprobs=0))[0]
    for prompt, out in zip(prompts, outs):
        assert_prompt_matches(out, prompt, hf_log_softmax(hf, prompt), 3)
        assert len(out.token_ids) == 3 and out.top_logprobs is None  # generated tokens: not asked for
    # True (and 0, as in vLLM) still mean one float per prompt token and no alternatives.
    assert plain.prompt_top_logprobs is None and zero.prompt_top_logprobs is None
    assert plain.prompt_logprobs == zero.prompt_logprobs
    torch.testing.assert_close(torch.tensor(plain.prompt_logprobs[1:]), torch.tensor(outs[1].prompt_logprobs[1:]),
                               atol=1e-5, rtol=0)


def test_prompt_logprobs_n_across_chunked_prefill_and_preemption(ray_session, hf_checkpoint):
    """A 45-token prompt in steps of at most 16 tokens gives each position once, in order; so does a prompt
    whose sequence is preempted and recomputed (a KV cache too small for the batch)."""
    path, hf, prompts = hf_checkpoint
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, prompt_logprobs=2)
    with LLM(path, dtype="float32", block_size=8, max_num_batched_tokens=16, num_full_blocks=16,
             num_chunk_blocks=9) as llm:
        engine = llm
        steps = []
        for p in prompts:  # one at a time: chunked prefill alone
            seq = (state := engine.add_request(p, params)).seq
            while engine.has_work():
                steps.append(seq.num_computed)
                engine.step()
            steps.append(seq.num_computed)
            assert_prompt_matches(engine.completion(state), p, hf_log_softmax(hf, p), 2)
        assert [0, 16, 32] == steps[:3] and steps[3] >= 45  # the first prompt took three prefill steps
        states = [engine.add_request(p, params) for p in prompts * 2]
        seqs = [s.seq for s in states]  # together: the cache holds 128 tokens
        while engine.has_work():
            engine.step()
        assert sum(s.num_preemptions for s in seqs) > 0
        for state, seq in zip(states, seqs):
            assert_prompt_matches(engine.completion(state), seq.prompt_ids, hf_log_softmax(hf, seq.prompt_ids), 2)


# ------------------------------------------------------------------------------------------ the real server
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(ray_session, tmp_path_factory):
    from ray import serve

    model = write_checkpoint(tmp_path_factory.mktemp("serve-top") / "tiny-maverick", "tiny-maverick")
    config = ServeConfig(model=str(model), dtype="float32", http_port=_free_port(), grpc_port=_free_port(),
                         max_model_len=256)
    start_serve(config)
    client = OpenAI(base_url=f"http://127.0.0.1:{config.http_port}/v1", api_key="EMPTY", max_retries=0)
    tokenizer = Tokenizer.from_dir(model)
    yield client, tokenizer, TokenText(tokenizer), load_hf(model)
    serve.delete(APP_NAME)
    serve.shutdown()


PROMPT = "The llama eats grass, and then it sleeps"


def _expected_entry(tt: TokenText, token_id: int, ref_row: torch.Tensor, n: int) -> dict[str, float]:
    """The `top_logprobs` entry of a token: itself, then the reference's n most likely tokens."""
    values, ids = ref_row.topk(n)
    entry = {tt.token(token_id): float(ref_row[token_id])}
    for t, v in zip(ids.tolist(), values.tolist()):
        entry.setdefault(tt.token(t), v)
    return entry


def _assert_entries(lp, ids: list[int], ref: torch.Tensor, tt: TokenText, n: int) -> None:
    assert lp.tokens == [tt.token(i) for i in ids] and len(lp.top_logprobs) == len(ids)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    for i in range(1, len(ids)):
        top, token = lp.top_logprobs[i], lp.tokens[i]
        expected = _expected_entry(tt, ids[i], ref[i - 1], n)
        in_top = ids[i] in ref[i - 1].topk(n).indices.tolist()
        assert len(top) == (n if in_top else n + 1) and set(top) == set(expected)
        assert top[token] == lp.token_logprobs[i]  # the prompt token's own logprob, as token_logprobs says
        for key, value in expected.items():
            assert top[key] == pytest.approx(value, abs=ATOL)


def test_echo_logprobs_list_prompt_alternatives(server):
    client, tokenizer, tt, hf = server
    ids = tokenizer.encode(PROMPT)
    out = client.completions.create(model="tiny-maverick", prompt=PROMPT, echo=True, logprobs=2, max_tokens=0)
    choice = out.choices[0]
    assert choice.text == PROMPT
    _assert_entries(choice.logprobs, ids, hf_log_softmax(hf, ids), tt, 2)
    # With the prompt as token ids the answer is the same.
    again = client.completions.create(model="tiny-maverick", prompt=ids, echo=True, logprobs=2, max_tokens=0)
    assert again.choices[0].logprobs.top_logprobs == choice.logprobs.top_logprobs


def test_echo_logprobs_prompt_then_generated_positions(server):
    client, tokenizer, tt, hf = server
    ids = tokenizer.encode(PROMPT)
    kwargs = dict(model="tiny-maverick", prompt=PROMPT, echo=True, logprobs=2, max_tokens=5, temperature=0,
                  extra_body={"ignore_eos": True})
    out = client.completions.create(**kwargs)
    full = list(ids)
    for _ in range(5):  # the reference's greedy continuation
        full.append(int(hf_log_softmax(hf, full)[-1].argmax()))
    lp = out.choices[0].logprobs
    _assert_entries(lp, full, hf_log_softmax(hf, full), tt, 2)  # prompt positions, then the 5 generated ones
    # Streaming gives the same entries, the prompt positions in the first chunk.
    chunks = list(client.completions.create(**kwargs, stream=True))
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.top_logprobs]
    assert len(chunks[0].choices[0].logprobs.top_logprobs) > len(ids)
    assert len(streamed) == len(lp.top_logprobs) and streamed[0] is None
    for got, want in zip(streamed[1:], lp.top_logprobs[1:]):
        assert set(got) == set(want) and all(got[k] == pytest.approx(want[k], abs=1e-5) for k in got)

"""The step's post-processing (scheduler) and the output processor (text and stop strings), without Ray."""

from __future__ import annotations

import pytest

from llama4serve.actors.step_io import SeqOutput
from llama4serve.cluster.checkpoints.tokenizer_files import write_tokenizer_files
from llama4serve.cluster.engine.block_manager import BlockManager
from llama4serve.cluster.engine.output_processor import OutputProcessor, TextPieces
from llama4serve.cluster.engine.scheduler import Scheduler, Sequence
from llama4serve.cluster.inputs.tokenizer import Tokenizer
from llama4serve.cluster.sampling_params import SamplingParams

EOS = 2


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    write_tokenizer_files(out, model_max_length=4096)
    return Tokenizer.from_dir(out)


def _out(token: int) -> SeqOutput:
    return SeqOutput(0, token_id=token, logprob=-1.0, top_logprobs=[])


def _decoding(params: SamplingParams, max_model_len: int = 1000) -> tuple[Scheduler, Sequence, list]:
    sched = Scheduler(BlockManager(64, 64, 4, 8), 4, 64, eos_ids=frozenset({EOS}), max_model_len=max_model_len)
    seq = Sequence(0, [5, 6, 7], params, seed=0)
    sched.add(seq)
    return sched, seq, sched.schedule()


def test_postprocess_applies_token_stops_and_drops_tokens_after_a_finish():
    sched, seq, scheduled = _decoding(SamplingParams(max_tokens=10, logprobs=True))
    # a multi-step result: 4 decode steps, EOS at the second; what follows it is dropped
    updated = sched.postprocess(scheduled, [[_out(40)], [_out(EOS)], [_out(41)], [_out(42)]], 4)
    assert updated == [seq] and seq.output_ids == [40, EOS] and seq.finish_reason == "stop"
    assert seq.logprobs == [-1.0, -1.0] and not sched.has_work()
    assert sched.blocks.usage() == {"full": 0.0, "chunk": 0.0}
    sched, seq, scheduled = _decoding(SamplingParams(max_tokens=2, ignore_eos=True))
    sched.postprocess(scheduled, [[_out(EOS)], [_out(EOS)], [_out(EOS)]], 3)
    assert seq.output_ids == [EOS, EOS] and seq.finish_reason == "length"
    sched, seq, scheduled = _decoding(SamplingParams(max_tokens=20), max_model_len=5)
    sched.postprocess(scheduled, [[_out(40)], [_out(41)], [_out(42)]], 3)
    assert seq.output_ids == [40, 41] and seq.finish_reason == "length"  # 3 prompt + 2 = max_model_len


def _generate(tokenizer, text: str, stop: list[str], read_every: int):
    """Feeds the ids of `text` one token at a time; reads a delta every `read_every` tokens."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    seq = Sequence(0, [1], SamplingParams(max_tokens=len(ids), stop=stop), seed=0)
    processor = OutputProcessor(tokenizer)
    state = processor.add(seq, "r")
    deltas = []
    for i, token in enumerate(ids):
        seq.output_ids.append(token)
        keep = processor.update(state)
        if keep is not None:
            del seq.output_ids[keep:]
            seq.finish_reason = "stop"
        elif i == len(ids) - 1:
            seq.finish_reason = "length"
            processor.update(state)
        if seq.finish_reason or i % read_every == 0:
            out = processor.delta(state)
            deltas.append(out.text if out else "")
        if seq.finish_reason:
            break
    return "".join(deltas), processor.completion(state), len(ids)


@pytest.mark.parametrize("read_every", [1, 3, 1000])
def test_stop_strings_cut_the_text_and_the_tokens(tokenizer, read_every):
    text = "The llama eats grass. Then it sleeps in the sun, é 🦙 done."
    streamed, done, n = _generate(tokenizer, text, ["sleeps", "zzz"], read_every)
    assert streamed == done.text == "The llama eats grass. Then it "
    assert done.finish_reason == "stop" and len(done.token_ids) < n
    assert "sleeps" in tokenizer.decode(done.token_ids)  # the token completing the stop string is kept
    streamed, done, n = _generate(tokenizer, text, ["zzz"], read_every)
    assert streamed == done.text == text and len(done.token_ids) == n and done.finish_reason == "length"


def test_a_stop_string_across_token_and_delta_boundaries(tokenizer):
    text = "abc def ghi jkl"
    for stop in ["c d", "f g", "i jk", "l"]:
        streamed, done, _ = _generate(tokenizer, text, [stop, "zzzzzzzzzz"], 2)
        assert streamed == done.text == text[: text.index(stop)], stop


def test_text_pieces_slices():
    pieces, whole = TextPieces(), ""
    for part in ["ab", "", "cde", "f", "ghij"]:
        pieces.append(part)
        whole += part
    assert len(pieces) == len(whole)
    for start in range(len(whole) + 1):
        for end in range(start, len(whole) + 1):
            assert pieces.slice(start, end) == whole[start:end]

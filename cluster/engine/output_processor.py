"""The one place text is made (vLLM v1's detokenizer): each request's generated ids are detokenized
incrementally and checked for stop strings as they arrive, one token at a time, so a step costs O(new tokens)
whatever the output length. `LLM` takes the final `Completion` from it, `AsyncEngine` the streamed
`RequestOutput` deltas; both give the same text.
"""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass, field

from llama4serve.cluster.engine.scheduler import Sequence
from llama4serve.cluster.inputs.tokenizer import IncrementalDetokenizer, Tokenizer
from llama4serve.cluster.outputs import Completion, RequestOutput


class TextPieces:
    """Append-only text kept in pieces: appending, and reading a slice near the end, cost O(that text), not
    O(all the text) as `str +=` and slicing a growing string would."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.ends: list[int] = []  # ends[i]: length of the text up to and including parts[i]

    def __len__(self) -> int:
        return self.ends[-1] if self.ends else 0

    def append(self, text: str) -> None:
        if text:
            self.ends.append(len(self) + len(text))
            self.parts.append(text)

    def slice(self, start: int, end: int) -> str:
        i = bisect_right(self.ends, start)
        pos, out = (self.ends[i - 1] if i else 0), []
        while i < len(self.parts) and pos < end:
            part = self.parts[i]
            out.append(part[max(0, start - pos):end - pos])
            pos, i = pos + len(part), i + 1
        return "".join(out)


@dataclass
class RequestState:
    """One request's text so far and what has been handed to its caller."""

    seq: Sequence
    request_id: str
    detokenizer: IncrementalDetokenizer | None
    text: TextPieces = field(default_factory=TextPieces)
    tail: str = ""  # the last characters of the text, where a stop string may have begun
    num_read_ids: int = 0  # generated ids already detokenized
    stop_at: int | None = None  # where a stop string starts in the text: the final text ends there
    num_emitted_ids: int = 0
    num_emitted_chars: int = 0
    sent_first: bool = False

    @property
    def text_end(self) -> int:
        """Length of the final text as far as it is known."""
        return len(self.text) if self.stop_at is None else self.stop_at


class OutputProcessor:
    """Detokenizes and applies stop strings for every request of one engine."""

    def __init__(self, tokenizer: Tokenizer | None):
        self.tokenizer = tokenizer

    def add(self, seq: Sequence, request_id: str) -> RequestState:
        detok = self.tokenizer.detokenizer() if self.tokenizer is not None else None
        return RequestState(seq, request_id, detok)

    def update(self, state: RequestState) -> int | None:
        """Reads the ids the sequence gained; returns how many generated tokens to keep when a stop string
        ended it (the token that completed the stop string is kept, as in vLLM), else None."""
        seq, detok = state.seq, state.detokenizer
        if detok is None:
            state.num_read_ids = len(seq.output_ids)
            return None
        stops = seq.params.stop
        keep = max((len(s) for s in stops), default=1) - 1  # characters of earlier text a stop string may use
        while state.num_read_ids < len(seq.output_ids):
            state.num_read_ids += 1
            delta = detok.add(seq.output_ids[state.num_read_ids - 1:state.num_read_ids])
            if not delta:
                continue
            if stops:
                window, offset = state.tail + delta, len(state.text) - len(state.tail)
                hits = [i for i in (window.find(s) for s in stops) if i >= 0]
                state.tail = window[len(window) - keep:] if keep else ""
                if hits:
                    state.text.append(delta)
                    state.stop_at = offset + min(hits)
                    return state.num_read_ids
            state.text.append(delta)
        if seq.finish_reason is not None and state.stop_at is None:
            state.text.append(detok.flush())
        return None

    def hold_chars(self, state: RequestState) -> int:
        """Text kept back while it could still be the start of a stop string."""
        return max((len(s) for s in state.seq.params.stop), default=1) - 1

    def delta(self, state: RequestState) -> RequestOutput | None:
        """What is new for the caller since the last delta; None when nothing is."""
        seq = state.seq
        finished = seq.finish_reason is not None
        new_ids = seq.output_ids[state.num_emitted_ids:]
        if not new_ids and not finished:
            return None  # prompt logprobs arrive with the first token (prefill and sampling share a step)
        end = state.text_end
        if not finished:
            end = max(state.num_emitted_chars, end - self.hold_chars(state))
        first, start = not state.sent_first, state.num_emitted_ids
        end_ids = start + len(new_ids)
        p = seq.params
        want_logprobs = p.logprobs is not None
        out = RequestOutput(
            request_id=state.request_id,
            prompt_token_ids=seq.prompt_ids,
            token_ids=new_ids,
            text=state.text.slice(state.num_emitted_chars, end),
            finished=finished,
            finish_reason=seq.finish_reason,
            logprobs=seq.logprobs[start:end_ids] if want_logprobs else None,
            top_logprobs=seq.top_logprobs[start:end_ids] if want_logprobs and p.logprobs else None,
            prompt_logprobs=list(seq.prompt_logprobs) if first and p.prompt_logprobs else None,
            num_generated_tokens=end_ids,
            prompt_top_logprobs=list(seq.prompt_top_logprobs) if first and p.num_prompt_logprobs else None,
        )
        state.num_emitted_ids, state.num_emitted_chars = end_ids, end
        state.sent_first = True
        return out

    def completion(self, state: RequestState) -> Completion:
        seq, p = state.seq, state.seq.params
        return Completion(
            request_id=seq.seq_id,
            prompt_token_ids=seq.prompt_ids,
            token_ids=list(seq.output_ids),
            text=state.text.slice(0, state.text_end),
            finish_reason=seq.finish_reason or "abort",
            logprobs=seq.logprobs if p.logprobs is not None else None,
            top_logprobs=seq.top_logprobs if p.logprobs else None,
            prompt_logprobs=seq.prompt_logprobs if p.prompt_logprobs else None,
            prompt_top_logprobs=seq.prompt_top_logprobs if p.num_prompt_logprobs else None,
        )

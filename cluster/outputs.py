"""What `LLM.generate` returns."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Completion:
    request_id: int
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" (EOS, stop token or stop string), "length", "abort"
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None
    prompt_logprobs: list[float | None] | None = None
    # prompt_logprobs=n >= 1: the n most likely (id, logprob) at each prompt position, None for the first
    prompt_top_logprobs: list[list[tuple[int, float]] | None] | None = None


@dataclass
class RequestOutput:
    """One streamed update of a request: what is new since the previous update.

    The concatenated `text` deltas equal the final text (a stop string is never emitted); `token_ids` deltas
    concatenate to all generated ids. The last update has `finished=True`.
    """

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]  # new generated ids
    text: str  # new text
    finished: bool = False
    finish_reason: str | None = None  # "stop", "length", "abort" on the last update
    logprobs: list[float] | None = None  # one per new id, when requested
    top_logprobs: list[list[tuple[int, float]]] | None = None  # one list of (id, logprob) per new id, when n > 0
    prompt_logprobs: list[float | None] | None = None  # in the first update, when requested
    num_generated_tokens: int = 0  # cumulative
    # in the first update, when prompt_logprobs=n >= 1: n (id, logprob) per prompt position, None for the first
    prompt_top_logprobs: list[list[tuple[int, float]] | None] | None = None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

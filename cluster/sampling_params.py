"""Request-level sampling parameters of the public API, validated at construction."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from llama4serve.cluster.inputs.structured import StructuredOutputSpec, spec_from_request

MAX_LOGPROBS = 20


@dataclass
class SamplingParams:
    """Mirrors vLLM's SamplingParams for the fields we support.

    logprobs: None (off), True/0 (log-probability of each generated token), or n in 1..20 (also the n most
    likely alternatives). prompt_logprobs: False/None (off), True/0 (the log-probability of each prompt token,
    None for the first), or n in 1..20 (also the n most likely alternatives at each prompt position, as vLLM);
    stored as False, True or n.
    presence_penalty / frequency_penalty (-2..2) work as in the OpenAI API: subtracted from the logit of every
    token already generated, once / once per occurrence. repetition_penalty (> 0, 1 is off) works as in
    transformers and vLLM: logits of tokens in the prompt or output are divided by it when positive and
    multiplied when negative. Logprobs are always those of the raw model distribution.
    structured_outputs: None (off), a ``StructuredOutputSpec``, or vLLM's mapping with exactly one of ``json``
    (a JSON schema, dict or text), ``regex``, ``choice`` (list of strings), ``grammar`` (EBNF or Lark),
    ``json_object: True``; stored as a spec. The output then matches it (the grammar compiles when the request is
    added: a bad schema, regex or grammar is a ValueError naming the field), and ends when the grammar does.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: bool | int | None = None
    prompt_logprobs: bool | int | None = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    structured_outputs: StructuredOutputSpec | dict[str, Any] | None = None

    def __post_init__(self):
        def bad(name, value, allowed):
            raise ValueError(f"SamplingParams.{name} is {value!r}; allowed {allowed}")

        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 0:
            bad("max_tokens", self.max_tokens, "an integer >= 0")
        if not isinstance(self.temperature, (int, float)) or not 0 <= self.temperature <= 100:
            bad("temperature", self.temperature, "0..100 (0 is greedy)")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            bad("top_p", self.top_p, "(0, 1]")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < -1:
            bad("top_k", self.top_k, "-1 or 0 (off) or a positive integer")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0):
            bad("seed", self.seed, "None or an integer >= 0")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        if any(not isinstance(s, str) or not s for s in self.stop):
            bad("stop", self.stop, "non-empty strings")
        if any(isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            bad("stop_token_ids", self.stop_token_ids, "token ids >= 0")
        if self.logprobs is True:
            self.logprobs = 0
        elif self.logprobs is False:
            self.logprobs = None
        if self.logprobs is not None and (not isinstance(self.logprobs, int) or not 0 <= self.logprobs <= MAX_LOGPROBS):
            bad("logprobs", self.logprobs, f"None, True, or an integer 0..{MAX_LOGPROBS}")
        p = self.prompt_logprobs
        if p is None or p is False or p is True:
            self.prompt_logprobs = bool(p)
        elif not isinstance(p, int) or not 0 <= p <= MAX_LOGPROBS:
            bad("prompt_logprobs", p, f"None, True/False, or an integer 0..{MAX_LOGPROBS}")
        else:
            self.prompt_logprobs = p or True  # 0: the prompt tokens' own logprobs only, as True
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not -2 <= value <= 2:
                bad(name, value, "-2..2")
        r = self.repetition_penalty
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 < r <= 10:
            bad("repetition_penalty", r, "(0, 10] (1 is off)")
        so = self.structured_outputs
        if isinstance(so, dict):
            try:
                self.structured_outputs = spec_from_request(structured_outputs=so)
            except ValueError as e:
                raise ValueError(f"SamplingParams.{e}") from None
        elif so is not None and not isinstance(so, StructuredOutputSpec):
            bad("structured_outputs", so, "None, a StructuredOutputSpec, or a mapping with one of json, regex, "
                "choice, grammar, json_object")

    @property
    def has_penalties(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1

    @property
    def num_prompt_logprobs(self) -> int | None:
        """None: no prompt logprobs; n >= 0: each prompt token's logprob plus n alternatives per position."""
        p = self.prompt_logprobs
        return None if p is False else 0 if p is True else p

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0

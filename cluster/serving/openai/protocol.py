"""Wire shapes of the OpenAI-compatible HTTP API (`/v1/completions`, `/v1/chat/completions`).

Fields and ranges follow the OpenAI API reference; extensions (`top_k`, `repetition_penalty`, `ignore_eos`,
`stop_token_ids`) follow vLLM. Ranges, stop strings and chat roles come from `limits.py`, the table the gRPC
API also checks, so a bad value gets the same message over both (a `limit` error: `<field> is <value>; allowed
<range>`). Models are strict (no `"5"` for 5, no `true` for 1) except that whole-number floats (`16.0`) are
integers, as in JSON Schema; they ignore fields they do not know, as OpenAI-compatible servers do; the few
OpenAI fields whose silent omission would change the answer (`logit_bias`, `suffix`) are declared
and rejected when set. Deployment-dependent limits (`n` <= max_n, `max_tokens` <= max_model_len) are checked by
the routes. Responses are plain dicts built by `formatters.py`; the error shape is in `errors.py`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from llama4serve.cluster.serving import limits
from llama4serve.cluster.serving.openai.fields import (AtLeastOne, ChatMaxTokens, Logprobs, MaxTokens, Penalty,
                                                       RepetitionPenalty, Role, Seed, Temperature, TokenIds, TopK,
                                                       TopP, check_texts, raise_problem)
from llama4serve.cluster.inputs.structured import StructuredOutputSpec, spec_from_request
from llama4serve.cluster.inputs.tool_calls import ToolRequest, tool_call_spec, validate_tool_request
from llama4serve.cluster.sampling_params import SamplingParams

DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
MAX_PROMPTS_PER_REQUEST = 256  # a batch of prompts in one /v1/completions request


def _reject_union(value: Any, handler, message: str):
    """Validate a union field, replacing pydantic's one-error-per-member list by one clear message."""
    try:
        return handler(value)
    except ValidationError:
        raise PydanticCustomError("union_type", message) from None


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Strict):
    include_usage: bool = Field(False, description="Send a last chunk with `usage` and no choices.")


class _SamplingFields(_Strict):
    """Fields shared by both endpoints."""

    model: str = Field(description="The served model's name, as GET /v1/models lists it.")
    n: AtLeastOne = Field(1, description="Completions per prompt (at most the deployment's max_n).")
    temperature: Temperature | None = Field(None, description="0 is greedy; default 1.")
    top_p: TopP | None = Field(None, description="Nucleus sampling mass; default 1.")
    stop: str | list[str] | None = Field(
        None, description=f"Up to {limits.MAX_STOP_STRINGS} strings that end the completion (not returned).")
    seed: Seed | None = Field(None, description="Sampling seed; choice i of n uses seed + i.")
    stream: bool = Field(False, description="Stream server-sent events ending with `data: [DONE]`.")
    stream_options: StreamOptions | None = Field(None, description="Streaming options (`include_usage`).")
    presence_penalty: Penalty = Field(0.0, description="Penalty once per token already generated.")
    frequency_penalty: Penalty = Field(0.0, description="Penalty per occurrence in the output so far.")
    logit_bias: dict[str, float] | None = Field(None, description="Not supported; must be empty.")
    user: str | None = Field(None, description="Accepted and ignored.")
    # extensions (vLLM names)
    top_k: TopK = Field(0, description="Extension: sample among the k most likely tokens; 0 or -1 is off.")
    repetition_penalty: RepetitionPenalty = Field(1.0, description="Extension: transformers-style; 1 is off.")
    ignore_eos: bool = Field(False, description="Extension: keep generating past end-of-sequence tokens.")
    stop_token_ids: TokenIds = Field(default_factory=list, description="Extension: token ids that end the completion.")
    response_format: dict | None = Field(
        None, description="{'type': 'text'}, {'type': 'json_object'} or {'type': 'json_schema', 'json_schema': "
                          "{'name', 'schema', 'strict'}}: the output matches it.")
    structured_outputs: dict | None = Field(
        None, description="Extension (vLLM): exactly one of json (a schema), regex, choice (strings), grammar "
                          "(EBNF or Lark), json_object: true.")

    @field_validator("stop", mode="wrap")
    @classmethod
    def _stop(cls, value, handler):
        value = _reject_union(value, handler, "must be a string or a list of strings")
        stops = [value] if isinstance(value, str) else list(value or [])
        problem = limits.stop_problem(stops)
        if problem is not None and isinstance(value, str):
            problem = limits.Problem(problem.tail)  # one string: no index
        raise_problem(problem)
        check_texts([("" if isinstance(value, str) else f"[{i}]", s) for i, s in enumerate(stops)])
        return value

    @field_validator("stop_token_ids")
    @classmethod
    def _stop_token_ids(cls, value):
        raise_problem(limits.token_ids_problem(value))
        return value

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, value):
        if value:
            raise PydanticCustomError("unsupported", "is not supported by this server; leave it unset")
        return value

    def structured_spec(self) -> StructuredOutputSpec | None:
        """The output constraint of `response_format` / `structured_outputs`; ValueError naming the field."""
        return spec_from_request(self.response_format, self.structured_outputs)

    def sampling_params(self, max_tokens: int, logprobs: int | None, prompt_logprobs: bool = False,
                        structured: StructuredOutputSpec | None = None) -> SamplingParams:
        """Engine parameters of choice 0 (the routes give choice i `seed + i`); raises ValueError naming a field."""
        return SamplingParams(
            structured_outputs=self.structured_spec() if structured is None else structured,
            max_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=self.top_k,
            seed=self.seed,
            stop=self.stop,
            stop_token_ids=list(self.stop_token_ids),
            ignore_eos=self.ignore_eos,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty,
        )


class CompletionRequest(_SamplingFields):
    """POST /v1/completions."""

    prompt: str | list[str] | TokenIds | list[TokenIds] = Field(
        description="A string, a list of strings, a list of token ids, or a list of token-id lists."
    )
    max_tokens: MaxTokens | None = Field(
        DEFAULT_COMPLETION_MAX_TOKENS, description="Tokens to generate (default 16); 0 scores the prompt."
    )
    logprobs: Logprobs | None = Field(
        None, description="Log-probabilities of each token and of this many alternatives."
    )
    echo: bool = Field(False, description="Prepend the prompt to the text (and to the logprobs, first is null).")
    best_of: AtLeastOne | None = Field(None, description="Only `best_of` == n is supported.")
    suffix: str | None = Field(None, description="Not supported; must be unset.")

    @field_validator("prompt", mode="wrap")
    @classmethod
    def _prompt(cls, value, handler):
        value = _reject_union(
            value, handler, "must be a string, a list of strings, a list of token ids, or a list of token-id lists"
        )
        if value == "" or value == [] or any(p == "" or p == [] for p in value if isinstance(p, (str, list))):
            raise PydanticCustomError("empty_prompt", "must not be empty (nor hold an empty prompt)")
        if isinstance(value, str):
            check_texts([("", value)])
            return value
        if isinstance(value[0], int):
            raise_problem(limits.token_ids_problem(value))
            return value
        if len(value) > MAX_PROMPTS_PER_REQUEST:
            raise PydanticCustomError(
                "too_many_prompts", "has {count} prompts; at most {limit} are allowed in one request",
                {"count": len(value), "limit": MAX_PROMPTS_PER_REQUEST},
            )
        for p, prompt in enumerate(value):
            if isinstance(prompt, str):
                check_texts([(f"[{p}]", prompt)])
            else:
                problem = limits.token_ids_problem(prompt)
                raise_problem(None if problem is None else limits.Problem(problem.tail, f"[{p}]{problem.suffix}"))
        return value

    @field_validator("suffix")
    @classmethod
    def _suffix(cls, value):
        if value:
            raise PydanticCustomError("unsupported", "is not supported by this server; leave it unset")
        return value

    @model_validator(mode="after")
    def _best_of(self):
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError(f"best_of is {self.best_of}; only best_of equal to n ({self.n}) is supported")
        return self

    def prompts(self) -> list[str | list[int]]:
        """The request's prompts: one string or token-id list each."""
        if isinstance(self.prompt, str):
            return [self.prompt]
        if self.prompt and isinstance(self.prompt[0], int):
            return [list(self.prompt)]
        return list(self.prompt)


class TextPart(_Strict):
    type: Literal["text"] = Field(description="A text part.")
    text: str


class ImageURL(_Strict):
    url: str = Field(description="A data URL, `data:image/png;base64,...` (PNG, JPEG or WebP); the server never "
                                 "fetches http(s) URLs.")
    detail: Literal["auto", "low", "high"] | None = Field(None, description="Accepted and ignored.")


class ImageURLPart(_Strict):
    type: Literal["image_url"] = Field(description="An image part.")
    image_url: ImageURL


CONTENT_PART_TYPES = ("text", "image_url")


class ChatMessage(_Strict):
    """A message; `developer` is read as `system`. Assistant messages may carry `tool_calls` (then `content` may
    be null); `tool` messages answer one (`tool_call_id`)."""

    role: Role = Field(description="Who wrote the message.")
    content: str | list[TextPart | ImageURLPart] | None = Field(
        description="A string or a list of parts: text, and images as base64 data URLs."
    )
    name: str | None = Field(None, description="Accepted and ignored.")
    tool_calls: list[dict] | None = Field(None, description="Assistant messages: the calls it made (OpenAI shape).")
    tool_call_id: str | None = Field(None, description="Tool messages: the id of the call answered.")

    @model_validator(mode="before")
    @classmethod
    def _calls_without_content(cls, data):
        if isinstance(data, dict) and "content" not in data and data.get("tool_calls"):
            data = {**data, "content": None}  # an assistant message that only calls tools
        return data

    @model_validator(mode="after")
    def _content_or_calls(self):
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError("content is null; only an assistant message with tool_calls may omit it")
        return self

    @field_validator("content", mode="wrap")
    @classmethod
    def _content(cls, value, handler):
        for i, part in enumerate(value if isinstance(value, list) else []):
            if isinstance(part, dict) and part.get("type", "text") not in CONTENT_PART_TYPES:
                raise PydanticCustomError(
                    "content_part", "part {index} has type '{type}'; only 'text' and 'image_url' parts are supported",
                    {"index": i, "type": part.get("type")},
                )
        value = _reject_union(
            value, handler, 'must be a string or a list of parts {"type": "text", "text": ...} or '
                            '{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}'
        )
        parts = [("", value)] if isinstance(value, str) else \
            [(f"[{j}].text", p.text) for j, p in enumerate(value or []) if isinstance(p, TextPart)]
        check_texts(parts)
        return value

    def num_images(self) -> int:
        return 0 if not isinstance(self.content, list) else sum(isinstance(p, ImageURLPart) for p in self.content)


class ChatCompletionRequest(_SamplingFields):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1, description="The conversation, at least one message.")
    max_tokens: ChatMaxTokens | None = Field(None, description="Deprecated name of max_completion_tokens.")
    max_completion_tokens: ChatMaxTokens | None = Field(
        None, description="Tokens to generate; default: up to the context length (max_model_len)."
    )
    logprobs: bool = Field(False, description="Return the log-probability of each generated token.")
    top_logprobs: Logprobs | None = Field(
        None, description="Also this many most likely alternatives (needs logprobs)."
    )
    tools: list[dict] | None = Field(None, description="Function tools the model may call (OpenAI shape).")
    tool_choice: str | dict | None = Field(
        None, description="'none', 'auto' (default with tools), 'required', or {'type': 'function', 'function': "
                          "{'name'}}; required and named calls decode under a grammar, so they always parse.")
    parallel_tool_calls: bool | None = Field(None, description="Allow several calls in one answer (default true).")

    def tool_request(self) -> ToolRequest | None:
        """The validated tool settings (None without tools); ValueError naming the field."""
        return validate_tool_request(self.tools, self.tool_choice, self.parallel_tool_calls)

    def chat_spec(self, tools: ToolRequest | None) -> StructuredOutputSpec | None:
        """The output constraint: a required or named tool call's grammar, else `structured_spec()`."""
        spec, call = self.structured_spec(), tool_call_spec(tools)
        if spec is not None and call is not None:
            raise ValueError(f"tool_choice {self.tool_choice!r} forces a tool call; it cannot be combined with "
                             "response_format or structured_outputs")
        return call or spec

    @model_validator(mode="after")
    def _top_logprobs(self):
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs is set but logprobs is false; set logprobs: true")
        return self

    def engine_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

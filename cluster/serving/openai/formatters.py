"""Response bodies of the OpenAI-compatible API, built from engine `RequestOutput` deltas.

Shapes are those the `openai` package parses: `Completion` / `ChatCompletion` and, when streaming, completion
chunks and `chat.completion.chunk`s (a role delta first, `finish_reason` on the last chunk of a choice, a usage
chunk with no choices when `stream_options.include_usage`). Choice `i` of prompt `p` has index `p * n + i`.
Per-token strings and log-probabilities are made by `logprobs.py`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from llama4serve.cluster.inputs.tool_calls import ToolCallStreamParser, ToolRequest, parse_tool_calls
from llama4serve.cluster.outputs import RequestOutput
from llama4serve.cluster.serving.openai.errors import APIError
from llama4serve.cluster.serving.openai.logprobs import TextOffsets, TokenText, chat_logprobs, completion_logprobs
from llama4serve.cluster.serving.openai.protocol import ChatCompletionRequest, CompletionRequest

__all__ = ["ChatFormatter", "CompletionFormatter", "TokenText", "usage"]


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


@dataclass
class _Choice:
    """One choice as it accumulates (non-streaming) or streams."""

    prompt_tokens: int = 0
    num_generated_tokens: int = 0
    started: bool = False
    finish_reason: str | None = None
    offsets: TextOffsets = field(default_factory=TextOffsets)
    texts: list[str] = field(default_factory=list)
    logprobs: dict | list | None = None  # completions: dict of lists; chat: list of entries


def _merge_logprobs(acc, new):
    if new is None:
        return acc
    if acc is None:
        return new
    if isinstance(acc, list):
        return acc + new
    return {key: acc[key] + new[key] for key in acc}


def _check_finish(out: RequestOutput) -> None:
    if out.finished and out.finish_reason == "abort":
        raise APIError(503, "the engine aborted the request (the model instance is restarting or shutting down); "
                            "retry", "server_error", code="aborted")


class _Formatter:
    object_name = ""
    chunk_object_name = ""

    def __init__(self, request_id: str, model: str, tokenizer, n: int):
        self.id, self.model, self.n = request_id, model, n
        self.created = int(time.time())
        self.tt = TokenText(tokenizer)
        self.tokenizer = tokenizer
        self.choices: dict[int, _Choice] = {}

    def _piece(self, index: int, out: RequestOutput) -> tuple[str, dict | list | None]:
        """The text and logprobs an output adds to its choice (subclasses)."""
        raise NotImplementedError

    def _advance(self, index: int, out: RequestOutput) -> tuple[_Choice, str, dict | list | None]:
        _check_finish(out)
        choice = self.choices.setdefault(index, _Choice())
        text, logprobs = self._piece(index, out)
        choice.started = True
        choice.prompt_tokens = out.num_prompt_tokens
        choice.num_generated_tokens = max(choice.num_generated_tokens, out.num_generated_tokens)
        if out.finished:
            choice.finish_reason = out.finish_reason
        return choice, text, logprobs

    def add(self, index: int, out: RequestOutput) -> None:
        choice, text, logprobs = self._advance(index, out)
        choice.texts.append(text)
        choice.logprobs = _merge_logprobs(choice.logprobs, logprobs)

    def usage(self) -> dict:
        prompt = sum(c.prompt_tokens for i, c in self.choices.items() if i % self.n == 0)  # once per prompt
        return usage(prompt, sum(c.num_generated_tokens for c in self.choices.values()))

    def _envelope(self, object_name: str, choices: list[dict]) -> dict:
        return {"id": self.id, "object": object_name, "created": self.created, "model": self.model,
                "choices": choices}

    def usage_chunk(self) -> dict:
        return {**self._envelope(self.chunk_object_name, []), "usage": self.usage()}

    def stream_start(self) -> list[dict]:
        return []


class CompletionFormatter(_Formatter):
    object_name = chunk_object_name = "text_completion"

    def __init__(self, request_id: str, model: str, tokenizer, prompts: list, body: CompletionRequest):
        super().__init__(request_id, model, tokenizer, body.n)
        self.prompts, self.echo, self.want_logprobs = prompts, body.echo, body.logprobs is not None

    def _prompt_text(self, index: int) -> str:
        prompt = self.prompts[index // self.n]
        if isinstance(prompt, str):
            return prompt
        return self.tokenizer.decode(prompt) if self.tokenizer is not None else ""

    def _piece(self, index: int, out: RequestOutput) -> tuple[str, dict | None]:
        choice = self.choices[index]
        echo_now = self.echo and not choice.started
        text = (self._prompt_text(index) if echo_now else "") + out.text
        if not self.want_logprobs:
            return text, None
        logprobs = None
        if echo_now:
            ids = out.prompt_token_ids
            values = out.prompt_logprobs or [None] * len(ids)
            logprobs = completion_logprobs(self.tt, choice.offsets, ids, values, out.prompt_top_logprobs)
        generated = completion_logprobs(self.tt, choice.offsets, out.token_ids,
                                        out.logprobs or [None] * len(out.token_ids), out.top_logprobs)
        return text, _merge_logprobs(logprobs, generated)

    def stream_chunks(self, index: int, out: RequestOutput) -> list[dict]:
        _, text, logprobs = self._advance(index, out)
        if not text and not out.token_ids and not out.finished and logprobs is None:
            return []
        choice = {"index": index, "text": text, "logprobs": logprobs,
                  "finish_reason": out.finish_reason if out.finished else None}
        return [self._envelope(self.chunk_object_name, [choice])]

    def response(self) -> dict:
        choices = [
            {"index": i, "text": "".join(c.texts), "logprobs": c.logprobs, "finish_reason": c.finish_reason}
            for i, c in sorted(self.choices.items())
        ]
        return {**self._envelope(self.object_name, choices), "usage": self.usage()}


class ChatFormatter(_Formatter):
    object_name = "chat.completion"
    chunk_object_name = "chat.completion.chunk"

    def __init__(self, request_id: str, model: str, tokenizer, body: ChatCompletionRequest,
                 tools: ToolRequest | None = None):
        super().__init__(request_id, model, tokenizer, body.n)
        self.want_logprobs = body.logprobs
        # With tools in play (tool_choice not "none") the output is parsed into OpenAI tool_calls.
        self.tool_names = tools.tool_names if tools is not None and tools.tool_choice != "none" else None
        self.parsers: dict[int, ToolCallStreamParser] = {}

    def _piece(self, index: int, out: RequestOutput) -> tuple[str, list | None]:
        if not self.want_logprobs:
            return out.text, None
        values = out.logprobs or [None] * len(out.token_ids)
        return out.text, chat_logprobs(self.tt, out.token_ids, values, out.top_logprobs)

    def stream_start(self) -> list[dict]:
        return [
            self._envelope(self.chunk_object_name, [
                {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
            ])
            for i in range(self.n)
        ]

    def stream_chunks(self, index: int, out: RequestOutput) -> list[dict]:
        _, text, logprobs = self._advance(index, out)
        if not text and not out.token_ids and not out.finished:
            return []
        deltas = [{"content": text} if text else {}]
        finish = out.finish_reason if out.finished else None
        if self.tool_names is not None:  # content and complete calls, as the stream parser decides them
            parser = self.parsers.setdefault(index, ToolCallStreamParser(self.tool_names))
            deltas = parser.feed(text) + (parser.finish() if out.finished else [])
            if finish == "stop" and parser.tool_calls:
                finish = "tool_calls"
            if not deltas and (logprobs is not None or finish is not None):
                deltas = [{}]
        chunks = []
        for k, delta in enumerate(deltas):
            choice = {
                "index": index,
                "delta": delta,
                "logprobs": None if logprobs is None or k else {"content": logprobs, "refusal": None},
                "finish_reason": finish if k == len(deltas) - 1 else None,
            }
            chunks.append(self._envelope(self.chunk_object_name, [choice]))
        return chunks

    def _message(self, choice: _Choice) -> tuple[dict, str | None]:
        text = "".join(choice.texts)
        if self.tool_names is None:
            return {"role": "assistant", "content": text}, choice.finish_reason
        content, calls = parse_tool_calls(text, self.tool_names)
        if not calls:
            return {"role": "assistant", "content": text}, choice.finish_reason
        finish = "tool_calls" if choice.finish_reason == "stop" else choice.finish_reason
        return {"role": "assistant", "content": content, "tool_calls": calls}, finish

    def response(self) -> dict:
        choices = [
            {
                "index": i,
                "message": message,
                "logprobs": None if c.logprobs is None else {"content": c.logprobs, "refusal": None},
                "finish_reason": finish,
            }
            for i, c in sorted(self.choices.items())
            for message, finish in [self._message(c)]
        ]
        return {**self._envelope(self.object_name, choices), "usage": self.usage()}

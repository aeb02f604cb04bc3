"""The chat formatter with tools in play: model text becomes OpenAI tool_calls, streamed or not, the same calls
either way; text before a call stays content; a call arriving in one delta is not dropped; tool_choice "none"
leaves the text alone. Deterministic text, no engine."""

from __future__ import annotations

import json

import pytest

from llama4serve.cluster.inputs.tool_calls import validate_tool_request
from llama4serve.cluster.outputs import RequestOutput
from llama4serve.cluster.serving.openai.formatters import ChatFormatter
from llama4serve.cluster.serving.openai.protocol import ChatCompletionRequest

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}]
TEXT = 'Let me check. [get_weather(city="Paris"), get_weather(city="Oslo")]'


def _formatter(tool_choice="auto") -> ChatFormatter:
    body = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}], tools=TOOLS,
                                 tool_choice=tool_choice)
    return ChatFormatter("chatcmpl-1", "m", None, body, body.tool_request())


def _outputs(pieces: list[str]) -> list[RequestOutput]:
    last = len(pieces) - 1
    return [RequestOutput("r", [1], [i], p, finished=i == last, finish_reason="stop" if i == last else None,
                          num_generated_tokens=i + 1) for i, p in enumerate(pieces)]


def _streamed(pieces: list[str]) -> tuple[str, list[dict], str]:
    formatter, content, calls, finish = _formatter(), "", {}, None
    for out in _outputs(pieces):
        for chunk in formatter.stream_chunks(0, out):
            choice = chunk["choices"][0]
            delta = choice["delta"]
            content += delta.get("content") or ""
            for call in delta.get("tool_calls") or []:
                entry = calls.setdefault(call["index"], {"name": "", "arguments": ""})
                entry["name"] += call["function"]["name"]
                entry["arguments"] += call["function"]["arguments"]
                assert call["id"].startswith("call_") and call["type"] == "function"
            finish = choice["finish_reason"] or finish
    return content, [calls[i] for i in sorted(calls)], finish


@pytest.mark.parametrize("pieces", [[TEXT], list(TEXT), [TEXT[:20], TEXT[20:41], TEXT[41:]]],
                         ids=["one delta", "per character", "three deltas"])
def test_streamed_calls_assemble_to_the_unstreamed_ones(pieces):
    whole = _formatter()
    for out in _outputs([TEXT]):
        whole.add(0, out)
    choice = whole.response()["choices"][0]
    message = choice["message"]
    assert choice["finish_reason"] == "tool_calls" and message["content"] == "Let me check."
    expected = [{"name": c["function"]["name"], "arguments": c["function"]["arguments"]}
                for c in message["tool_calls"]]
    assert [json.loads(c["arguments"]) for c in expected] == [{"city": "Paris"}, {"city": "Oslo"}]
    content, calls, finish = _streamed(pieces)
    assert (content.strip(), calls, finish) == ("Let me check.", expected, "tool_calls")


def test_plain_text_and_tool_choice_none_stay_content():
    formatter = _formatter()
    for out in _outputs(["No call ", "here."]):
        formatter.add(0, out)
    choice = formatter.response()["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": "No call here."} and choice["finish_reason"] == "stop"
    none = _formatter("none")
    for out in _outputs([TEXT]):
        none.add(0, out)
    assert none.response()["choices"][0]["message"]["content"] == TEXT
    assert validate_tool_request(TOOLS, "none").tool_choice == "none"

"""Llama 4 tool calls in model output, parsed into OpenAI ``tool_calls``: whole (``parse_tool_calls``) or from
streamed text deltas (``ToolCallStreamParser``); both run one scanner, so streamed calls assemble to the
non-streamed ones. Pure Python.

Formats (both accepted whatever the prompt asked for, so JSON where pythonic was expected still parses):
pythonic ``[get_weather(city="Paris"), f(x=1)]`` (literals only, read with ``ast``, never evaluated; a bare
``f(x=1)`` only between ``<|python_start|>`` and ``<|python_end|>``) and JSON ``{"name": ..., "parameters":
...}`` (or ``"arguments"``), a list of them, or several in a row (``;`` or ``,`` between them). Text around
calls stays content (text before a call is never lost); the python tags are dropped, and so is whitespace
before a call or tag and at the end after one.
"""

from __future__ import annotations

import json
import re
import secrets
from typing import Callable, Sequence

from llama4serve.cluster.inputs.tool_call_formats import parse_call_block

PYTHON_START, PYTHON_END = "<|python_start|>", "<|python_end|>"
_TAGS = (PYTHON_START, PYTHON_END)
_CALL_KEYS = ('"name"', '"type"', '"parameters"', '"arguments"')
_WS = " \t\r\n"
_SPECIAL = re.compile(r"[\[{< \t\r\n]")  # where a run of content may end
_OUTSIDE_STRING = re.compile(r"[^\[\](){}\"'\\]+")
_INSIDE_STRING = {'"': re.compile(r'[^"\\]+'), "'": re.compile(r"[^'\\]+")}


def new_tool_call_id() -> str:
    """An OpenAI-style call id: ``call_`` and 24 hex digits."""
    return "call_" + secrets.token_hex(12)


def make_tool_call(name: str, arguments: dict, call_id: str) -> dict:
    """One OpenAI ``tool_calls`` entry (arguments as JSON text)."""
    return {"id": call_id, "type": "function",
            "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)}}


def parse_tool_calls(text: str, tool_names: Sequence[str] | None = None,
                     new_id: Callable[[], str] = new_tool_call_id) -> tuple[str | None, list[dict]]:
    """Split a finished output into (content, OpenAI tool_calls); content is None when it is empty.

    With ``tool_names``, a call naming another function is not a call (its text stays content).
    """
    scanner = _Scanner(tool_names)
    events, _ = scanner.scan(text, final=True)
    content = "".join(v for kind, v in events if kind == "content")
    calls = [make_tool_call(n, a, new_id()) for kind, v in events if kind == "calls" for n, a in v]
    return (content or None), calls


class ToolCallStreamParser:
    """Turns an output's text deltas into OpenAI chat deltas: ``{"content": ...}`` for plain text and, once a call
    is complete, ``{"tool_calls": [{"index", "id", "type": "function", "function": {"name", "arguments"}}]}``.

    Text that may still start a call (``[``, ``{``, ``<|python_start|>``, whitespace before them) is held back
    only until it is decided. The assembled deltas equal ``parse_tool_calls`` of the whole text.
    """

    def __init__(self, tool_names: Sequence[str] | None = None,
                 new_id: Callable[[], str] = new_tool_call_id) -> None:
        self._scanner = _Scanner(tool_names)
        self._new_id = new_id
        self._buffer = ""
        self.tool_calls: list[dict] = []

    def feed(self, delta: str) -> list[dict]:
        """Chat deltas decided by this text delta (often none while a call is being written)."""
        self._buffer += delta
        events, consumed = self._scanner.scan(self._buffer, final=False)
        self._buffer = self._buffer[consumed:]
        return self._deltas(events)

    def finish(self) -> list[dict]:
        """Chat deltas for the held-back tail; call when the output ends."""
        events, _ = self._scanner.scan(self._buffer, final=True)
        self._buffer = ""
        return self._deltas(events)

    def _deltas(self, events: list) -> list[dict]:
        out = []
        for kind, value in events:
            if kind == "content":
                out.append({"content": value})
                continue
            for name, arguments in value:
                call = make_tool_call(name, arguments, self._new_id())
                out.append({"tool_calls": [{"index": len(self.tool_calls), **call}]})
                self.tool_calls.append(call)
        return out


class _Scanner:
    """Left-to-right split of text into content and call blocks. ``scan`` reports only what later text cannot
    change, and how far that reaches; state (inside python tags, right after a call or tag) carries over."""

    def __init__(self, tool_names: Sequence[str] | None) -> None:
        self.tool_names = None if tool_names is None else set(tool_names)
        self.in_python = False
        self.after_call = False  # right after a call or tag: ; and , separate calls, trailing space is dropped
        self._open_block: tuple[str, int, str | None] | None = None  # (text scanned, depth, open quote)

    def scan(self, text: str, final: bool) -> tuple[list, int]:
        """Events (("content", str) or ("calls", [(name, arguments)])) decided in ``text``, and how much of
        ``text`` they cover; with ``final`` everything is decided."""
        events: list = []
        content: list[str] = []
        i, n = 0, len(text)
        while i < n:
            j = i
            while j < n and (text[j] in _WS or (self.after_call and text[j] in ";,")):
                j += 1
            step = None if j == n else self._unit(text, j, final)
            if step is None:  # only space left, or undecided until more text comes
                if final:
                    content += [] if self.after_call else [text[i:]]
                    i = n
                break
            kind, value, end = step
            if kind == "content":
                content += [text[i:j], value]
                self.after_call = False
            else:
                if kind == "calls":
                    if content:
                        events.append(("content", "".join(content)))
                        content = []
                    events.append((kind, value))
                self.after_call = True
            i = end
        if content:
            events.append(("content", "".join(content)))
        return events, i

    def _unit(self, text: str, i: int, final: bool):
        """(kind, value, end) for the unit at ``i``: "content", "tag" or "calls"; None when undecided."""
        c = text[i]
        for tag in _TAGS if c == "<" else ():
            if text.startswith(tag, i):
                self.in_python = tag == PYTHON_START
                return "tag", None, i + len(tag)
            if not final and len(text) - i < len(tag) and tag.startswith(text[i:]):
                return None
        if c in "[{" or (self.in_python and self.after_call and (c.isalpha() or c == "_")):
            head = _head(text, i)
            if head is None and not final:
                return None
            if head:
                end = self._block_end(text, i)
                if end is None and not final:
                    return None  # the open block's scan state is kept for the next feed
                self._open_block = None
                if end is not None:
                    calls = parse_call_block(text[i:end], self.tool_names)
                    return ("calls", calls, end) if calls else ("content", text[i:end], end)
        special = _SPECIAL.search(text, i + 1)
        end = special.start() if special else len(text)
        return "content", text[i:end], end


    def _block_end(self, text: str, i: int) -> int | None:
        """Index after the bracket closing the block at ``i`` (an identifier's block is its ``(...)``); None
        while it is open. Where the scan of an open block stopped is kept, so streaming stays linear."""
        memo = self._open_block
        if memo is not None and text.startswith(memo[0], i):
            k, depth, quote = i + len(memo[0]), memo[1], memo[2]
        else:
            k, depth, quote = i, 0, None
        n = len(text)
        while k < n:
            skip = (_OUTSIDE_STRING if quote is None else _INSIDE_STRING[quote]).match(text, k)
            if skip:  # runs without brackets, quotes or escapes, at regex speed
                k = skip.end()
                continue
            c = text[k]
            if quote:
                if c == "\\":
                    if k + 1 == n:  # the escaped character has not arrived yet
                        break
                    k += 1
                elif c == quote:
                    quote = None
            elif c in "\"'":
                quote = c
            elif c in "[({":
                depth += 1
            elif c in "])}":
                depth -= 1
                if depth <= 0:
                    return k + 1
            k += 1
        self._open_block = (text[i:k], depth, quote)
        return None


def _head(text: str, i: int) -> bool | None:
    """Whether text[i:] starts like a call: True, False, or None (text ends before it is decided)."""
    n = len(text)

    def skip_ws(k: int) -> int:
        while k < n and text[k] in _WS:
            k += 1
        return k

    def json_head(k: int) -> bool | None:  # at "{"
        k = skip_ws(k + 1)
        rest = text[k:k + 12]
        if any(key.startswith(rest) for key in _CALL_KEYS) and k + len(rest) == n:
            return None
        return any(rest.startswith(key) for key in _CALL_KEYS)

    def python_head(k: int) -> bool | None:  # at an identifier
        if k < n and not (text[k].isalpha() or text[k] == "_"):
            return False
        while k < n and (text[k].isalnum() or text[k] in "_."):
            k += 1
        k = skip_ws(k)
        return None if k == n else text[k] == "("

    if text[i] == "{":
        return json_head(i)
    if text[i] != "[":
        return python_head(i)
    k = skip_ws(i + 1)
    if k == n:
        return None
    return json_head(k) if text[k] == "{" else python_head(k)

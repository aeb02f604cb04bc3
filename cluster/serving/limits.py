"""The request limits of the serving API: one table that the OpenAI HTTP models (`openai/protocol.py`) and the
gRPC request parser (`grpc/request.py`) both read, so that the same bad value gets the same message over both:
`<field> is <value>; allowed <range>`.

Plain Python (no pydantic, no grpc, no torch). Each check returns a `Problem` (what is wrong, and where inside
the field), or None when the value is fine; the caller names the field (`temperature`, `messages[0].role`)
and raises its protocol's error. Deployment-dependent bounds (`max_tokens` <= max_model_len, `n` <= max_n) use
`deployment_limit`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from llama4serve.cluster.sampling_params import MAX_LOGPROBS

MAX_STOP_STRINGS = 16
MAX_SEED = 2**63 - 1  # the gRPC field is an int64; the sampler reduces seeds mod 2**63
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool", "ipython")  # developer is read as system


@dataclass(frozen=True)
class Problem:
    """What is wrong with a field's value: `tail` follows the field's name, `suffix` points inside it."""

    tail: str  # e.g. "is 2.5; allowed 0..2 (0 is greedy)"
    suffix: str = ""  # e.g. "[1]" for the second stop string

    def at(self, where: str) -> str:
        """The message, for the field named `where`: `temperature is 2.5; allowed 0..2 (0 is greedy)`."""
        return f"{where}{self.suffix} {self.tail}"


def show(value) -> str:
    """A value as the messages print it: 2.0 and 2 both as `2`, so JSON and protobuf numbers read the same."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(value)


@dataclass(frozen=True)
class Range:
    """An allowed range: [lo, hi] with optionally open ends, optionally whole numbers only."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    integer: bool = False
    note: str = ""  # what special values mean, e.g. "0 is greedy"

    def allowed(self) -> str:
        kind = "an integer " if self.integer else ""
        if self.hi is None:
            text = f"{kind}{'>' if self.lo_open else '>='} {show(self.lo)}"
        elif self.lo_open or self.hi_open:
            text = f"{kind}{'(' if self.lo_open else '['}{show(self.lo)}, {show(self.hi)}{')' if self.hi_open else ']'}"
        else:
            text = f"{kind}{show(self.lo)}..{show(self.hi)}"
        return f"{text} ({self.note})" if self.note else text

    def problem(self, value) -> Problem | None:
        """`is <value>; allowed <range>` when `value` is outside, else None."""
        number = not isinstance(value, bool) and isinstance(value, int if self.integer else (int, float))
        low_ok = number and (self.lo is None or (value > self.lo if self.lo_open else value >= self.lo))
        high_ok = number and (self.hi is None or (value < self.hi if self.hi_open else value <= self.hi))
        if not (low_ok and high_ok) or math.isnan(value):
            return Problem(f"is {show(value)}; allowed {self.allowed()}")
        return None

    def json_schema(self) -> dict:
        """The same bounds as JSON Schema keywords (for the OpenAPI document)."""
        schema: dict = {}
        if self.lo is not None:
            schema["exclusiveMinimum" if self.lo_open else "minimum"] = self.lo
        if self.hi is not None:
            schema["exclusiveMaximum" if self.hi_open else "maximum"] = self.hi
        return schema


# The table: sampling fields common to HTTP and gRPC.
SAMPLING = {
    "max_tokens": Range(0, None, integer=True),
    "temperature": Range(0, 2, note="0 is greedy"),
    "top_p": Range(0, 1, lo_open=True),
    "top_k": Range(-1, None, integer=True, note="-1 or 0 is off"),
    "seed": Range(0, MAX_SEED, integer=True),
    "logprobs": Range(0, MAX_LOGPROBS, integer=True),
    "presence_penalty": Range(-2, 2),
    "frequency_penalty": Range(-2, 2),
    "repetition_penalty": Range(0, 10, lo_open=True, note="1 is off"),
}
TOP_LOGPROBS = SAMPLING["logprobs"]
CHAT_MAX_TOKENS = Range(1, None, integer=True)  # OpenAI's chat API: max_tokens / max_completion_tokens >= 1
N = Range(1, None, integer=True)
TOKEN_ID = Range(0, None, integer=True)


def deployment_limit(value: int, limit: int, setting: str, note: str = "") -> Problem | None:
    """`is 2000; this deployment accepts at most 1024 (max_model_len, prompt included)`, or None."""
    if value <= limit:
        return None
    return Problem(f"is {value}; this deployment accepts at most {limit} ({setting}{', ' + note if note else ''})")


def stop_problem(stops: list[str]) -> Problem | None:
    if len(stops) > MAX_STOP_STRINGS:
        return Problem(f"has {len(stops)} strings; at most {MAX_STOP_STRINGS} are allowed")
    for i, stop in enumerate(stops):
        if not stop:
            return Problem("is an empty string; stop strings must not be empty", f"[{i}]")
    return None


def token_ids_problem(ids: list[int]) -> Problem | None:
    for i, token_id in enumerate(ids):
        problem = TOKEN_ID.problem(token_id)
        if problem is not None:
            return Problem(problem.tail, f"[{i}]")
    return None


def role_problem(role: str) -> Problem | None:
    if role in CHAT_ROLES:
        return None
    return Problem(f"is {role!r}; allowed {', '.join(repr(r) for r in CHAT_ROLES)}")


def text_problem(text: str) -> Problem | None:
    """`contains a lone surrogate ...` for text that is not valid Unicode (JSON allows "\\ud800"), else None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return Problem(f"contains a lone surrogate (U+{ord(text[e.start]):04X} at character {e.start}); "
                       "send valid Unicode text (a high surrogate must be followed by a low one)")
    return None

"""Pydantic field types of the OpenAI HTTP models, made from the limits table (`limits.py`) that gRPC also reads.

A value outside its range raises a `limit` error whose message is the table's (`is 2.5; allowed 0..2`); the
routes' error handler (`openai/api.py` `_validation_message`) puts the field's path in front, so the message is the
one gRPC sends for the same value. Integers accept whole-number floats (16.0), as JSON Schema does.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import AfterValidator, BeforeValidator, Field
from pydantic_core import PydanticCustomError

from llama4serve.cluster.serving import limits


def _whole_number(value: Any) -> Any:
    """16.0 is the integer 16 (JSON Schema, OpenAI); 16.5 and booleans are not integers."""
    if isinstance(value, bool):
        raise PydanticCustomError("int_type", "Input should be a valid integer, not a boolean")
    if isinstance(value, float):
        if not value.is_integer():
            raise PydanticCustomError("int_from_float", "Input should be a valid integer, got a number with a "
                                                        "fractional part")
        return int(value)
    return value


Int = Annotated[int, BeforeValidator(_whole_number)]
TokenIds = list[Int]


def raise_problem(problem: limits.Problem | None) -> None:
    """A `limits` problem as a pydantic error; the routes' error handler prefixes the field's path."""
    if problem is not None:
        raise PydanticCustomError("limit", "{tail}", {"tail": problem.tail, "suffix": problem.suffix})


def Limited(base: Any, allowed: limits.Range) -> Any:
    """`base` checked against a range of the limits table (also shown in the OpenAPI schema)."""
    def check(value):
        raise_problem(allowed.problem(value))
        return value

    return Annotated[base, AfterValidator(check), Field(json_schema_extra=allowed.json_schema())]


def _role(value: str) -> str:
    raise_problem(limits.role_problem(value))
    return value


_S = limits.SAMPLING
MaxTokens, ChatMaxTokens = Limited(Int, _S["max_tokens"]), Limited(Int, limits.CHAT_MAX_TOKENS)
Temperature, TopP, TopK = Limited(float, _S["temperature"]), Limited(float, _S["top_p"]), Limited(Int, _S["top_k"])
Seed, Logprobs, AtLeastOne = Limited(Int, _S["seed"]), Limited(Int, _S["logprobs"]), Limited(Int, limits.N)
Penalty, RepetitionPenalty = Limited(float, _S["presence_penalty"]), Limited(float, _S["repetition_penalty"])
Role = Annotated[str, AfterValidator(_role), Field(json_schema_extra={"enum": list(limits.CHAT_ROLES)})]


def check_texts(texts: list[tuple[str, str]]) -> None:
    """Each (suffix, text) must be valid Unicode: JSON can carry lone surrogates ("\\ud800"), tokenizers cannot."""
    for suffix, text in texts:
        problem = limits.text_problem(text)
        if problem is not None:
            raise_problem(limits.Problem(problem.tail, suffix))

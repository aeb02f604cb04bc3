"""Structured outputs: the request's constraint (``StructuredOutputSpec``), its mapping from OpenAI
``response_format`` and vLLM ``structured_outputs``, and grammar compilation with xgrammar, cached per spec.
The per-step half (a request's matcher, the logits mask) is ``grammar_matcher``, re-exported here.

Importing this module needs neither torch nor xgrammar (the Ingress maps and checks request fields with it);
``GrammarCache`` imports xgrammar (which imports torch and transformers) on first use.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from llama4serve.cluster.inputs.grammar_matcher import (
    StructuredMatcher, Utf8Guard, allocate_bitmask, allowed_token_ids, apply_token_bitmask,
)

__all__ = [
    "GrammarCache", "StructuredMatcher", "StructuredOutputSpec", "Utf8Guard", "allocate_bitmask",
    "allowed_token_ids", "apply_token_bitmask", "build_tokenizer_info", "json_schema_spec", "spec_from_request",
]

KINDS = ("json", "json_object", "regex", "choice", "grammar")
STRUCTURED_OUTPUT_KEYS = ("json", "json_object", "regex", "choice", "grammar")
# xgrammar 0.2.9 turns a string's minLength/maxLength into [^"\\\r\n]{m,n}, which admits raw control
# characters (invalid JSON); a pattern over the decoded string does not. Quotes and backslashes stay out, as
# in xgrammar's own rule (its pattern mode does not always escape them), and so do surrogates.
_BOUNDED_STRING_PATTERN = '^[^\\x00-\\x1f"\\\\\\ud800-\\udfff]{%d,%s}$'
_NOT_SCHEMAS = ("const", "enum", "default", "examples")
_LOG_PREFIX = re.compile(r"^\[[\d:]+\] \S+?:\d+: (Check failed: .*? is false: )?")


@dataclass(frozen=True)
class StructuredOutputSpec:
    """What one request's output must match; travels in SamplingParams and keys the grammar cache.

    kind "json": ``payload`` is the JSON schema as JSON text; "json_object": any JSON object, payload "";
    "regex": the pattern; "choice": a tuple of allowed strings; "grammar": EBNF (xgrammar/GBNF dialect, a
    ``root ::=`` rule) or Lark (a ``start:`` rule). ``max_whitespace`` bounds the whitespace between JSON
    elements: 0 is the compact form (``", "`` and ``": "`` only), n > 0 allows up to n whitespace characters
    per gap, so a model can never loop on spaces. ``field`` names the request field errors are reported
    against; it is not part of the cache key.
    """

    kind: str
    payload: str | tuple[str, ...] = ""
    max_whitespace: int = 0
    field: str = field(default="structured_outputs", compare=False)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"{self.field}: kind {self.kind!r} is not one of {', '.join(KINDS)}")
        if self.kind == "choice":
            if not isinstance(self.payload, tuple) or not self.payload or not all(
                    isinstance(c, str) for c in self.payload):
                raise ValueError(f"{self.field} must be a non-empty list of strings")
        elif not isinstance(self.payload, str) or (self.kind != "json_object" and not self.payload):
            raise ValueError(f"{self.field} must be a non-empty string")
        if isinstance(self.max_whitespace, bool) or not isinstance(self.max_whitespace, int) \
                or self.max_whitespace < 0:
            raise ValueError(f"max_whitespace is {self.max_whitespace!r}; allowed an integer >= 0")


def json_schema_spec(schema: Any, field: str, max_whitespace: int = 0) -> StructuredOutputSpec:
    """A "json" spec from a schema given as a dict or JSON text; ``ValueError`` naming ``field`` otherwise."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as e:
            raise ValueError(f"{field} is not valid JSON: {e}") from None
    if not isinstance(schema, dict):
        raise ValueError(f"{field} must be a JSON schema object, got {type(schema).__name__}")
    return StructuredOutputSpec("json", json.dumps(schema, ensure_ascii=False, separators=(",", ":")),
                                max_whitespace, field)


def spec_from_request(response_format: Any = None, structured_outputs: Any = None,
                      max_whitespace: int = 0) -> StructuredOutputSpec | None:
    """Map OpenAI ``response_format`` and vLLM ``structured_outputs`` to a spec (``None``: unconstrained).

    response_format: ``{"type": "text"}``, ``{"type": "json_object"}`` or ``{"type": "json_schema",
    "json_schema": {"name", "schema", "strict"}}``. structured_outputs: exactly one of ``json`` (schema dict or
    JSON text), ``regex``, ``choice`` (list of strings), ``grammar``, ``json_object: true``; keys set to None
    count as absent. Bad input raises ``ValueError`` naming the field (a 400 / INVALID_ARGUMENT).
    """
    spec = _from_response_format(response_format, max_whitespace)
    other = _from_structured_outputs(structured_outputs, max_whitespace)
    if spec is not None and other is not None:
        raise ValueError("structured_outputs: set either response_format or structured_outputs, not both")
    return spec or other


def _from_response_format(value: Any, max_whitespace: int) -> StructuredOutputSpec | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ValueError(f"response_format must be an object, got {type(value).__name__}")
    kind = value.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutputSpec("json_object", "", max_whitespace, "response_format")
    if kind != "json_schema":
        raise ValueError(f"response_format.type is {kind!r}; allowed 'text', 'json_object', 'json_schema'")
    body = value.get("json_schema")
    if not isinstance(body, dict):
        raise ValueError("response_format.json_schema must be an object with 'name' and 'schema'")
    name = body.get("name")
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", name):
        raise ValueError(f"response_format.json_schema.name is {name!r}; allowed 1-64 of a-z, A-Z, 0-9, _ and -")
    if body.get("strict") not in (None, True, False):
        raise ValueError(f"response_format.json_schema.strict is {body['strict']!r}; allowed true or false")
    if "schema" not in body:
        raise ValueError("response_format.json_schema.schema is missing")
    return json_schema_spec(body["schema"], "response_format.json_schema.schema", max_whitespace)


def _from_structured_outputs(value: Any, max_whitespace: int) -> StructuredOutputSpec | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ValueError(f"structured_outputs must be an object, got {type(value).__name__}")
    unknown = sorted(set(value) - set(STRUCTURED_OUTPUT_KEYS))
    if unknown:
        raise ValueError(f"structured_outputs.{unknown[0]} is not supported; "
                         f"set one of {', '.join(STRUCTURED_OUTPUT_KEYS)}")
    given = [k for k in STRUCTURED_OUTPUT_KEYS if value.get(k) is not None]
    if len(given) != 1:
        raise ValueError(f"structured_outputs must set exactly one of {', '.join(STRUCTURED_OUTPUT_KEYS)}"
                         f" (got {', '.join(given) or 'none'})")
    key = given[0]
    item, name = value[key], f"structured_outputs.{key}"
    if key == "json":
        return json_schema_spec(item, name, max_whitespace)
    if key == "json_object":
        if item is not True:
            raise ValueError(f"{name} is {item!r}; allowed true")
        return StructuredOutputSpec("json_object", "", max_whitespace, name)
    if key == "choice":
        if not isinstance(item, list) or not item or not all(isinstance(c, str) for c in item):
            raise ValueError(f"{name} must be a non-empty list of strings")
        return StructuredOutputSpec("choice", tuple(item), max_whitespace, name)
    if not isinstance(item, str) or not item:
        raise ValueError(f"{name} must be a non-empty string")
    return StructuredOutputSpec(key, item, max_whitespace, name)


def _bound_string_lengths(schema: Any) -> Any:
    """The schema with every length-bounded string (no pattern/format) rewritten as a pattern."""
    if isinstance(schema, list):
        return [_bound_string_lengths(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: (v if k in _NOT_SCHEMAS else _bound_string_lengths(v)) for k, v in schema.items()}
    types = out.get("type")
    is_string = types == "string" or (isinstance(types, list) and types == ["string"])
    if is_string and ("minLength" in out or "maxLength" in out) and not {"pattern", "format"} & set(out):
        low, high = out.pop("minLength", 0), out.pop("maxLength", None)
        if isinstance(low, int) and (high is None or isinstance(high, int)):
            out["pattern"] = _BOUNDED_STRING_PATTERN % (low, "" if high is None else high)
    return out


def _one_line(error: Exception) -> str:
    """xgrammar's error text without its log prefix, first line only."""
    return _LOG_PREFIX.sub("", str(error).strip().splitlines()[0] if str(error).strip() else repr(error))


def build_tokenizer_info(tokenizer: Any, vocab_size: int, stop_token_ids: Sequence[int]):
    """xgrammar ``TokenizerInfo`` from a ``tokenizers.Tokenizer`` (or the path of a ``tokenizer.json``).

    ``vocab_size`` is the model's (lm_head rows; may exceed the tokenizer's: the extra ids are never allowed).
    Special added tokens (``<|python_start|>``, ``<|header_start|>``, ...) are encoded as empty strings, which
    xgrammar treats as special: a grammar never admits them as text; ``stop_token_ids`` end a finished grammar.
    """
    import xgrammar as xgr

    if isinstance(tokenizer, (str, Path)):
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(tokenizer))
    special = {i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special}
    encoded = [""] * vocab_size
    for token, i in tokenizer.get_vocab(with_added_tokens=True).items():
        if i < vocab_size and i not in special:
            encoded[i] = token
    metadata = xgr.TokenizerInfo._detect_metadata_from_hf(tokenizer.to_str())  # what from_huggingface uses
    return xgr.TokenizerInfo(encoded, metadata["vocab_type"], vocab_size=vocab_size,
                             stop_token_ids=list(stop_token_ids), add_prefix_space=metadata["add_prefix_space"])


class GrammarCache:
    """Compiles each distinct spec once (thread-safe; concurrent callers of one spec share one compile).

    ``compile`` blocks (milliseconds for small schemas, longer for big vocabularies and schemas): call it from
    a worker thread or use ``compile_async``, never on the event loop or inside the step loop. Least recently
    used grammars beyond ``max_entries`` are dropped.
    """

    def __init__(self, tokenizer_info, max_entries: int = 512, max_threads: int = 4) -> None:
        import xgrammar as xgr

        self.tokenizer_info = tokenizer_info
        self.vocab_size = int(tokenizer_info.vocab_size)
        self._compiler = xgr.GrammarCompiler(tokenizer_info, max_threads=max_threads, cache_enabled=False)
        self._entries: OrderedDict[StructuredOutputSpec, Future] = OrderedDict()
        self._lock = threading.Lock()
        self.max_entries = max_entries
        self._utf8_guard = None

    @classmethod
    def from_tokenizer(cls, tokenizer: Any, vocab_size: int, stop_token_ids: Sequence[int],
                       **kwargs: Any) -> "GrammarCache":
        """A cache for one model: see ``build_tokenizer_info`` for the arguments."""
        return cls(build_tokenizer_info(tokenizer, vocab_size, stop_token_ids), **kwargs)

    def compile(self, spec: StructuredOutputSpec):
        """The ``xgrammar.CompiledGrammar`` of ``spec``; ``ValueError`` naming ``spec.field`` when invalid."""
        with self._lock:
            future = self._entries.get(spec)
            owner = future is None
            if owner:
                future = self._entries[spec] = Future()
            self._entries.move_to_end(spec)
        if owner:
            try:
                future.set_result(self._compile(spec))
            except BaseException as e:  # noqa: BLE001 - handed to every waiter, then re-raised
                with self._lock:
                    self._entries.pop(spec, None)
                future.set_exception(e)
            with self._lock:
                while len(self._entries) > self.max_entries:
                    self._entries.popitem(last=False)
        return future.result()

    async def compile_async(self, spec: StructuredOutputSpec):
        """``compile`` in a worker thread, for asyncio callers."""
        return await asyncio.to_thread(self.compile, spec)

    def matcher(self, spec: StructuredOutputSpec) -> StructuredMatcher:
        """A fresh matcher for one request (compiles on a cache miss)."""
        if self._utf8_guard is None:
            self._utf8_guard = Utf8Guard(self.tokenizer_info)
        return StructuredMatcher(self.compile(spec), self._utf8_guard)

    def _compile(self, spec: StructuredOutputSpec):
        whitespace = ({"any_whitespace": False} if spec.max_whitespace == 0
                      else {"any_whitespace": True, "max_whitespace_cnt": spec.max_whitespace})
        compiler, what = self._compiler, {"json": "JSON schema", "json_object": "JSON schema",
                                          "regex": "regular expression", "choice": "choice list"}
        try:
            if spec.kind == "json":
                schema = _bound_string_lengths(json.loads(spec.payload))
                return compiler.compile_json_schema(json.dumps(schema, ensure_ascii=False), **whitespace)
            if spec.kind == "json_object":
                return compiler.compile_json_schema('{"type": "object"}', strict_mode=False, **whitespace)
            if spec.kind == "regex":
                return compiler.compile_regex(spec.payload)
            if spec.kind == "choice":
                alternatives = " | ".join(json.dumps(c, ensure_ascii=False) for c in spec.payload)
                return compiler.compile_grammar(f"root ::= {alternatives}")
            if "::=" in spec.payload:  # EBNF; otherwise Lark, as vLLM decides
                return compiler.compile_grammar(spec.payload)
            return compiler.compile_lark(spec.payload)
        except (RuntimeError, ValueError) as e:
            kind = what.get(spec.kind, "EBNF or Lark grammar")
            raise ValueError(f"{spec.field} is not a valid {kind}: {_one_line(e)}") from None

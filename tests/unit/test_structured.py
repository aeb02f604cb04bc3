"""Structured outputs with the real xgrammar and the tokenizer of a random tiny-scout checkpoint: request mapping
and its errors, compilation cache, matcher, bitmask application, and a random model decoding under grammars."""

import asyncio
import json
import re
import threading

import jsonschema
import pytest
import torch

from llama4serve.cluster.inputs.structured import (
    GrammarCache, StructuredOutputSpec, allocate_bitmask, allowed_token_ids, apply_token_bitmask,
    json_schema_spec, spec_from_request,
)

SEEDS = range(20)
END_TOKENS = ("<|end_of_text|>", "<|eom|>", "<|eot|>")


def write_random_checkpoint(out_dir):
    try:  # after the cluster/ restructure
        from llama4serve.cluster.checkpoints.maker import write_checkpoint
    except ImportError:
        from llama4serve.cluster.checkpoints.maker import write_checkpoint
    return write_checkpoint(out_dir, "tiny-scout")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """(tokenizers.Tokenizer, GrammarCache) of a tiny-scout checkpoint (605 tokens, model vocab 608)."""
    from tokenizers import Tokenizer

    root = write_random_checkpoint(tmp_path_factory.mktemp("tiny-scout"))
    tokenizer = Tokenizer.from_file(str(root / "tokenizer.json"))
    vocab_size = json.loads((root / "config.json").read_text())["text_config"]["vocab_size"]
    stop_ids = [tokenizer.token_to_id(t) for t in END_TOKENS]
    return tokenizer, GrammarCache.from_tokenizer(root / "tokenizer.json", vocab_size, stop_ids)


def random_model_decode(cache, spec, seed, max_steps=6000):
    """Token ids of a random model decoding under ``spec``: uniform over the tokens the bitmask allows."""
    generator = torch.Generator().manual_seed(seed)
    matcher = cache.matcher(spec)
    bitmask = allocate_bitmask(1, cache.vocab_size)
    ids = []
    while not matcher.is_terminated():
        assert len(ids) < max_steps, "the grammar did not end"
        matcher.fill_bitmask(bitmask, 0)
        logits = apply_token_bitmask(torch.rand(1, cache.vocab_size, generator=generator), bitmask, [0])
        token = int(logits.argmax())
        assert matcher.accept(token)
        ids.append(token)
    return ids


def decode(model, spec, seed):
    tokenizer, cache = model
    return tokenizer.decode(random_model_decode(cache, spec, seed), skip_special_tokens=True)


WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "minLength": 1, "maxLength": 12},
        "days": {"type": "integer", "minimum": 1, "maximum": 14},
        "unit": {"enum": ["celsius", "fahrenheit"]},
        "alerts": {"type": "boolean"},
        "temps": {"type": "array", "items": {"type": "number"}, "maxItems": 3},
        "where": {"type": "object", "properties": {"lat": {"type": "number"}, "lon": {"type": "number"}},
                  "required": ["lat", "lon"], "additionalProperties": False},
        "note": {"type": "string", "maxLength": 8},
    },
    "required": ["city", "days", "unit", "alerts"],
    "additionalProperties": False,
}
PYDANTIC_STYLE = {  # what pydantic's model_json_schema() writes for a nested model with an optional field
    "$defs": {"Item": {"properties": {"sku": {"type": "string", "pattern": "^[A-Z]{3}[0-9]{2}$"},
                                      "qty": {"type": "integer", "exclusiveMinimum": 0}},
                       "required": ["sku", "qty"], "title": "Item", "type": "object"}},
    "properties": {"items": {"items": {"$ref": "#/$defs/Item"}, "maxItems": 2, "type": "array"},
                   "coupon": {"anyOf": [{"type": "string", "maxLength": 5}, {"type": "null"}]}},
    "required": ["items", "coupon"], "title": "Order", "type": "object",
}


@pytest.mark.parametrize("schema", [WEATHER, PYDANTIC_STYLE], ids=["weather", "pydantic"])
def test_json_schema_answers_of_a_random_model_validate(model, schema):
    spec = spec_from_request({"type": "json_schema", "json_schema": {"name": "answer", "schema": schema,
                                                                     "strict": True}})
    for seed in SEEDS:
        text = decode(model, spec, seed)
        jsonschema.validate(json.loads(text), schema)


def test_json_object_answers_are_objects(model):
    spec = spec_from_request({"type": "json_object"})
    for seed in SEEDS:
        assert isinstance(json.loads(decode(model, spec, seed)), dict)


def test_regex_choice_and_grammars_hold(model):
    regex = spec_from_request(structured_outputs={"regex": r"[0-9]{3}-[a-z]{2,4}"})
    choices = ["yes", "no", 'say "maybe"', "ünïcode\n"]
    choice = spec_from_request(structured_outputs={"choice": choices})
    ebnf = spec_from_request(structured_outputs={"grammar": 'root ::= "SELECT " [a-z]+ " FROM t" [0-9]'})
    lark = spec_from_request(structured_outputs={"grammar": 'start: "x=" NUMBER\nNUMBER: /[0-9]{1,3}/'})
    for seed in SEEDS:
        assert re.fullmatch(r"[0-9]{3}-[a-z]{2,4}", decode(model, regex, seed))
        assert decode(model, choice, seed) in choices
        assert re.fullmatch(r"SELECT [a-z]+ FROM t[0-9]", decode(model, ebnf, seed))
        assert re.fullmatch(r"x=[0-9]{1,3}", decode(model, lark, seed))


def test_whitespace_is_bounded(model):
    schema = {"type": "object", "properties": {"a": {"type": "array", "items": {"type": "integer"}},
                                               "b": {"type": "boolean"}}, "required": ["a", "b"]}
    compact = json_schema_spec(schema, "structured_outputs.json")
    loose = json_schema_spec(schema, "structured_outputs.json", max_whitespace=2)
    for seed in range(10):
        text = decode(model, compact, seed)
        assert text == json.dumps(json.loads(text))  # only ", " and ": ": nothing to loop on
        text = decode(model, loose, seed)
        json.loads(text)
        assert not re.search(r"\s{3}", text)


def test_special_and_padding_tokens_are_never_allowed_inside_a_string(model):
    tokenizer, cache = model
    matcher = cache.matcher(json_schema_spec({"type": "string"}, "structured_outputs.json"))
    bitmask = allocate_bitmask(1, cache.vocab_size)
    assert matcher.accept(tokenizer.token_to_id('"'))
    matcher.fill_bitmask(bitmask, 0)
    allowed = set(allowed_token_ids(bitmask[0]))
    specials = {tokenizer.token_to_id(t) for t in ("<|python_start|>", "<|header_start|>", "<|eot|>", "<|patch|>")}
    assert len(allowed) > 300 and not allowed & specials
    assert not allowed & set(range(tokenizer.get_vocab_size(), cache.vocab_size))  # ids 605..607: padding


def test_matcher_rollback_and_termination(model):
    tokenizer, cache = model
    matcher = cache.matcher(spec_from_request(structured_outputs={"choice": ["ab", "ac"]}))
    bitmask = allocate_bitmask(2, cache.vocab_size)
    matcher.fill_bitmask(bitmask, 0)
    a, b, c = (tokenizer.token_to_id(x) for x in "abc")
    assert not matcher.accept(tokenizer.token_to_id("z"))
    assert matcher.accept(a) and matcher.accept(b)
    assert matcher.is_completed() and not matcher.is_terminated()
    matcher.rollback(2)
    matcher.fill_bitmask(bitmask, 1)
    assert torch.equal(bitmask[0], bitmask[1])
    assert matcher.accept(a) and matcher.accept(c) and matcher.accept(tokenizer.token_to_id("<|eot|>"))
    assert matcher.is_terminated()


@pytest.mark.parametrize("backend", ["torch", "xgrammar", "auto"])
def test_apply_token_bitmask_leaves_other_rows_bit_identical(backend):
    import xgrammar as xgr

    generator = torch.Generator().manual_seed(0)
    vocab_size, rows = 608, [4, 1]
    logits = torch.randn(6, vocab_size, generator=generator)
    logits[0, 3], logits[2, 5], logits[4, 7] = float("nan"), float("-inf"), float("inf")
    bitmask = torch.randint(-2**31, 2**31 - 1, (len(rows), vocab_size // 32), dtype=torch.int32,
                            generator=generator)
    for dtype, bits in ((torch.float32, torch.int32), (torch.bfloat16, torch.int16)):
        before = logits.to(dtype)
        ours = apply_token_bitmask(before.clone(), bitmask, rows, backend=backend)
        reference = before.clone()
        full = allocate_bitmask(6, vocab_size)
        full[rows] = bitmask
        xgr.apply_token_bitmask_inplace(reference, full, indices=rows)  # xgrammar's own CPU kernel
        assert torch.equal(ours.view(bits), reference.view(bits))
        others = [r for r in range(6) if r not in rows]
        assert torch.equal(ours[others].view(bits), before[others].view(bits))
    alone = apply_token_bitmask(logits[4:5].clone(), bitmask[:1], [0], backend=backend)  # the row, batch of one
    assert torch.equal(alone[0].view(torch.int32),
                       apply_token_bitmask(logits.clone(), bitmask, rows, backend=backend)[4].view(torch.int32))
    untouched = apply_token_bitmask(logits.clone(), bitmask[:0], [], backend=backend)
    assert torch.equal(untouched.view(torch.int32), logits.view(torch.int32))
    beyond = apply_token_bitmask(torch.zeros(2, 40), allocate_bitmask(1, 32), [1], backend=backend)
    assert torch.isinf(beyond[1, 32:]).all() and (beyond[1, :32] == 0).all() and (beyond[0] == 0).all()


def test_cache_compiles_each_spec_once_and_is_thread_safe(model):
    _, cache = model
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}}
    spec = json_schema_spec(schema, "response_format.json_schema.schema")
    results = []
    threads = [threading.Thread(target=lambda: results.append(cache.compile(spec))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 8 and all(r is results[0] for r in results)
    same_schema_other_field = json_schema_spec(dict(schema), "structured_outputs.json")
    assert same_schema_other_field == spec and cache.compile(same_schema_other_field) is results[0]
    assert asyncio.run(cache.compile_async(spec)) is results[0]
    small = GrammarCache(cache.tokenizer_info, max_entries=1)
    first = small.compile(spec)
    small.compile(spec_from_request(structured_outputs={"regex": "a+"}))
    assert small.compile(spec) is not first  # evicted, compiled again


@pytest.mark.parametrize("request_fields, field", [
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"response_format": "json"}, "response_format"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "a b", "schema": {}}}},
     "response_format.json_schema.name"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "a"}}}, "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": [1]}}},
     "response_format.json_schema.schema"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs"),
    ({"structured_outputs": {}}, "structured_outputs"),
    ({"structured_outputs": {"whitespace_pattern": " "}}, "structured_outputs.whitespace_pattern"),
    ({"structured_outputs": {"choice": []}}, "structured_outputs.choice"),
    ({"structured_outputs": {"json": "{not json"}}, "structured_outputs.json"),
    ({"structured_outputs": {"regex": 5}}, "structured_outputs.regex"),
    ({"structured_outputs": {"json_object": False}}, "structured_outputs.json_object"),
    ({"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}}, "structured_outputs"),
])
def test_bad_request_fields_name_the_field(request_fields, field):
    with pytest.raises(ValueError) as error:
        spec_from_request(**request_fields)
    assert str(error.value).startswith(field)


@pytest.mark.parametrize("spec, message", [
    (json_schema_spec({"type": "objec"}, "response_format.json_schema.schema"),
     'response_format.json_schema.schema is not a valid JSON schema: Unsupported type "objec"'),
    (json_schema_spec({"properties": {"a": {"$ref": "#/$defs/missing"}}}, "structured_outputs.json"),
     "structured_outputs.json is not a valid JSON schema: "),
    (StructuredOutputSpec("regex", "a(b", field="structured_outputs.regex"),
     "structured_outputs.regex is not a valid regular expression: Regex parsing error at position 4"),
    (StructuredOutputSpec("grammar", 'root ::= "a" | undefined', field="structured_outputs.grammar"),
     "structured_outputs.grammar is not a valid EBNF or Lark grammar: EBNF parser error"),
    (StructuredOutputSpec("grammar", "start: missing_rule", field="structured_outputs.grammar"),
     "structured_outputs.grammar is not a valid EBNF or Lark grammar: Lark error"),
])
def test_invalid_grammars_raise_one_line_errors_naming_the_field(model, spec, message):
    _, cache = model
    with pytest.raises(ValueError) as error:
        cache.compile(spec)
    assert str(error.value).startswith(message) and "\n" not in str(error.value)
    assert not re.search(r"\[\d\d:\d\d:\d\d\]|\.cc:\d+", str(error.value))
    with pytest.raises(ValueError):  # a failed compile is not cached
        cache.compile(spec)


def test_plain_text_and_absent_fields_are_unconstrained():
    assert spec_from_request() is None
    assert spec_from_request({"type": "text"}) is None
    assert spec_from_request(structured_outputs={"regex": None, "choice": ["a"]}).kind == "choice"
    spec = spec_from_request(structured_outputs={"json": '{"type": "integer"}'})
    assert spec == json_schema_spec({"type": "integer"}, "x") and hash(spec) == hash(json_schema_spec(
        {"type": "integer"}, "y"))
    with pytest.raises(ValueError, match="max_whitespace"):
        StructuredOutputSpec("regex", "a", max_whitespace=-1)


def test_utf8_guard_blocks_the_overlong_and_surrogate_forms_xgrammar_lets_through(model):
    _, cache = model
    byte_token = {b[0]: i for i, b in enumerate(cache.tokenizer_info.decoded_vocab) if len(b) == 1}
    spec = json_schema_spec({"type": "string", "maxLength": 3}, "structured_outputs.json")
    for lead, low, high, good in [(0xE0, 0x80, 0x9F, 0xA0), (0xED, 0xA0, 0xBF, 0x80), (0xF0, 0x80, 0x8F, 0x90)]:
        matcher = cache.matcher(spec)
        bitmask = allocate_bitmask(1, cache.vocab_size)
        assert matcher.accept(byte_token[ord('"')]) and matcher.accept(byte_token[lead])
        matcher.fill_bitmask(bitmask, 0)
        allowed = set(allowed_token_ids(bitmask[0]))
        assert byte_token[good] in allowed
        assert not allowed & {byte_token[b] for b in range(low, high + 1)}
        matcher.rollback(1)  # the pending lead byte goes with the token
        matcher.fill_bitmask(bitmask, 0)
        assert byte_token[low] not in set(allowed_token_ids(bitmask[0]))  # a continuation byte cannot start
    never = {byte_token[b] for b in (0xC0, 0xC1, 0xF5, 0xFF)}
    matcher = cache.matcher(spec_from_request({"type": "json_object"}))
    matcher.accept(byte_token[ord("{")])
    matcher.accept(byte_token[ord('"')])
    bitmask = allocate_bitmask(1, cache.vocab_size)
    matcher.fill_bitmask(bitmask, 0)
    assert not set(allowed_token_ids(bitmask[0])) & never

"""Tool calling: request validation, the grammar of required / named calls (a random model decoding under it with
the real xgrammar always produces calls that validate), Llama 4 call parsing (peer bugs included), streaming
that assembles to the non-streamed parse, and what the chat template gets."""

import itertools
import json
import random
import re

import jsonschema
import pytest

from llama4serve.cluster.inputs.tool_calls import (
    PYTHON_END, PYTHON_START, ToolCallStreamParser, fallback_tool_prompt, normalize_messages, parse_tool_calls,
    template_has_tool_section, tool_call_spec, tool_chat_inputs, validate_tool_request,
)


def function_tool(name, parameters=None, description="test tool"):
    function = {"name": name, "description": description}
    if parameters is not None:
        function["parameters"] = parameters
    return {"type": "function", "function": function}


WEATHER = function_tool("get_weather", {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 10}, "unit": {"enum": ["celsius", "fahrenheit"]},
                   "days": {"type": "integer", "minimum": 1, "maximum": 7}},
    "required": ["city"],
})
ORDER = function_tool("place_order", {  # pydantic-style: $defs and $ref
    "$defs": {"Line": {"type": "object", "properties": {"sku": {"type": "string", "pattern": "^[A-Z]{2}[0-9]$"},
                                                        "qty": {"type": "integer", "minimum": 1}},
                       "required": ["sku", "qty"]}},
    "type": "object",
    "properties": {"lines": {"type": "array", "items": {"$ref": "#/$defs/Line"}, "minItems": 1, "maxItems": 2},
                   "express": {"type": "boolean"}},
    "required": ["lines", "express"],
})
PING = function_tool("ping")  # no parameters
TOOLS = [WEATHER, ORDER, PING]
NAMES = ["get_weather", "place_order", "ping"]


def counting_ids():
    counter = itertools.count()
    return lambda: f"call_{next(counter):024x}"


# --- parsing -----------------------------------------------------------------------------------------------

def test_text_before_a_call_is_kept_as_content():  # vLLM #22917
    for text in ['Let me check the weather. [get_weather(city="Paris")]',
                 'Let me check the weather.\n\n{"name": "get_weather", "parameters": {"city": "Paris"}}',
                 f'Let me check the weather. {PYTHON_START}[get_weather(city="Paris")]{PYTHON_END}']:
        content, calls = parse_tool_calls(text, NAMES)
        assert content == "Let me check the weather."
        assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
            ("get_weather", {"city": "Paris"})]


def test_json_calls_parse_where_pythonic_was_expected():  # vLLM #46863
    expected = [("get_weather", {"city": "Paris"}), ("ping", {})]
    for text in ['[{"name": "get_weather", "parameters": {"city": "Paris"}}, {"name": "ping", "parameters": {}}]',
                 '{"name": "get_weather", "arguments": {"city": "Paris"}}; {"name": "ping", "arguments": "{}"}',
                 f'{PYTHON_START}{PYTHON_END}{{"name": "get_weather", "parameters": {{"city": "Paris"}}}}'
                 '{"type": "function", "name": "ping", "parameters": {}}',
                 '[get_weather(city="Paris"), ping()]']:
        content, calls = parse_tool_calls(text, NAMES)
        assert content is None
        assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == expected


def test_a_call_in_a_single_streaming_delta_is_not_dropped():  # vLLM #48294
    for text in ['[get_weather(city="Paris")]', '{"name": "get_weather", "parameters": {"city": "Paris"}}',
                 f'{PYTHON_START}get_weather(city="Paris"){PYTHON_END}']:
        parser = ToolCallStreamParser(NAMES)
        deltas = parser.feed(text) + parser.finish()
        assert [d["tool_calls"][0]["function"]["name"] for d in deltas] == ["get_weather"]
        call = deltas[0]["tool_calls"][0]
        assert call["index"] == 0 and call["type"] == "function" and re.fullmatch(r"call_[0-9a-f]{24}", call["id"])
        assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}
    parser = ToolCallStreamParser(NAMES)
    assert parser.feed('Sure. [ping()] Done.') == [{"content": "Sure."}, {"tool_calls": [
        {"index": 0, **parser.tool_calls[0]}]}, {"content": " Done."}] and parser.finish() == []


def test_pythonic_arguments_are_literals_only():
    content, calls = parse_tool_calls(
        '[f(s="a\\"b", n=-3, x=1.5e3, t=true, u=None, items=[1, (2, 3)], m={"k": [False]}), g.h(q=\'é\')]')
    assert content is None
    assert [json.loads(c["function"]["arguments"]) for c in calls] == [
        {"s": 'a"b', "n": -3, "x": 1500.0, "t": True, "u": None, "items": [1, [2, 3]], "m": {"k": [False]}},
        {"q": "é"}]
    assert calls[1]["function"]["name"] == "g.h"
    for not_a_call in ['[f(x=__import__("os").system("true"))]', '[f(1, 2)]', '[f(**kw)]', '[f(x=1+2)]',
                       '[f(x={1, 2})]', '[f(x=b"raw")]', "[x for x in y]", "[link](http://a.b)", "[1, 2, 3]",
                       '{"key": "value"}', '{"name": "Bob", "age": 3}', '[f(x=1)', 'f(x=1)']:
        assert parse_tool_calls(not_a_call) == (not_a_call, [])


def test_unknown_tool_names_stay_content_and_ids_are_unique():
    assert parse_tool_calls("[delete_everything()]", NAMES) == ("[delete_everything()]", [])
    _, calls = parse_tool_calls("[ping(), ping(), ping()]", NAMES)
    assert len({c["id"] for c in calls}) == 3 and all(re.fullmatch(r"call_[0-9a-f]{24}", c["id"]) for c in calls)


OUTPUTS = [
    'I will look that up. [get_weather(city="Paris", unit="celsius"), ping()]',
    'Sure!\n{"name": "get_weather", "parameters": {"city": "Rome [old]", "days": 3}}\n',
    f'{PYTHON_START}Checking{PYTHON_END}{{"name": "ping", "parameters": {{}}}}; {{"name": "ping", "arguments": {{}}}}',
    f'{PYTHON_START}\nget_weather(city="Oslo")\n{PYTHON_END}',
    'Plain text with [brackets], {braces} and a <b>tag</b> <|python_st but no call.  ',
    'A list [1, 2] then a call [ping()] and after it, more text {"name": "x", "parameters": {}}',
    '[{"name": "place_order", "parameters": {"lines": [{"sku": "AB1", "qty": 2}], "express": false}}]',
    r"""[get_weather(city="a\"b]", unit='it\'s)')] {"name": "ping", "parameters": {"p": "x\\\"}"}}""",
]


def assemble(deltas):
    content = "".join(d.get("content", "") for d in deltas)
    calls = {}
    for delta in deltas:
        for call in delta.get("tool_calls", []):
            entry = calls.setdefault(call["index"], {"id": call["id"], "type": call["type"],
                                                     "function": {"name": "", "arguments": ""}})
            entry["function"]["name"] += call["function"].get("name") or ""
            entry["function"]["arguments"] += call["function"].get("arguments") or ""
    return (content or None), [calls[i] for i in sorted(calls)]


def stream(text, cuts, names=None):
    parser = ToolCallStreamParser(names, new_id=counting_ids())
    bounds = [0, *cuts, len(text)]
    deltas = [d for a, b in zip(bounds, bounds[1:]) for d in parser.feed(text[a:b])] + parser.finish()
    assert all(d.get("content") != "" for d in deltas)
    return assemble(deltas)


@pytest.mark.parametrize("text", OUTPUTS)
def test_streaming_assembles_to_the_non_streamed_parse(text):
    expected = parse_tool_calls(text, NAMES, new_id=counting_ids())
    rng = random.Random(0)
    chunkings = [[cut] for cut in range(1, len(text))] + [list(range(1, len(text)))]
    chunkings += [sorted(rng.sample(range(1, len(text)), 5)) for _ in range(20)]
    for cuts in chunkings:
        assert stream(text, cuts, NAMES) == expected, cuts


def test_content_is_released_as_soon_as_it_cannot_start_a_call():
    parser = ToolCallStreamParser(NAMES)
    assert parser.feed("Hello wor") == [{"content": "Hello wor"}]
    assert parser.feed("ld [") == [{"content": "ld"}]  # " [" may start a call (and then loses its space)
    assert parser.feed("1, 2] ") == [{"content": " [1, 2]"}]  # "[1" cannot; a trailing space waits
    assert parser.feed("<|pyth") == [] and parser.feed("on_start|>") == [] and parser.feed("ping") == []
    assert parser.feed("()") == [{"tool_calls": [{"index": 0, **parser.tool_calls[0]}]}]


# --- requests and the grammar of required / named calls ------------------------------------------------------

@pytest.mark.parametrize("fields, field", [
    ({"tools": {"a": 1}}, "tools"),
    ({"tools": [{"type": "code_interpreter"}]}, "tools[0].type"),
    ({"tools": [{"type": "function"}]}, "tools[0].function"),
    ({"tools": [function_tool("has space")]}, "tools[0].function.name"),
    ({"tools": [PING, function_tool("ping")]}, "tools[1].function.name"),
    ({"tools": [function_tool("f", {"type": "string"})]}, "tools[0].function.parameters"),
    ({"tools": [function_tool("f", [1])]}, "tools[0].function.parameters"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": {"type": "function"}}, "tool_choice"),
    ({"tools": None, "tool_choice": "required"}, "tool_choice"),
    ({"tools": TOOLS, "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
])
def test_bad_tool_fields_name_the_field(fields, field):
    with pytest.raises(ValueError) as error:
        validate_tool_request(**fields)
    assert str(error.value).startswith(field)


def test_tool_request_defaults():
    assert validate_tool_request(None) is None and validate_tool_request([], "none") is None
    request = validate_tool_request(TOOLS)
    assert (request.tool_choice, request.parallel_tool_calls, request.tool_names) == ("auto", True, NAMES)
    assert request.tools[2]["function"]["parameters"] == {"type": "object", "properties": {}}
    assert tool_call_spec(request) is None and tool_call_spec(validate_tool_request(TOOLS, "none")) is None
    named = validate_tool_request(TOOLS, {"type": "function", "function": {"name": "ping"}}, False)
    assert (named.tool_choice, named.function_name, named.parallel_tool_calls) == ("function", "ping", False)
    assert json.loads(tool_call_spec(named).payload)["properties"]["name"] == {"const": "ping"}


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory):
    """A random tiny-scout checkpoint (its tokenizer: 605 tokens; model vocab_size 608)."""
    try:  # after the cluster/ restructure
        from llama4serve.cluster.checkpoints.maker import write_checkpoint
    except ImportError:
        from llama4serve.cluster.checkpoints.maker import write_checkpoint
    return write_checkpoint(tmp_path_factory.mktemp("tiny-scout"), "tiny-scout")


@pytest.fixture(scope="module")
def grammar_model(checkpoint_dir):
    from tokenizers import Tokenizer

    from llama4serve.cluster.inputs.structured import GrammarCache

    root = checkpoint_dir
    tokenizer = Tokenizer.from_file(str(root / "tokenizer.json"))
    stop_ids = [tokenizer.token_to_id(t) for t in ("<|end_of_text|>", "<|eom|>", "<|eot|>")]
    vocab_size = json.loads((root / "config.json").read_text())["text_config"]["vocab_size"]
    return tokenizer, GrammarCache.from_tokenizer(tokenizer, vocab_size, stop_ids)


def random_model_text(grammar_model, spec, seed):
    """A random model decoding under ``spec``: each token uniform among those the bitmask allows."""
    from llama4serve.cluster.inputs.structured import allocate_bitmask, allowed_token_ids

    tokenizer, cache = grammar_model
    rng, matcher, bitmask, ids = random.Random(seed), cache.matcher(spec), allocate_bitmask(1, cache.vocab_size), []
    while not matcher.is_terminated():
        assert len(ids) < 6000, "the tool grammar did not end"
        matcher.fill_bitmask(bitmask, 0)
        ids.append(rng.choice(allowed_token_ids(bitmask[0])))
        assert matcher.accept(ids[-1])
    return ids, tokenizer.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("tool_choice, parallel", [
    ("required", True), ("required", False), ({"type": "function", "function": {"name": "place_order"}}, True),
    ({"type": "function", "function": {"name": "get_weather"}}, False),
])
def test_required_and_named_calls_of_a_random_model_parse_and_validate(grammar_model, tool_choice, parallel):
    request = validate_tool_request(TOOLS, tool_choice, parallel)
    spec = tool_call_spec(request)
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in request.tools}
    tokenizer, _ = grammar_model
    for seed in range(20):
        ids, text = random_model_text(grammar_model, spec, seed)
        content, calls = parse_tool_calls(text, request.tool_names, new_id=counting_ids())
        assert content is None and calls, text
        assert parallel or len(calls) == 1
        for call in calls:
            assert request.tool_choice == "required" or call["function"]["name"] == request.function_name
            jsonschema.validate(json.loads(call["function"]["arguments"]), schemas[call["function"]["name"]])
        assert assemble(stream_tokens(tokenizer, ids, request.tool_names)) == (content, calls)


def stream_tokens(tokenizer, ids, names):
    """Chat deltas of ``ids`` streamed one token at a time, text released as a detokenizer does."""
    parser, deltas, released = ToolCallStreamParser(names, new_id=counting_ids()), [], ""
    for i in range(len(ids)):
        text = tokenizer.decode(ids[:i + 1], skip_special_tokens=True)
        if not text.endswith("\ufffd"):  # hold an incomplete character back
            deltas += parser.feed(text[len(released):])
            released = text
    deltas += parser.feed(tokenizer.decode(ids, skip_special_tokens=True)[len(released):])
    return deltas + parser.finish()


# --- chat template inputs -------------------------------------------------------------------------------------

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_0", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "call_0", "content": [{"type": "text", "text": "18 C, sunny"}]},
    {"role": "assistant", "content": "It is sunny.", "tool_calls": []},
]


def test_messages_are_normalized_for_llama4_templates():
    messages = normalize_messages(CONVERSATION)
    assert messages[2]["content"] == "" and messages[2]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}
    assert messages[3]["content"] == "18 C, sunny" and "tool_calls" not in messages[4]
    assert CONVERSATION[2]["content"] is None  # the caller's messages are not modified
    bad = [dict(CONVERSATION[2], tool_calls=[{"type": "function", "function": {"name": "f", "arguments": "{"}}])]
    with pytest.raises(ValueError, match=r"^messages\[0\]\.tool_calls\[0\]\.function\.arguments"):
        normalize_messages(bad)


def test_templates_without_a_tool_section_get_the_tools_in_the_system_message(checkpoint_dir):
    try:  # after the cluster/ restructure
        from llama4serve.cluster.inputs.tokenizer import Tokenizer
    except ImportError:
        from llama4serve.cluster.inputs.tokenizer import Tokenizer

    root = checkpoint_dir
    template = (root / "chat_template.jinja").read_text()
    assert not template_has_tool_section(template)
    request = validate_tool_request(TOOLS, "required")
    messages, variables = tool_chat_inputs(CONVERSATION, request, template)
    assert variables == {} and messages[0]["content"] == fallback_tool_prompt(request) + "\n\nBe brief."
    prompt = Tokenizer.from_dir(root).apply_chat_template(messages, **variables)
    assert '"name": "place_order"' in prompt and "You must call one of them." in prompt
    assert '<|python_start|><|python_end|>{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot|>' in prompt
    assert '<|header_start|>ipython<|header_end|>\n\n"18 C, sunny"<|eot|>' in prompt
    none_messages, _ = tool_chat_inputs(CONVERSATION, validate_tool_request(TOOLS, "none"), template)
    assert none_messages[0]["content"] == "Be brief."


def test_templates_with_a_tool_section_get_the_tools_variable():
    template = "{% for t in tools or [] %}{{ t.function.name }};{% endfor %}{{ messages | length }}"
    assert template_has_tool_section(template) and template_has_tool_section("{{ custom_tools }}")
    request = validate_tool_request(TOOLS, {"type": "function", "function": {"name": "ping"}})
    messages, variables = tool_chat_inputs(CONVERSATION[1:2], request, template)
    assert messages == CONVERSATION[1:2] and variables == {"tools": list(request.tools)}
    assert "You must call ping." in fallback_tool_prompt(request)

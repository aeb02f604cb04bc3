"""Structured outputs and tool calling end to end: the real Serve HTTP and gRPC servers, the `openai` client and
gRPC stubs, a random tiny checkpoint (only constrained decoding makes its answers valid)."""

from __future__ import annotations

import asyncio
import json
import re

import grpc
import jsonschema
import pytest
from openai import AsyncOpenAI, BadRequestError, OpenAI
from pydantic import BaseModel, Field

from serve_helpers import free_port

from llama4serve.cluster.checkpoints.maker import write_checkpoint
from llama4serve.cluster.cli.serve_cmd import APP_NAME, start_serve
from llama4serve.cluster.serving.serve_config import ServeConfig
from llama4serve.protos import llama4serve_pb2 as pb, llama4serve_pb2_grpc as pb_grpc

MODEL = "tiny-maverick"
SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 150},
                                           "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3}},
          "required": ["name", "age", "tags"], "additionalProperties": False}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                         "unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "add", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 999},
                                         "b": {"type": "integer", "minimum": 0, "maximum": 999}},
        "required": ["a", "b"], "additionalProperties": False}}},
]
PARAMETERS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ASK = [{"role": "user", "content": "What is the weather in Paris, and what is 2 + 3?"}]
SEEDS = range(20)


@pytest.fixture(scope="module")
def server(ray_session, tmp_path_factory):
    from ray import serve

    model = write_checkpoint(tmp_path_factory.mktemp("structured-serve") / MODEL, MODEL)
    config = ServeConfig(model=str(model), dtype="float32", http_port=free_port(), grpc_port=free_port(),
                         max_model_len=4096)
    start_serve(config)
    yield config
    serve.delete(APP_NAME)
    serve.shutdown()  # the next module starts Serve on its own ports


def _client(config: ServeConfig) -> OpenAI:
    return OpenAI(base_url=f"http://127.0.0.1:{config.http_port}/v1", api_key="EMPTY", max_retries=0, timeout=120)


def _many(config: ServeConfig, **kwargs) -> list:
    """One chat completion per seed, all in flight at once."""
    async def run():
        client = AsyncOpenAI(base_url=f"http://127.0.0.1:{config.http_port}/v1", api_key="EMPTY", max_retries=0,
                             timeout=120)
        try:
            return await asyncio.gather(*(client.chat.completions.create(model=MODEL, seed=s, **kwargs)
                                          for s in SEEDS))
        finally:
            await client.close()

    return asyncio.run(asyncio.wait_for(run(), timeout=300))


def test_json_schema_answers_validate_over_20_seeds(server):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}}
    for reply in _many(server, messages=ASK, response_format=fmt, temperature=1.0, max_completion_tokens=160):
        choice = reply.choices[0]
        assert choice.finish_reason == "stop", choice.message.content
        jsonschema.validate(json.loads(choice.message.content), SCHEMA)


def test_required_tool_calls_parse_and_validate_over_20_seeds(server):
    for reply in _many(server, messages=ASK, tools=TOOLS, tool_choice="required", temperature=1.0,
                       parallel_tool_calls=False, max_completion_tokens=200):
        choice = reply.choices[0]
        assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1, choice.message
        assert choice.message.content is None
        for call in choice.message.tool_calls:
            assert call.type == "function" and re.fullmatch(r"call_[0-9a-f]{24}", call.id)
            jsonschema.validate(json.loads(call.function.arguments), PARAMETERS[call.function.name])


def test_named_tool_call_and_streamed_calls_assemble_to_the_unstreamed_ones(server):
    client = _client(server)
    for choice_arg, parallel in (("required", True), ({"type": "function", "function": {"name": "add"}}, False)):
        kwargs = dict(model=MODEL, messages=ASK, tools=TOOLS, tool_choice=choice_arg, temperature=1.0, seed=7,
                      parallel_tool_calls=parallel, max_completion_tokens=800)
        whole = client.chat.completions.create(**kwargs).choices[0]
        calls: dict[int, dict] = {}
        finish = None
        for chunk in client.chat.completions.create(stream=True, **kwargs):
            delta = chunk.choices[0].delta
            for call in delta.tool_calls or []:
                entry = calls.setdefault(call.index, {"id": call.id, "name": "", "arguments": ""})
                entry["name"] += call.function.name or ""
                entry["arguments"] += call.function.arguments or ""
            finish = chunk.choices[0].finish_reason or finish
        assert finish == whole.finish_reason == "tool_calls"
        assert [(c["name"], c["arguments"]) for _, c in sorted(calls.items())] == \
            [(c.function.name, c.function.arguments) for c in whole.message.tool_calls]
        if isinstance(choice_arg, dict):
            assert {c.function.name for c in whole.message.tool_calls} == {"add"}


class Person(BaseModel):
    name: str = Field(max_length=10)
    age: int = Field(ge=0, le=120)


def test_beta_parse_with_a_pydantic_model(server):
    client = _client(server)
    for seed in range(3):
        completion = client.beta.chat.completions.parse(model=MODEL, messages=ASK, response_format=Person,
                                                        temperature=1.0, seed=seed, max_completion_tokens=120)
        parsed = completion.choices[0].message.parsed
        assert isinstance(parsed, Person) and 0 <= parsed.age <= 120


def test_vllm_structured_outputs_on_completions_and_tool_messages(server):
    client = _client(server)
    out = client.completions.create(model=MODEL, prompt="Pick one:", max_tokens=20, seed=3,
                                    extra_body={"structured_outputs": {"choice": ["red", "green", "blue"]}})
    assert out.choices[0].text in ("red", "green", "blue") and out.choices[0].finish_reason == "stop"
    out = client.completions.create(model=MODEL, prompt="Code:", max_tokens=20, seed=3,
                                    extra_body={"structured_outputs": {"regex": r"[A-Z]{3}-\d{2}"}})
    assert re.fullmatch(r"[A-Z]{3}-\d{2}", out.choices[0].text)
    history = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"},
    ]
    reply = client.chat.completions.create(model=MODEL, messages=history, tools=TOOLS, max_completion_tokens=8,
                                           temperature=0, extra_body={"structured_outputs": {"json_object": True}})
    assert reply.choices[0].message.content.startswith("{")


@pytest.mark.parametrize("kwargs, param, words", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objekt"}}}},
     "response_format.json_schema.schema", ["JSON schema"]),
    ({"extra_body": {"structured_outputs": {"regex": "(unclosed"}}}, "structured_outputs.regex", ["regular"]),
    ({"extra_body": {"structured_outputs": {"grammar": "root ::= nothing_here"}}}, "structured_outputs.grammar",
     ["grammar"]),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "fly"}}}, "tool_choice.function.name",
     ["'fly'", "get_weather"]),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}]},
     "tools[0].function.parameters", ["object"]),
])
def test_bad_input_is_a_400_naming_the_field_and_the_server_keeps_serving(server, kwargs, param, words):
    client = _client(server)
    with pytest.raises(BadRequestError) as caught:
        client.chat.completions.create(model=MODEL, messages=ASK, max_completion_tokens=4, **kwargs)
    error = caught.value.body
    assert error["param"] == param and all(w in error["message"] for w in words), error
    ok = client.chat.completions.create(model=MODEL, messages=ASK, max_completion_tokens=3, temperature=0)
    assert ok.choices[0].finish_reason in ("stop", "length")


def test_grpc_structured_outputs_and_invalid_argument(server):
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        stub = pb_grpc.Llama4ServeStub(channel)
        choice = pb.StructuredOutputs(choice=pb.ChoiceList(choices=["yes", "no"]))
        reply = stub.Generate(pb.GenerateRequest(text="Answer:", max_tokens=8, seed=1, structured_outputs=choice),
                              timeout=120)
        assert reply.text in ("yes", "no")
        schema = pb.StructuredOutputs(json=json.dumps(SCHEMA))
        reply = stub.Generate(pb.GenerateRequest(text="JSON:", max_tokens=160, seed=2, structured_outputs=schema),
                              timeout=120)
        jsonschema.validate(json.loads(reply.text), SCHEMA)
        for bad, words in [(pb.StructuredOutputs(regex="(unclosed"), "structured_outputs.regex"),
                           (pb.StructuredOutputs(json="{not json"), "structured_outputs.json"),
                           (pb.StructuredOutputs(), "structured_outputs is empty")]:
            with pytest.raises(grpc.RpcError) as caught:
                stub.Generate(pb.GenerateRequest(text="x", max_tokens=4, structured_outputs=bad), timeout=120)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert words in caught.value.details(), caught.value.details()

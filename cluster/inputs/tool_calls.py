"""Tool calling requests: validate ``tools`` / ``tool_choice`` / ``parallel_tool_calls``, build the grammar that
``required`` or a named function decodes under (so the call always parses), and prepare the messages and
variables the chat template gets. Pure Python (jinja2 only to inspect a template).

Parsing model output into OpenAI ``tool_calls`` lives in ``tool_call_parser``; its public names are
re-exported here.

Chat templates: the released Llama 4 template has a tool section. It reads ``tools`` (the OpenAI tool dicts,
rendered with ``tojson(indent=4)`` and an instruction to answer ``{"name": ..., "parameters": ...}``; into the
first user message unless ``tools_in_user_message`` is false, else the system message), assistant messages'
``tool_calls`` (``function.name`` and ``function.arguments`` as a mapping: it renders ``<|python_start|>``
content ``<|python_end|>`` then ``{"name": ..., "parameters": <arguments|tojson>}`` per call) and ``tool`` /
``ipython`` messages (header ``ipython``, content JSON-encoded). For templates without a tool section (such as
the random checkpoints') the tools go into the system message as ``FALLBACK_TOOL_PROMPT`` says.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from typing import Any, Sequence

from llama4serve.cluster.inputs.structured import StructuredOutputSpec, json_schema_spec
from llama4serve.cluster.inputs.tool_call_parser import (
    PYTHON_END, PYTHON_START, ToolCallStreamParser, make_tool_call, new_tool_call_id, parse_tool_calls,
)

__all__ = [
    "FALLBACK_TOOL_PROMPT", "PYTHON_END", "PYTHON_START", "ToolCallStreamParser", "ToolRequest",
    "fallback_tool_prompt", "make_tool_call", "new_tool_call_id", "normalize_messages", "parse_tool_calls",
    "template_has_tool_section", "tool_call_spec", "tool_chat_inputs", "validate_tool_request",
]

_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


@dataclass(frozen=True)
class ToolRequest:
    """A request's validated tool settings. ``tool_choice``: "none" | "auto" | "required" | "function" (then
    ``function_name`` is the forced one). ``tools`` are OpenAI function tools with ``parameters`` always set."""

    tools: tuple[dict, ...]
    tool_choice: str
    function_name: str | None
    parallel_tool_calls: bool

    @property
    def tool_names(self) -> list[str]:
        return [t["function"]["name"] for t in self.tools]


def validate_tool_request(tools: Any, tool_choice: Any = None,
                          parallel_tool_calls: Any = None) -> ToolRequest | None:
    """Check OpenAI ``tools``, ``tool_choice`` and ``parallel_tool_calls``; ``None`` when no tools are in play.

    ``tool_choice`` defaults to "auto" with tools, "none" without; ``parallel_tool_calls`` to true. Bad input
    raises ``ValueError`` naming the field (``tools[1].function.parameters``, ``tool_choice``, ...).
    """
    if parallel_tool_calls not in (None, True, False):
        raise ValueError(f"parallel_tool_calls is {parallel_tool_calls!r}; allowed true or false")
    checked = _validate_tools(tools)
    names = [t["function"]["name"] for t in checked]
    if tool_choice is None:
        tool_choice = "auto" if checked else "none"
    function_name = None
    if isinstance(tool_choice, dict):
        function = tool_choice.get("function")
        if tool_choice.get("type") != "function" or not isinstance(function, dict):
            raise ValueError('tool_choice must be "none", "auto", "required" or '
                             '{"type": "function", "function": {"name": ...}}')
        function_name = function.get("name")
        if function_name not in names:
            raise ValueError(f"tool_choice.function.name {function_name!r} is not one of the tools "
                             f"({', '.join(names) or 'none given'})")
        tool_choice = "function"
    elif tool_choice not in ("none", "auto", "required"):
        raise ValueError(f'tool_choice is {tool_choice!r}; allowed "none", "auto", "required" or a named function')
    if tool_choice == "required" and not checked:
        raise ValueError('tool_choice "required" needs at least one entry in tools')
    if not checked:
        return None
    return ToolRequest(tuple(checked), tool_choice, function_name, parallel_tool_calls is not False)


def _validate_tools(tools: Any) -> list[dict]:
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise ValueError(f"tools must be a list of function tools, got {type(tools).__name__}")
    checked, seen = [], set()
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type") != "function":
            raise ValueError(f'{where}.type must be "function" (the only tool type supported)')
        function = tool.get("function")
        if not isinstance(function, dict):
            raise ValueError(f"{where}.function must be an object with name, description and parameters")
        name = function.get("name")
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise ValueError(f"{where}.function.name is {name!r}; allowed 1-64 of a-z, A-Z, 0-9, _, . and -")
        if name in seen:
            raise ValueError(f"{where}.function.name {name!r} is given twice")
        seen.add(name)
        if function.get("description") is not None and not isinstance(function["description"], str):
            raise ValueError(f"{where}.function.description must be a string")
        parameters = function.get("parameters")
        if parameters is None:
            parameters = {"type": "object", "properties": {}}
        if not isinstance(parameters, dict) or parameters.get("type", "object") != "object":
            raise ValueError(f'{where}.function.parameters must be a JSON schema object ({{"type": "object", '
                             f'"properties": ...}}), got {json.dumps(parameters)[:80]}')
        checked.append({"type": "function", "function": {**function, "parameters": {"type": "object",
                                                                                    **parameters}}})
    return checked


def tool_call_spec(request: ToolRequest | None) -> StructuredOutputSpec | None:
    """The JSON-schema spec that ``required`` or a named function decodes under (``None`` for auto / none).

    The output is the JSON call format: one ``{"name": ..., "parameters": {...}}`` object, or with
    ``parallel_tool_calls`` a non-empty list of them; the parameters follow the tool's schema (strict).
    """
    if request is None or request.tool_choice not in ("required", "function"):
        return None
    indexed = [(i, t) for i, t in enumerate(request.tools)
               if request.tool_choice == "required" or t["function"]["name"] == request.function_name]
    defs: dict[str, Any] = {}
    calls = []
    for i, tool in indexed:
        parameters = tool["function"]["parameters"]
        if "$ref" in json.dumps(parameters):  # refs are relative to the root: move the schema under $defs
            defs[f"tool_{i}"] = _rebase_refs(parameters, f"#/$defs/tool_{i}")
            parameters = {"$ref": f"#/$defs/tool_{i}"}
        calls.append({"type": "object", "properties": {"name": {"const": tool["function"]["name"]},
                                                       "parameters": parameters},
                      "required": ["name", "parameters"], "additionalProperties": False})
    call = calls[0] if len(calls) == 1 else {"anyOf": calls}
    schema = {"type": "array", "items": call, "minItems": 1} if request.parallel_tool_calls else dict(call)
    if defs:
        schema["$defs"] = defs
    field = f"tools[{indexed[0][0]}].function.parameters" if len(indexed) == 1 else "tools"
    return json_schema_spec(schema, field)


def _rebase_refs(schema: Any, base: str) -> Any:
    if isinstance(schema, list):
        return [_rebase_refs(s, base) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _rebase_refs(v, base) for k, v in schema.items()}
    ref = out.get("$ref")
    if isinstance(ref, str) and (ref == "#" or ref.startswith("#/")):
        out["$ref"] = base + ref[1:]
    return out


FALLBACK_TOOL_PROMPT = """\
Environment: ipython
You can call the functions described below. To call {what}, answer with nothing but {form}. {requirement}

Functions:
{functions}"""
_FORMS = {True: ("functions", 'a JSON list of calls, each {"name": <function name>, "parameters": <object of '
                              'argument values>}, for example [{"name": "get_weather", "parameters": {"city": '
                              '"Paris"}}]'),
          False: ("a function", 'one JSON call {"name": <function name>, "parameters": <object of argument '
                                'values>}, for example {"name": "get_weather", "parameters": {"city": "Paris"}}')}
_REQUIREMENTS = {"auto": "When no function helps, answer in plain text.",
                 "required": "You must call one of them.", "function": "You must call {name}."}


@functools.lru_cache(maxsize=16)
def template_has_tool_section(chat_template: str | None) -> bool:
    """Whether a chat template reads the ``tools`` (or ``custom_tools``) variable."""
    if not chat_template:
        return False
    import jinja2
    from jinja2 import meta

    names = meta.find_undeclared_variables(jinja2.Environment().parse(chat_template))
    return bool({"tools", "custom_tools"} & names)


def fallback_tool_prompt(request: ToolRequest) -> str:
    """The system-prompt text that shows ``request.tools`` to a template without a tool section."""
    functions = "\n\n".join(json.dumps(t, indent=4, ensure_ascii=False) for t in request.tools)
    what, form = _FORMS[request.parallel_tool_calls]
    requirement = _REQUIREMENTS[request.tool_choice].format(name=request.function_name)
    return FALLBACK_TOOL_PROMPT.format(what=what, form=form, requirement=requirement, functions=functions)


def tool_chat_inputs(messages: Sequence[dict], request: ToolRequest | None,
                     chat_template: str | None) -> tuple[list[dict], dict]:
    """(messages, extra template variables) for ``apply_chat_template(messages, **variables)``.

    Messages are normalized for Llama 4 templates (``normalize_messages``). Tools are shown unless
    ``tool_choice`` is "none": as ``tools`` when the template has a tool section, else in the system message.
    """
    messages = normalize_messages(messages)
    if request is None or request.tool_choice == "none":
        return messages, {}
    if template_has_tool_section(chat_template):
        return messages, {"tools": list(request.tools)}
    prompt = fallback_tool_prompt(request)
    if messages and messages[0]["role"] == "system":
        system = _text(messages[0].get("content"))
        messages[0] = {**messages[0], "content": prompt + ("\n\n" + system if system else "")}
    else:
        messages.insert(0, {"role": "system", "content": prompt})
    return messages, {}


def normalize_messages(messages: Sequence[dict]) -> list[dict]:
    """Copies of ``messages`` as Llama 4 templates need them: assistant ``tool_calls[].function.arguments`` as a
    mapping (OpenAI sends JSON text), their content "" instead of null, empty ``tool_calls`` dropped, ``tool``
    message content as text. ``ValueError`` naming ``messages[i]...`` for a malformed call."""
    out = []
    for i, message in enumerate(messages):
        message = dict(message)
        if not message.get("tool_calls"):
            message.pop("tool_calls", None)
        else:
            if message.get("role") != "assistant":
                raise ValueError(f"messages[{i}].tool_calls is only allowed on assistant messages")
            message["tool_calls"] = [_template_call(call, f"messages[{i}].tool_calls[{j}]")
                                     for j, call in enumerate(message["tool_calls"])]
            message["content"] = message.get("content") or ""
        if message.get("role") in ("tool", "ipython"):
            message["content"] = _text(message.get("content"))
        out.append(message)
    return out


def _template_call(call: Any, where: str) -> dict:
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise ValueError(f'{where} must be {{"id", "type": "function", "function": {{"name", "arguments"}}}}')
    arguments = function.get("arguments") or {}
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}.function.arguments is not valid JSON: {e}") from None
    if not isinstance(arguments, dict):
        raise ValueError(f"{where}.function.arguments must encode a JSON object")
    return {**call, "type": "function", "function": {"name": function["name"], "arguments": arguments}}


def _text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content if isinstance(part, dict))

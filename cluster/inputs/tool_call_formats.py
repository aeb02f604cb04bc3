"""Llama 4's two tool-call formats read into (name, arguments) pairs: JSON (`{"name": ..., "parameters": ...}`,
or a list of them) and pythonic (`[get_weather(city="Paris")]`, literals only, read with `ast`, never
evaluated). Pure Python."""

from __future__ import annotations

import ast
import json
import math
from typing import Any

_JSON_LITERALS = {"true": True, "false": False, "null": None, "True": True, "False": False, "None": None}


def parse_call_block(block: str, tool_names: set[str] | None) -> list[tuple[str, dict]] | None:
    calls = None
    if block[0] in "[{":
        try:
            calls = _calls_from_json(json.loads(block))
        except ValueError:
            calls = None
    if calls is None and block[0] != "{":
        calls = _calls_from_python(block)
    if calls and tool_names is not None and any(name not in tool_names for name, _ in calls):
        return None
    return calls


def _calls_from_json(value: Any) -> list[tuple[str, dict]] | None:
    items = value if isinstance(value, list) else [value]
    calls = []
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str) \
                or set(item) - {"name", "parameters", "arguments", "type"}:
            return None
        arguments = item.get("parameters", item.get("arguments"))
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except ValueError:
                return None
        if not isinstance(arguments, dict):
            return None
        calls.append((item["name"], arguments))
    return calls or None


def _calls_from_python(block: str) -> list[tuple[str, dict]] | None:
    try:
        tree = ast.parse(block, mode="eval").body
    except (SyntaxError, ValueError, RecursionError):
        return None
    nodes = tree.elts if isinstance(tree, ast.List) else [tree]
    calls = []
    for node in nodes:
        if not isinstance(node, ast.Call) or node.args or any(k.arg is None for k in node.keywords):
            return None
        name = _dotted_name(node.func)
        try:
            arguments = {k.arg: _literal(k.value) for k in node.keywords}
        except ValueError:
            return None
        if name is None:
            return None
        calls.append((name, arguments))
    return calls or None


def _dotted_name(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted_name(node.value)
        return None if base is None else f"{base}.{node.attr}"
    return None


def _literal(node: ast.AST) -> Any:
    """A JSON value from a Python (or JSON-spelled) literal; ValueError for anything else."""
    if isinstance(node, ast.Constant) and isinstance(node.value, (str, int, float, type(None))):
        if isinstance(node.value, float) and not math.isfinite(node.value):
            raise ValueError("not a finite number")
        return node.value
    if isinstance(node, ast.Name) and node.id in _JSON_LITERALS:
        return _JSON_LITERALS[node.id]
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _literal(node.operand)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError("sign on a non-number")
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_literal(e) for e in node.elts]
    if isinstance(node, ast.Dict):
        keys = [_literal(k) if k is not None else None for k in node.keys]
        if any(not isinstance(k, str) for k in keys):
            raise ValueError("dict keys must be strings")
        return {k: _literal(v) for k, v in zip(keys, node.values)}
    raise ValueError(f"{type(node).__name__} is not a literal")

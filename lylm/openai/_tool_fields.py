"""Tool fields of a chat request: declared ``tools``, ``tool_choice``, an assistant turn's
earlier ``tool_calls``, and ``chat_template_kwargs`` (validated; what vLLM's parsers then
do with them is in ``_tool_calls``)."""

from __future__ import annotations

from typing import Any

from ._errors import bad_request
from ._fields import _bool, _invalid, _object, _one_of, _required, _show, _str

MAX_TOOLS = 128
"""The most tools one request may declare (OpenAI's limit)."""

_TOOL_CHOICES = ("none", "auto", "required")
# Chat template variables lylm sets itself: a request's chat_template_kwargs may not.
_RESERVED_TEMPLATE_KWARGS = frozenset(
    {"tools", "add_generation_prompt", "continue_final_message", "tokenize", "chat_template", "messages"}
)


def _tool_calls(value: Any, path: str) -> list[dict[str, Any]] | None:
    """An assistant message's earlier tool calls: ``[{id, type: function, function: {name, arguments}}]``."""
    if value is None:
        return None
    if not isinstance(value, list):
        raise _invalid(path, "a list of tool calls", value)
    calls = []
    for i, call in enumerate(value):
        where = f"{path}[{i}]"
        _object(call, where, {"id", "type", "function"})
        call_id = _str(_required(call, "id", f"{where}.id"), f"{where}.id")
        _function_type(call, where)
        function = _object(_required(call, "function", f"{where}.function"), f"{where}.function", {"name", "arguments"})
        name = _str(_required(function, "name", f"{where}.function.name"), f"{where}.function.name")
        arguments = _str(_required(function, "arguments", f"{where}.function.arguments"), f"{where}.function.arguments")
        calls.append({"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}})
    return calls


def _function_type(obj: dict[str, Any], path: str) -> None:
    kind = _required(obj, "type", f"{path}.type")
    if kind != "function":
        raise _invalid(f"{path}.type", "'function'", kind)


def _tools(value: Any) -> list[dict[str, Any]] | None:
    """``tools``: function declarations, as sent (checked, not rewritten)."""
    if value is None:
        return None
    if not isinstance(value, list) or not value:
        # An empty list is refused as vLLM and OpenAI refuse it: omit the field instead.
        raise _invalid("tools", "a non-empty list of tools (omit it for none)", value)
    if len(value) > MAX_TOOLS:
        raise bad_request(f"'tools' has {len(value)} tools; at most {MAX_TOOLS} are accepted", param="tools")
    names: set[str] = set()
    for i, tool in enumerate(value):
        where = f"tools[{i}]"
        _object(tool, where, {"type", "function"})
        _function_type(tool, where)
        keys = {"name", "description", "parameters", "strict"}
        function = _object(_required(tool, "function", f"{where}.function"), f"{where}.function", keys)
        name = _str(_required(function, "name", f"{where}.function.name"), f"{where}.function.name")
        if not name:
            raise _invalid(f"{where}.function.name", "a non-empty string", name)
        if name in names:
            raise bad_request(f"'{where}.function.name': {_show(name)} is declared twice", param=f"{where}.function.name")
        names.add(name)
        _str(function.get("description"), f"{where}.function.description")
        parameters = function.get("parameters")
        if parameters is not None and not isinstance(parameters, dict):
            raise _invalid(f"{where}.function.parameters", "a JSON Schema object", parameters)
        _bool(function.get("strict"), f"{where}.function.strict")
    return list(value)


def _tool_choice(value: Any, tools: list[dict[str, Any]] | None) -> str | dict[str, Any] | None:
    if value is None:
        return None
    if isinstance(value, str):
        if value not in _TOOL_CHOICES:
            raise _invalid("tool_choice", _one_of(_TOOL_CHOICES) + " or a named function", value)
        if value != "none" and tools is None:
            raise bad_request(f"'tool_choice' {_show(value)} requires 'tools'", param="tool_choice")
        return value
    _object(value, "tool_choice", {"type", "function"})
    _function_type(value, "tool_choice")
    function = _object(_required(value, "function", "tool_choice.function"), "tool_choice.function", {"name"})
    name = _str(_required(function, "name", "tool_choice.function.name"), "tool_choice.function.name")
    declared = [t["function"]["name"] for t in tools or ()]
    if name not in declared:
        message = f"'tool_choice.function.name' {_show(name)} is not among 'tools' ({', '.join(declared) or 'none'})"
        raise bad_request(message, param="tool_choice.function.name")
    return {"type": "function", "function": {"name": name}}


def _template_kwargs(value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    kwargs = _object(value, "chat_template_kwargs")
    for key in kwargs:
        if key in _RESERVED_TEMPLATE_KWARGS:
            param = f"chat_template_kwargs.{key}"
            raise bad_request(f"'{param}' is set by the server and may not be given", param=param)
    return dict(kwargs)

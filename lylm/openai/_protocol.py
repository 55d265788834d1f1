"""OpenAI request bodies, validated: decoded JSON in, request objects (or a 400) out.

Everything here is pure; only :func:`build_sampling_params` imports vLLM, lazily, so
validation needs no engine stack and fails before any engine is involved.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

import attrs

from ._errors import bad_request
from ._fields import (
    _INT64_MAX,
    _INT64_MIN,
    _body,
    _bool,
    _check_keys,
    _clip,
    _int,
    _invalid,
    _is_int,
    _is_list_of_ints,
    _missing,
    _model,
    _number,
    _object,
    _one_of,
    _required,
    _show,
    _str,
)
from ._tool_fields import _template_kwargs, _tool_calls, _tool_choice, _tools

MAX_N = 16
"""The most choices (``n``) one request may ask for: each is a sequence on the engine."""

COMPLETION_MAX_TOKENS = 16
"""``max_tokens`` of a completions request that gives none (OpenAI's and vLLM's default)."""

MAX_LOGIT_BIAS = 300
"""The most tokens one ``logit_bias`` may name (OpenAI's limit)."""

MAX_STOP = 16
#: The most messages one chat request may carry, and prompts one completions request.
MAX_MESSAGES = 1024
MAX_PROMPTS = 64
"""The most stop strings one request may give."""

MAX_TOP_LOGPROBS = 20
"""Chat's ``top_logprobs`` limit (OpenAI's, and vLLM's default ``max_logprobs``)."""

MAX_COMPLETION_LOGPROBS = 20
"""Completions' integer ``logprobs`` limit: vLLM's (its default ``max_logprobs``), above
OpenAI's 5; an engine started with a lower ``max_logprobs`` refuses more with a 400."""

ContextOf = Callable[[str], "int | None"]
"""A model's context length by name (None: unknown), for early length checks."""

_ROLES = ("system", "user", "assistant", "developer", "tool")
# The keys each role's messages may carry, beyond role and content.
_MESSAGE_KEYS = {
    "assistant": frozenset({"role", "content", "name", "tool_calls"}),
    "tool": frozenset({"role", "content", "tool_call_id"}),
}
_PLAIN_MESSAGE_KEYS = frozenset({"role", "content", "name"})
_RESPONSE_FORMATS = ("text", "json_object", "json_schema")

_COMMON_KEYS = frozenset(
    {
        "model", "stream", "stream_options", "n", "user", "max_tokens", "stop", "seed",
        "temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
        "repetition_penalty", "ignore_eos", "response_format", "logit_bias",
    }
)  # fmt: skip
_CHAT_KEYS = _COMMON_KEYS | {
    "messages", "max_completion_tokens", "logprobs", "top_logprobs", "tools", "tool_choice",
    "parallel_tool_calls", "include_reasoning", "chat_template_kwargs",
}  # fmt: skip
_COMPLETION_KEYS = _COMMON_KEYS | {"prompt", "logprobs", "echo"}

# (name, low, high, low excluded): numbers passed to vLLM under the same name.
_NUMBERS = (
    ("temperature", 0.0, 2.0, False),
    ("top_p", 0.0, 1.0, True),
    ("min_p", 0.0, 1.0, False),
    ("presence_penalty", -2.0, 2.0, False),
    ("frequency_penalty", -2.0, 2.0, False),
    ("repetition_penalty", 0.0, 2.0, True),
)


@attrs.frozen
class ChatRequest:
    """A validated ``/v1/chat/completions`` body."""

    model: str
    messages: list[dict[str, Any]]
    stream: bool
    include_usage: bool
    n: int
    logprobs: bool
    top_logprobs: int
    user: str | None
    sampling: Mapping[str, Any]
    #: The declared tools as sent (validated), or None.
    tools: list[dict[str, Any]] | None = None
    #: ``"none"``, ``"auto"``, ``"required"``, ``{"type": "function", "function": {"name": ...}}`` or None.
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    #: vLLM's extension: False drops the reasoning from responses (a reasoning parser is set).
    include_reasoning: bool = True
    #: vLLM's extension: extra chat template variables (e.g. ``{"enable_thinking": false}``).
    chat_template_kwargs: Mapping[str, Any] = attrs.field(factory=dict)
    #: vLLM's ``stream_options.continuous_usage_stats``: usage on every chunk.
    continuous_usage: bool = False


@attrs.frozen
class CompletionRequest:
    """A validated ``/v1/completions`` body."""

    model: str
    prompts: list[str | list[int]]
    stream: bool
    include_usage: bool
    n: int
    logprobs: int | None
    user: str | None
    sampling: Mapping[str, Any]
    #: vLLM's ``stream_options.continuous_usage_stats``: usage on every chunk.
    continuous_usage: bool = False
    #: Put the prompt before each choice's text (and its logprobs before the choice's).
    echo: bool = False


def parse_chat_request(body: Any) -> ChatRequest:
    """Validate a decoded chat completions body; a 400 :class:`OpenAIError` names what is wrong."""
    obj = _body(body, _CHAT_KEYS)
    model = _model(obj)
    messages = _messages(obj.get("messages"))
    stream, include_usage, continuous_usage = _stream(obj)
    sampling = _sampling(obj)
    max_completion = _int(obj.get("max_completion_tokens"), "max_completion_tokens", 1)
    if max_completion is not None:
        # OpenAI's current name; with both given it wins, as in vLLM and OpenAI's API.
        sampling["max_tokens"] = max_completion
    logprobs = _bool(obj.get("logprobs"), "logprobs") or False
    top_logprobs = _int(obj.get("top_logprobs"), "top_logprobs", 0, MAX_TOP_LOGPROBS)
    if top_logprobs is not None and not logprobs:
        raise bad_request("'top_logprobs' requires 'logprobs' to be true", param="top_logprobs")
    tools = _tools(obj.get("tools"))
    return ChatRequest(
        model=model,
        messages=messages,
        stream=stream,
        include_usage=include_usage,
        continuous_usage=continuous_usage,
        n=_int(obj.get("n"), "n", 1, MAX_N) or 1,
        logprobs=logprobs,
        top_logprobs=top_logprobs or 0,
        user=_str(obj.get("user"), "user"),
        sampling=MappingProxyType(sampling),
        tools=tools,
        tool_choice=_tool_choice(obj.get("tool_choice"), tools),
        parallel_tool_calls=_bool(obj.get("parallel_tool_calls"), "parallel_tool_calls"),
        include_reasoning=_bool(obj.get("include_reasoning"), "include_reasoning") is not False,
        chat_template_kwargs=_template_kwargs(obj.get("chat_template_kwargs")),
    )


def parse_completion_request(body: Any, context: ContextOf | None = None) -> CompletionRequest:
    """Validate a decoded completions body; a 400 :class:`OpenAIError` names what is wrong.

    ``context`` gives a model's context length (None: unknown): token-id prompts longer
    than it are refused before each id is checked, so that rejecting a huge prompt costs
    no more than accepting a valid one.
    """
    obj = _body(body, _COMPLETION_KEYS)
    model = _model(obj)
    prompts = _prompts(obj.get("prompt"), max_tokens=context(model) if context else None)
    stream, include_usage, continuous_usage = _stream(obj)
    sampling = _sampling(obj)
    # OpenAI's completions API (and vLLM's) default to 16 tokens; chat to the rest of the context.
    if sampling.get("max_tokens") is None:
        sampling["max_tokens"] = COMPLETION_MAX_TOKENS
    return CompletionRequest(
        model=model,
        prompts=prompts,
        stream=stream,
        include_usage=include_usage,
        continuous_usage=continuous_usage,
        n=_int(obj.get("n"), "n", 1, MAX_N) or 1,
        logprobs=_int(_bool_as_int(obj.get("logprobs")), "logprobs", 0, MAX_COMPLETION_LOGPROBS),
        user=_str(obj.get("user"), "user"),
        sampling=MappingProxyType(sampling),
        echo=_bool(obj.get("echo"), "echo") or False,
    )


def build_sampling_params(
    request: ChatRequest | CompletionRequest,
    *,
    stream: bool,
    defaults: Mapping[str, Any] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Any:
    """The request's ``vllm.SamplingParams``; ``defaults`` fill in what the client left out,
    ``overrides`` replace what it set (the server's own needs, e.g. a forced tool call's schema)."""
    from vllm.sampling_params import RequestOutputKind, SamplingParams, StructuredOutputsParams

    try:
        from vllm.exceptions import VLLMValidationError  # not a ValueError
    except ImportError:  # older vLLM raises plain ValueErrors
        VLLMValidationError = ValueError

    # No max_tokens means "up to the context length" (OpenAI's meaning): None lets the
    # pool and the engine size it, where SamplingParams' own default would be 16.
    kwargs: dict[str, Any] = {"max_tokens": None, **(defaults or {}), **request.sampling, **(overrides or {})}
    if isinstance(request, ChatRequest):
        # vLLM's logprobs=k returns the sampled token's logprob plus the top k.
        kwargs["logprobs"] = request.top_logprobs if request.logprobs else None
    else:
        kwargs["logprobs"] = request.logprobs
        if request.echo and request.logprobs is not None:
            kwargs["prompt_logprobs"] = request.logprobs  # the echoed prompt's, as vLLM
    kwargs["n"] = request.n
    kwargs["output_kind"] = RequestOutputKind.DELTA if stream else RequestOutputKind.FINAL_ONLY
    try:
        structured = kwargs.get("structured_outputs")
        if isinstance(structured, Mapping):
            kwargs["structured_outputs"] = StructuredOutputsParams(**structured)
        return SamplingParams(**kwargs)
    except (ValueError, TypeError, VLLMValidationError) as exc:
        # What vLLM refuses and OpenAI allows (e.g. n > 1 with temperature 0).
        raise bad_request(str(exc), param=getattr(exc, "parameter", None)) from exc


# -- the fields both endpoints share ---------------------------------------------------


def _stream(obj: dict[str, Any]) -> tuple[bool, bool, bool]:
    """``stream``, ``stream_options.include_usage`` and (vLLM's)
    ``stream_options.continuous_usage_stats``, which counts only with include_usage."""
    stream = _bool(obj.get("stream"), "stream") or False
    if obj.get("stream_options") is None:
        return stream, False, False
    if not stream:
        message = "'stream_options' is only allowed when 'stream' is true"
        raise bad_request(message, param="stream_options")
    options = _object(obj["stream_options"], "stream_options", {"include_usage", "continuous_usage_stats"})
    include = _bool(options.get("include_usage"), "stream_options.include_usage") or False
    continuous = _bool(options.get("continuous_usage_stats"), "stream_options.continuous_usage_stats") or False
    return stream, include, include and continuous


def _sampling(obj: dict[str, Any]) -> dict[str, Any]:
    """The vLLM SamplingParams kwargs the client set, from the fields both endpoints share."""
    values: dict[str, Any] = {
        name: _number(obj.get(name), name, low, high, low_open)
        for name, low, high, low_open in _NUMBERS
    }
    values["max_tokens"] = _int(obj.get("max_tokens"), "max_tokens", 1)
    top_k = "-1, 0 (both disable it) or a positive integer"
    values["top_k"] = _int(obj.get("top_k"), "top_k", -1, expect=top_k)
    values["seed"] = _int(obj.get("seed"), "seed", _INT64_MIN, expect="a 64-bit integer")
    values["ignore_eos"] = _bool(obj.get("ignore_eos"), "ignore_eos")
    values["stop"] = _stop(obj.get("stop"))
    values["structured_outputs"] = _response_format(obj.get("response_format"))
    values["logit_bias"] = _logit_bias(obj.get("logit_bias"))
    return {name: value for name, value in values.items() if value is not None}


def _bool_as_int(value: Any) -> Any:
    # vLLM's completions read `logprobs: true` as 1 (and false as 0), as pydantic coerces it.
    return int(value) if isinstance(value, bool) else value


def _logit_bias(value: Any) -> dict[int, float] | None:
    """OpenAI's ``{"token id": bias}`` with biases in [-100, 100]; vLLM checks the ids
    against the vocabulary (an id beyond it is a 400 from the engine's own check)."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise _invalid("logit_bias", "an object of token id -> bias", value)
    if len(value) > MAX_LOGIT_BIAS:
        raise bad_request(f"'logit_bias' may hold at most {MAX_LOGIT_BIAS} tokens", param="logit_bias")
    out: dict[int, float] = {}
    for key, bias in value.items():
        param = f"logit_bias.{_clip(str(key))}"
        if not (isinstance(key, str) and key.isdigit() and int(key) <= _INT64_MAX):
            raise bad_request(f"'{param}': keys must be token ids (non-negative integers)", param=param)
        number = _number(bias, param, -100.0, 100.0, False)
        if number is None:
            raise _invalid(param, "a number between -100 and 100", bias)
        out[int(key)] = number
    return out


def _stop(value: Any) -> str | list[str] | None:
    if value is None:
        return None
    if isinstance(value, str) and value:
        return value
    if isinstance(value, list) and len(value) <= MAX_STOP:
        if all(isinstance(s, str) and s for s in value):
            return list(value)
    expect = f"a non-empty string or a list of at most {MAX_STOP} non-empty strings"
    raise _invalid("stop", expect, value)


def _response_format(value: Any) -> dict[str, Any] | None:
    """``response_format`` as StructuredOutputsParams kwargs; None when unconstrained."""
    if value is None:
        return None
    fmt = _object(value, "response_format")
    kind = _required(fmt, "type", "response_format.type")
    if not isinstance(kind, str) or kind not in _RESPONSE_FORMATS:
        raise _invalid("response_format.type", _one_of(_RESPONSE_FORMATS), kind)
    if kind != "json_schema":
        _check_keys(fmt, frozenset({"type"}), "response_format.")
        return {"json_object": True} if kind == "json_object" else None
    _check_keys(fmt, frozenset({"type", "json_schema"}), "response_format.")
    path = "response_format.json_schema"
    keys = {"name", "schema", "strict", "description"}
    spec = _object(_required(fmt, "json_schema", path), path, keys)
    _str(_required(spec, "name", f"{path}.name"), f"{path}.name")
    schema = _required(spec, "schema", f"{path}.schema")
    if not isinstance(schema, dict):
        raise _invalid(f"{path}.schema", "a JSON Schema object", schema)
    # strict is accepted but moot: vLLM's structured outputs always enforce the schema.
    _bool(spec.get("strict"), f"{path}.strict")
    _str(spec.get("description"), f"{path}.description")
    return {"json": schema}


# -- chat messages and completion prompts ---------------------------------------------


def _messages(value: Any) -> list[dict[str, Any]]:
    if value is None:
        raise _missing("messages")
    if not isinstance(value, list) or not value:
        raise _invalid("messages", "a non-empty list of messages", value)
    if len(value) > MAX_MESSAGES:
        raise bad_request(
            f"'messages' has {len(value)} messages; at most {MAX_MESSAGES} are accepted", param="messages"
        )
    return [_message(item, f"messages[{i}]") for i, item in enumerate(value)]


def _message(item: Any, path: str) -> dict[str, Any]:
    """A normalized copy of one message: role, content, and name / tool_calls / tool_call_id."""
    # Role first: an unknown role is refused for its role, not for its other keys.
    role = _required(_object(item, path), "role", f"{path}.role")
    if not isinstance(role, str) or role not in _ROLES:
        raise _invalid(f"{path}.role", _one_of(_ROLES), role)
    _check_keys(item, _MESSAGE_KEYS.get(role, _PLAIN_MESSAGE_KEYS), f"{path}.")
    content = item.get("content")
    tool_calls = _tool_calls(item.get("tool_calls"), f"{path}.tool_calls")
    if content is None:
        # OpenAI lets an assistant turn go without content (it had tool calls instead).
        if role != "assistant":
            raise _missing(f"{path}.content")
        content = ""
    message: dict[str, Any] = {"role": role, "content": _content(content, f"{path}.content")}
    name = _str(item.get("name"), f"{path}.name")
    if name is not None:
        message["name"] = name
    if tool_calls is not None:
        message["tool_calls"] = tool_calls
    if role == "tool":
        call_id = _str(_required(item, "tool_call_id", f"{path}.tool_call_id"), f"{path}.tool_call_id")
        message["tool_call_id"] = call_id
    return message


def _content(content: Any, path: str) -> str | list[dict[str, Any]]:
    if isinstance(content, str):
        return content
    if not isinstance(content, list) or not content:
        raise _invalid(path, "a string or a non-empty list of text parts", content)
    parts: list[dict[str, Any]] = []
    for j, item in enumerate(content):
        where = f"{path}[{j}]"
        kind = _required(_object(item, where), "type", f"{where}.type")
        if kind != "text":
            raise bad_request(
                f"'{where}.type' must be 'text' (got {_show(kind)}); lylm serves text only",
                param=f"{where}.type",
            )
        _check_keys(item, frozenset({"type", "text"}), f"{where}.")
        text = _str(_required(item, "text", f"{where}.text"), f"{where}.text")
        parts.append({"type": "text", "text": text})
    return parts


def _prompts(
    value: Any, param: str = "prompt", limit: int = MAX_PROMPTS, max_tokens: int | None = None
) -> list[str | list[int]]:
    """``prompt`` (or an embeddings ``input``) as one entry per prompt: a string or token ids;
    token ids longer than ``max_tokens`` are refused before they are checked one by one."""
    if value is None:
        raise _missing(param)
    if max_tokens is not None and isinstance(value, list) and value:
        lists = [(param, value)] if _is_int(value[0]) else [(f"{param}[{i}]", p) for i, p in enumerate(value)]
        for path, ids in lists:
            if isinstance(ids, list) and len(ids) > max_tokens:
                message = f"'{path}' has {len(ids)} tokens; the model's context holds {max_tokens}"
                raise bad_request(message, param=param, code="context_length_exceeded")
    if isinstance(value, str):
        if not value:  # OpenAI allows it, vLLM does not
            raise bad_request(f"'{param}' must not be empty", param=param)
        return [value]
    if isinstance(value, list) and len(value) > limit and not _is_list_of_ints(value):
        raise bad_request(f"'{param}' has {len(value)} prompts; at most {limit} are accepted", param=param)
    # Shape errors name the field; an empty or out-of-range element names itself.
    if isinstance(value, list) and value and all(isinstance(p, str) for p in value):
        for i, text in enumerate(value):
            if not text:
                raise bad_request(f"'{param}[{i}]' must not be empty", param=f"{param}[{i}]")
        return list(value)
    if isinstance(value, list) and value and _is_list_of_ints(value):
        return [_token_ids(value, param)]
    if isinstance(value, list) and value and all(_is_list_of_ints(p) for p in value):
        return [_token_ids(ids, f"{param}[{i}]") for i, ids in enumerate(value)]
    shape = "a string, or a non-empty list of strings, of token ids or of token-id lists"
    raise _invalid(param, shape, value)


def _token_ids(ids: list[int], path: str) -> list[int]:
    if not ids:
        raise bad_request(f"'{path}' must not be empty", param=path)
    for j, token in enumerate(ids):
        if not 0 <= token <= _INT64_MAX:
            raise _invalid(f"{path}[{j}]", "a token id (a non-negative integer)", token)
    return list(ids)

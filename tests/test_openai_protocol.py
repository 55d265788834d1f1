"""Tests for lylm.openai._protocol: OpenAI bodies in, validated requests (or 400s) out."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lylm.openai._errors import OpenAIError
from lylm.openai._protocol import (
    MAX_N,
    MAX_STOP,
    ChatRequest,
    CompletionRequest,
    build_sampling_params,
    parse_chat_request,
    parse_completion_request,
)

Parser = Callable[[Any], Any]
DELETE = object()  # patch value: remove the key

SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}

CHAT_FULL: dict[str, Any] = {
    "model": "tiny",
    "messages": [
        {"role": "developer", "content": "Be brief."},
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": [{"type": "text", "text": "Hi"}], "name": "ann"},
        {"role": "assistant", "content": None},
        {"role": "user", "content": "Again"},
    ],
    "stream": True,
    "stream_options": {"include_usage": True},
    "n": 2,
    "logprobs": True,
    "top_logprobs": 3,
    "user": "u-1",
    "max_tokens": 7,
    "max_completion_tokens": 7,
    "temperature": 0.5,
    "top_p": 1,
    "top_k": 40,
    "min_p": 0.1,
    "presence_penalty": -1.5,
    "frequency_penalty": 2,
    "repetition_penalty": 1.1,
    "seed": -3,
    "ignore_eos": False,
    "stop": ["\n", "END"],
    "response_format": {
        "type": "json_schema",
        "json_schema": {"name": "thing", "schema": SCHEMA, "strict": True, "description": "d"},
    },
}

COMPLETION_FULL: dict[str, Any] = {
    "model": "tiny",
    "prompt": ["Once upon", "a time"],
    "stream": False,
    "stream_options": None,
    "n": 3,
    "logprobs": 2,
    "user": None,
    "max_tokens": 9,
    "temperature": 0.25,
    "top_p": 0.9,
    "top_k": -1,
    "min_p": 0,
    "presence_penalty": 0.5,
    "frequency_penalty": -2,
    "repetition_penalty": 2,
    "seed": 12345678901,
    "ignore_eos": True,
    "stop": "\n\n",
    "response_format": {"type": "json_object"},
}

CHAT_MIN: dict[str, Any] = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}]}
COMPLETION_MIN: dict[str, Any] = {"model": "tiny", "prompt": "Hi"}


def patched(base: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    body = copy.deepcopy(base)
    for key, value in patch.items():
        if value is DELETE:
            body.pop(key, None)
        else:
            body[key] = value
    return body


def rejected(parse: Parser, body: Any) -> OpenAIError:
    with pytest.raises(OpenAIError) as info:
        parse(body)
    assert info.value.status == 400
    return info.value


# -- valid bodies -----------------------------------------------------------------


def test_full_chat_body() -> None:
    request = parse_chat_request(copy.deepcopy(CHAT_FULL))
    assert request == ChatRequest(
        model="tiny",
        messages=[
            {"role": "developer", "content": "Be brief."},
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": [{"type": "text", "text": "Hi"}], "name": "ann"},
            {"role": "assistant", "content": ""},
            {"role": "user", "content": "Again"},
        ],
        stream=True,
        include_usage=True,
        n=2,
        logprobs=True,
        top_logprobs=3,
        user="u-1",
        sampling={
            "max_tokens": 7,
            "temperature": 0.5,
            "top_p": 1.0,
            "top_k": 40,
            "min_p": 0.1,
            "presence_penalty": -1.5,
            "frequency_penalty": 2.0,
            "repetition_penalty": 1.1,
            "seed": -3,
            "ignore_eos": False,
            "stop": ["\n", "END"],
            "structured_outputs": {"json": SCHEMA},
        },
    )


def test_full_completion_body() -> None:
    request = parse_completion_request(copy.deepcopy(COMPLETION_FULL))
    assert request == CompletionRequest(
        model="tiny",
        prompts=["Once upon", "a time"],
        stream=False,
        include_usage=False,
        n=3,
        logprobs=2,
        user=None,
        sampling={
            "max_tokens": 9,
            "temperature": 0.25,
            "top_p": 0.9,
            "top_k": -1,
            "min_p": 0.0,
            "presence_penalty": 0.5,
            "frequency_penalty": -2.0,
            "repetition_penalty": 2.0,
            "seed": 12345678901,
            "ignore_eos": True,
            "stop": "\n\n",
            "structured_outputs": {"json_object": True},
        },
    )


def test_minimal_bodies_have_defaults_and_only_completions_max_tokens() -> None:
    chat = parse_chat_request(CHAT_MIN)
    assert (chat.stream, chat.include_usage, chat.n, chat.logprobs, chat.top_logprobs) == (
        False, False, 1, False, 0,
    )  # fmt: skip
    assert chat.user is None and dict(chat.sampling) == {}
    completion = parse_completion_request(COMPLETION_MIN)
    assert completion.prompts == ["Hi"] and completion.logprobs is None
    # Completions default to 16 tokens, as OpenAI's and vLLM's; chat to the rest of the context.
    assert (completion.stream, completion.n, dict(completion.sampling)) == (False, 1, {"max_tokens": 16})
    given = parse_completion_request({**COMPLETION_MIN, "max_tokens": 300})
    assert given.sampling["max_tokens"] == 300


def test_nulls_mean_not_given() -> None:
    nulls = dict.fromkeys(
        ["stream", "stream_options", "n", "user", "max_tokens", "max_completion_tokens", "stop",
         "seed", "temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
         "repetition_penalty", "ignore_eos", "response_format", "logprobs", "top_logprobs"]
    )  # fmt: skip
    chat = parse_chat_request({**CHAT_MIN, **nulls})
    assert chat == parse_chat_request(CHAT_MIN)
    del nulls["max_completion_tokens"], nulls["top_logprobs"]
    completion = parse_completion_request({**COMPLETION_MIN, **nulls})
    assert completion == parse_completion_request(COMPLETION_MIN)


def test_parsing_copies_messages() -> None:
    body = copy.deepcopy(CHAT_FULL)
    request = parse_chat_request(body)
    body["messages"][2]["content"][0]["text"] = "changed"
    assert request.messages[2]["content"][0]["text"] == "Hi"


@pytest.mark.parametrize(
    ("prompt", "prompts"),
    [
        ("Hello", ["Hello"]),
        (["a", "b"], ["a", "b"]),
        ([1, 2, 3], [[1, 2, 3]]),
        ([0], [[0]]),
        ([[1, 2], [3]], [[1, 2], [3]]),
    ],
)
def test_prompt_shapes(prompt: Any, prompts: list[Any]) -> None:
    assert parse_completion_request({**COMPLETION_MIN, "prompt": prompt}).prompts == prompts


@pytest.mark.parametrize(
    ("patch", "key", "value"),
    [
        ({"max_completion_tokens": 5}, "max_tokens", 5),
        ({"max_tokens": 5, "max_completion_tokens": None}, "max_tokens", 5),
        ({"max_tokens": 5, "max_completion_tokens": 6}, "max_tokens", 6),  # the newer name wins, as in vLLM
        ({"top_k": 0}, "top_k", 0),
        ({"seed": -(2**63)}, "seed", -(2**63)),
        ({"stop": []}, "stop", []),
        ({"temperature": 2}, "temperature", 2.0),
        ({"repetition_penalty": 0.01}, "repetition_penalty", 0.01),
    ],
)
def test_chat_sampling_values(patch: dict[str, Any], key: str, value: Any) -> None:
    sampling = parse_chat_request({**CHAT_MIN, **patch}).sampling
    assert sampling[key] == value and type(sampling[key]) is type(value)


@pytest.mark.parametrize("kind", ["text", "json_object", "json_schema"])
def test_response_format_mapping(kind: str) -> None:
    fmt: dict[str, Any] = {"type": kind}
    if kind == "json_schema":
        fmt["json_schema"] = {"name": "x", "schema": SCHEMA}
    sampling = parse_completion_request({**COMPLETION_MIN, "response_format": fmt}).sampling
    expected = {"json_object": {"json_object": True}, "json_schema": {"json": SCHEMA}}.get(kind)
    assert sampling.get("structured_outputs") == expected


def test_top_logprobs_defaults_to_zero_with_logprobs() -> None:
    request = parse_chat_request({**CHAT_MIN, "logprobs": True})
    assert request.logprobs is True and request.top_logprobs == 0


# -- rejected bodies --------------------------------------------------------------


@pytest.mark.parametrize("body", [[], [CHAT_MIN], "x", "", None, 1, 1.5, True])
@pytest.mark.parametrize("parse", [parse_chat_request, parse_completion_request])
def test_non_object_body(parse: Parser, body: Any) -> None:
    error = rejected(parse, body)
    assert error.message == "request body must be a JSON object" and error.param is None


CHAT_UNSUPPORTED = [
    "functions", "function_call",
    "audio", "modalities", "prediction", "reasoning_effort", "service_tier", "store", "metadata",
    "prompt", "echo", "made_up_thing",
]  # fmt: skip
COMPLETION_UNSUPPORTED = [
    "suffix", "best_of", "messages", "max_completion_tokens",
    "top_logprobs", "tools", "made_up_thing",
]  # fmt: skip


@pytest.mark.parametrize(
    ("parse", "base", "key"),
    [(parse_chat_request, CHAT_MIN, k) for k in CHAT_UNSUPPORTED]
    + [(parse_completion_request, COMPLETION_MIN, k) for k in COMPLETION_UNSUPPORTED],
)
def test_unsupported_parameters(parse: Parser, base: dict[str, Any], key: str) -> None:
    error = rejected(parse, {**base, key: None})
    assert (error.param, error.code) == (key, "unsupported_parameter")
    assert error.message == f"Unsupported parameter: '{key}'. lylm does not support it."


def json_schema(**spec: Any) -> dict[str, Any]:
    return {"response_format": {"type": "json_schema", "json_schema": spec}}


def user(content: Any, **extra: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": content, **extra}]}


TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}

COMMON_BAD: list[tuple[dict[str, Any], str]] = [
    ({"model": DELETE}, "model"),
    ({"model": None}, "model"),
    ({"model": ""}, "model"),
    ({"model": 3}, "model"),
    ({"stream": "yes"}, "stream"),
    ({"stream": 1}, "stream"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"stream": False, "stream_options": {}}, "stream_options"),
    ({"stream": True, "stream_options": []}, "stream_options"),
    ({"stream": True, "stream_options": {"include_usage": 1}}, "stream_options.include_usage"),
    ({"stream": True, "stream_options": {"continuous": True}}, "stream_options.continuous"),
    ({"n": 0}, "n"),
    ({"n": MAX_N + 1}, "n"),
    ({"n": 1.0}, "n"),
    ({"n": True}, "n"),
    ({"user": 5}, "user"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": -1}, "max_tokens"),
    ({"max_tokens": 2.5}, "max_tokens"),
    ({"max_tokens": "10"}, "max_tokens"),
    ({"max_tokens": 2**64}, "max_tokens"),
    ({"temperature": 3}, "temperature"),
    ({"temperature": -0.1}, "temperature"),
    ({"temperature": "1"}, "temperature"),
    ({"temperature": True}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"temperature": float("inf")}, "temperature"),
    ({"temperature": 10**400}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_p": 1.01}, "top_p"),
    ({"top_k": -2}, "top_k"),
    ({"top_k": 1.5}, "top_k"),
    ({"min_p": 1.5}, "min_p"),
    ({"min_p": -0.5}, "min_p"),
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"frequency_penalty": -3}, "frequency_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"repetition_penalty": 2.1}, "repetition_penalty"),
    ({"seed": 1.0}, "seed"),
    ({"seed": False}, "seed"),
    ({"seed": 2**63}, "seed"),
    ({"ignore_eos": 0}, "ignore_eos"),
    ({"stop": ""}, "stop"),
    ({"stop": [""]}, "stop"),
    ({"stop": ["a", 1]}, "stop"),
    ({"stop": ["s"] * (MAX_STOP + 1)}, "stop"),
    ({"stop": 5}, "stop"),
    ({"response_format": "json"}, "response_format"),
    ({"response_format": {}}, "response_format.type"),
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"response_format": {"type": ["text"]}}, "response_format.type"),
    ({"response_format": {"type": "text", "schema": {}}}, "response_format.schema"),
    ({"response_format": {"type": "json_object", "json_schema": {}}}, "response_format.json_schema"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    ({"response_format": {"type": "json_schema", "json_schema": []}}, "response_format.json_schema"),
    (json_schema(schema={}), "response_format.json_schema.name"),
    (json_schema(name=1, schema={}), "response_format.json_schema.name"),
    (json_schema(name="x"), "response_format.json_schema.schema"),
    (json_schema(name="x", schema="{}"), "response_format.json_schema.schema"),
    (json_schema(name="x", schema={}, strict=1), "response_format.json_schema.strict"),
    (json_schema(name="x", schema={}, description=[]), "response_format.json_schema.description"),
    (json_schema(name="x", schema={}, x=1), "response_format.json_schema.x"),
]

CHAT_BAD: list[tuple[dict[str, Any], str]] = [
    ({"messages": DELETE}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": "hi"}, "messages"),
    ({"messages": ["hi"]}, "messages[0]"),
    ({"messages": [{"content": "hi"}]}, "messages[0].role"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id"),
    ({"messages": [{"role": "tool", "content": "x", "tool_call_id": 1}]}, "messages[0].tool_call_id"),
    ({"messages": [{"role": "function", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "function", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": ["user"], "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user"}]}, "messages[0].content"),
    (user(None), "messages[0].content"),
    (user(5), "messages[0].content"),
    (user([]), "messages[0].content"),
    (user("hi", content_parts=[]), "messages[0].content_parts"),
    (user(["hi"]), "messages[0].content[0]"),
    (user([{"text": "hi"}]), "messages[0].content[0].type"),
    (user([{"type": "image_url", "image_url": {"url": "u"}}]), "messages[0].content[0].type"),
    (user([{"type": "input_audio"}]), "messages[0].content[0].type"),
    (user([{"type": "text"}]), "messages[0].content[0].text"),
    (user([{"type": "text", "text": 1}]), "messages[0].content[0].text"),
    (
        user([{"type": "text", "text": "a"}, {"type": "text", "text": "b", "c": 1}]),
        "messages[0].content[1].c",
    ),
    (user("a", name=1), "messages[0].name"),
    (
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "tool_calls": {}}]},
        "messages[1].tool_calls",
    ),
    ({"messages": [{"role": "assistant", "function_call": {}}]}, "messages[0].function_call"),
    ({"max_completion_tokens": 0}, "max_completion_tokens"),
    ({"logprobs": 1}, "logprobs"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": -1}, "top_logprobs"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"logprobs": False, "top_logprobs": 0}, "top_logprobs"),
    # tools and tool_choice
    ({"tools": []}, "tools"),
    ({"tools": {}}, "tools"),
    ({"tools": [{"type": "function"}]}, "tools[0].function"),
    ({"tools": [{"type": "retrieval", "function": {"name": "f"}}]}, "tools[0].type"),
    ({"tools": [{"type": "function", "function": {"name": ""}}]}, "tools[0].function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": []}}]}, "tools[0].function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": "f", "x": 1}}]}, "tools[0].function.x"),
    ({"tools": [TOOL, TOOL]}, "tools[1].function.name"),
    ({"tools": [TOOL] * 129}, "tools"),
    ({"tool_choice": "auto"}, "tool_choice"),
    ({"tool_choice": "always", "tools": [TOOL]}, "tool_choice"),
    ({"tool_choice": {"type": "function", "function": {"name": "g"}}, "tools": [TOOL]}, "tool_choice.function.name"),
    ({"tool_choice": {"type": "function"}, "tools": [TOOL]}, "tool_choice.function"),
    ({"parallel_tool_calls": "no"}, "parallel_tool_calls"),
    ({"include_reasoning": 0}, "include_reasoning"),
    ({"chat_template_kwargs": []}, "chat_template_kwargs"),
    ({"chat_template_kwargs": {"tools": []}}, "chat_template_kwargs.tools"),
    (
        {"messages": [{"role": "assistant", "tool_calls": [{"id": "1", "type": "function", "function": {"name": "f"}}]}]},
        "messages[0].tool_calls[0].function.arguments",
    ),
    (
        {"messages": [{"role": "user", "content": "a", "tool_calls": []}]},
        "messages[0].tool_calls",
    ),
]

COMPLETION_BAD: list[tuple[dict[str, Any], str]] = [
    ({"prompt": DELETE}, "prompt"),
    ({"prompt": None}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": 5}, "prompt"),
    ({"prompt": {"text": "a"}}, "prompt"),
    ({"prompt": ["a", 1]}, "prompt"),
    ({"prompt": [1, "a"]}, "prompt"),
    ({"prompt": [1, [2]]}, "prompt"),
    ({"prompt": [[1], 2]}, "prompt"),
    ({"prompt": [[1], ["a"]]}, "prompt"),
    ({"prompt": [True, False]}, "prompt"),
    ({"prompt": [1.0]}, "prompt"),
    ({"prompt": [None]}, "prompt"),
    ({"prompt": ["a", ""]}, "prompt[1]"),
    ({"prompt": [1, -1]}, "prompt[1]"),
    ({"prompt": [[1], []]}, "prompt[1]"),
    ({"prompt": [[1], [2, -5]]}, "prompt[1][1]"),
    ({"prompt": [2**64]}, "prompt[0]"),
    ({"logprobs": 21}, "logprobs"),
    ({"logprobs": -1}, "logprobs"),
]


@pytest.mark.parametrize(
    ("parse", "base", "patch", "param"),
    [(parse_chat_request, CHAT_MIN, p, param) for p, param in COMMON_BAD + CHAT_BAD]
    + [
        (parse_completion_request, COMPLETION_MIN, p, param)
        for p, param in COMMON_BAD + COMPLETION_BAD
    ],
)
def test_rejected(parse: Parser, base: dict[str, Any], patch: dict[str, Any], param: str) -> None:
    error = rejected(parse, patched(base, patch))
    assert error.param == param
    assert f"'{param}'" in error.message
    assert error.code in ("invalid_value", "missing_required_parameter", "unsupported_parameter")


@pytest.mark.parametrize(
    ("parse", "body", "param"),
    [
        (parse_chat_request, {"messages": CHAT_MIN["messages"]}, "model"),
        (parse_chat_request, {"model": "m"}, "messages"),
        (parse_chat_request, {**CHAT_MIN, "messages": [{"role": "user"}]}, "messages[0].content"),
        (parse_completion_request, {"model": "m"}, "prompt"),
    ],
)
def test_missing_required(parse: Parser, body: dict[str, Any], param: str) -> None:
    error = rejected(parse, body)
    assert (error.param, error.code) == (param, "missing_required_parameter")


def test_message_quotes_the_value() -> None:
    error = rejected(parse_chat_request, {**CHAT_MIN, "temperature": 3})
    assert error.message == "'temperature' must be a number between 0 and 2 (got 3)"
    error = rejected(parse_chat_request, {**CHAT_MIN, "stop": [1, "y" * 10_000]})
    assert error.param == "stop" and len(error.message) < 200


def test_huge_values_are_reported_not_raised() -> None:
    error = rejected(parse_chat_request, {**CHAT_MIN, "n": 10**5000})
    assert error.param == "n" and "<int>" in error.message
    nested: list[Any] = []
    for _ in range(10_000):
        nested = [nested]
    assert rejected(parse_completion_request, {**COMPLETION_MIN, "prompt": nested}).param == "prompt"


def test_long_unknown_key_is_clipped() -> None:
    error = rejected(parse_chat_request, {**CHAT_MIN, "k" * 1000: 1})
    assert error.code == "unsupported_parameter" and len(error.message) < 200


# -- SamplingParams -----------------------------------------------------------------


def test_sampling_params_for_chat() -> None:
    from vllm.sampling_params import RequestOutputKind, SamplingParams

    request = parse_chat_request(copy.deepcopy(CHAT_FULL))
    params = build_sampling_params(request, stream=True)
    assert isinstance(params, SamplingParams)
    assert (params.max_tokens, params.n, params.seed, params.logprobs) == (7, 2, -3, 3)
    assert params.stop == ["\n", "END"]
    assert (params.temperature, params.top_k, params.min_p) == (0.5, 40, 0.1)
    assert params.output_kind is RequestOutputKind.DELTA
    assert params.structured_outputs is not None
    assert params.structured_outputs.json == SCHEMA
    assert params.structured_outputs.json_object is None


def test_sampling_params_for_completion() -> None:
    from vllm.sampling_params import RequestOutputKind

    request = parse_completion_request(copy.deepcopy(COMPLETION_FULL))
    params = build_sampling_params(request, stream=False)
    assert (params.max_tokens, params.n, params.seed, params.logprobs) == (9, 3, 12345678901, 2)
    assert params.stop == ["\n\n"] and params.ignore_eos is True
    assert params.output_kind is RequestOutputKind.FINAL_ONLY
    assert params.structured_outputs is not None
    assert params.structured_outputs.json_object is True and params.structured_outputs.json is None


def test_sampling_params_defaults() -> None:
    chat = parse_chat_request(CHAT_MIN)
    params = build_sampling_params(chat, stream=False)
    # No max_tokens: None (the pool sizes it to the context), not vLLM's 16.
    assert params.max_tokens is None and params.logprobs is None and params.n == 1
    assert params.structured_outputs is None
    chat = parse_chat_request({**CHAT_MIN, "logprobs": True})
    assert build_sampling_params(chat, stream=False).logprobs == 0
    completion = parse_completion_request(COMPLETION_MIN)
    assert build_sampling_params(completion, stream=True).logprobs is None


def test_sampling_params_with_model_defaults() -> None:
    defaults = {"temperature": 0.7, "top_p": 0.8, "max_tokens": 100, "n": 5}
    chat = parse_chat_request({**CHAT_MIN, "top_p": 0.5})
    params = build_sampling_params(chat, stream=False, defaults=defaults)
    # The client's values win; n is always the request's.
    assert (params.temperature, params.top_p, params.max_tokens, params.n) == (0.7, 0.5, 100, 1)


def test_sampling_params_errors_become_400() -> None:
    request = parse_completion_request(COMPLETION_MIN)
    for bad in ({"min_tokens": 20}, {"no_such_field": 1}):  # min_tokens above the default 16
        with pytest.raises(OpenAIError) as info:
            build_sampling_params(request, stream=False, defaults=bad)
        assert info.value.status == 400
    # Valid for OpenAI, refused by vLLM: its own check surfaces as a 400.
    greedy = parse_completion_request({**COMPLETION_MIN, "temperature": 0, "n": 2})
    with pytest.raises(OpenAIError) as info:
        build_sampling_params(greedy, stream=False)
    assert info.value.status == 400 and "greedy" in info.value.message


# -- never anything but a 400 -------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)


def _mutations(base: dict[str, Any]) -> st.SearchStrategy[Any]:
    keys = sorted({*base, *CHAT_FULL, *COMPLETION_FULL, "max_completion_tokens", "top_logprobs"})

    def mutate(key: str, value: Any, drop: bool) -> dict[str, Any]:
        body = copy.deepcopy(base)
        if drop:
            body.pop(key, None)
        else:
            body[key] = value
        return body

    return st.builds(mutate, st.sampled_from(keys), json_values, st.booleans())


def _message_mutations() -> st.SearchStrategy[Any]:
    def mutate(index: int, key: str, value: Any) -> dict[str, Any]:
        body = copy.deepcopy(CHAT_FULL)
        body["messages"][index][key] = value
        return body

    indexes = st.integers(0, len(CHAT_FULL["messages"]) - 1)
    return st.builds(mutate, indexes, st.sampled_from(["role", "content", "name", "x"]), json_values)


def _nested_mutations(base: dict[str, Any], key: str, fields: list[str]) -> st.SearchStrategy[Any]:
    def mutate(field: str, value: Any) -> dict[str, Any]:
        body = copy.deepcopy(base)
        target = body[key]
        if key == "response_format":
            target = target["json_schema"]
        target[field] = value
        return body

    return st.builds(mutate, st.sampled_from(fields), json_values)


bodies = st.one_of(
    json_values,
    _mutations(CHAT_FULL),
    _mutations(COMPLETION_FULL),
    _mutations(CHAT_MIN),
    _mutations(COMPLETION_MIN),
    _message_mutations(),
    _nested_mutations(CHAT_FULL, "response_format", ["name", "schema", "strict", "description", "y"]),
    _nested_mutations(CHAT_FULL, "stream_options", ["include_usage", "z"]),
)


@settings(max_examples=300, deadline=None)
@given(body=bodies)
def test_any_json_is_a_request_or_a_400(body: Any) -> None:
    for parse in (parse_chat_request, parse_completion_request):
        try:
            result = parse(copy.deepcopy(body))
        except OpenAIError as error:
            assert error.status == 400
            assert error.message
        else:
            assert isinstance(result, (ChatRequest, CompletionRequest))


def test_message_and_prompt_counts_are_bounded() -> None:
    from lylm.openai._protocol import MAX_MESSAGES, MAX_PROMPTS

    messages = [{"role": "user", "content": "hi"}] * (MAX_MESSAGES + 1)
    with pytest.raises(OpenAIError) as info:
        parse_chat_request({"model": "m", "messages": messages})
    assert (info.value.status, info.value.param) == (400, "messages")
    parse_chat_request({"model": "m", "messages": messages[:MAX_MESSAGES]})
    with pytest.raises(OpenAIError) as info:
        parse_completion_request({"model": "m", "prompt": ["p"] * (MAX_PROMPTS + 1)})
    assert (info.value.status, info.value.param) == (400, "prompt")
    # A long list of token ids is one prompt, not many.
    assert len(parse_completion_request({"model": "m", "prompt": [1] * 500}).prompts) == 1


def test_logit_bias_is_token_ids_to_biases_within_openais_bounds() -> None:
    for parse, base in ((parse_chat_request, CHAT_MIN), (parse_completion_request, COMPLETION_MIN)):
        request = parse({**base, "logit_bias": {"5": 100, "17": -2.5}})
        assert request.sampling["logit_bias"] == {5: 100.0, 17: -2.5}
        assert build_sampling_params(request, stream=False).logit_bias == {5: 100.0, 17: -2.5}
        for bad, param in (
            ({"x": 1}, "logit_bias.x"),
            ({"-1": 1}, "logit_bias.-1"),
            ({"5": 101}, "logit_bias.5"),
            ({"5": None}, "logit_bias.5"),
            ({"5": "1"}, "logit_bias.5"),
            ([5], "logit_bias"),
            ({str(i): 1 for i in range(301)}, "logit_bias"),
        ):
            error = rejected(parse, {**base, "logit_bias": bad})
            assert error.status == 400 and error.param == param, (bad, error.message)


def test_completions_read_logprobs_true_as_one_as_vllm_does() -> None:
    assert parse_completion_request({**COMPLETION_MIN, "logprobs": True}).logprobs == 1
    assert parse_completion_request({**COMPLETION_MIN, "logprobs": False}).logprobs == 0
    assert rejected(parse_completion_request, {**COMPLETION_MIN, "logprobs": 21}).param == "logprobs"


def test_tool_fields_kept() -> None:
    call = {"id": "call-1", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}
    body = {
        **CHAT_MIN,
        "messages": [
            {"role": "user", "content": "use f"},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "content": "42", "tool_call_id": "call-1"},
        ],
        "tools": [TOOL],
        "tool_choice": {"type": "function", "function": {"name": "f"}},
        "parallel_tool_calls": False,
        "chat_template_kwargs": {"enable_thinking": False},
    }
    request = parse_chat_request(body)
    assert request.messages[1] == {"role": "assistant", "content": "", "tool_calls": [call]}
    assert request.messages[2] == {"role": "tool", "content": "42", "tool_call_id": "call-1"}
    assert request.tools == [TOOL]
    assert request.tool_choice == {"type": "function", "function": {"name": "f"}}
    assert request.parallel_tool_calls is False
    assert request.chat_template_kwargs == {"enable_thinking": False}
    # "none" needs no tools; the stream options vLLM adds are read
    assert parse_chat_request({**CHAT_MIN, "tool_choice": "none"}).tool_choice == "none"
    streamed = parse_chat_request(
        {**CHAT_MIN, "stream": True, "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    )
    assert streamed.continuous_usage
    alone = parse_chat_request({**CHAT_MIN, "stream": True, "stream_options": {"continuous_usage_stats": True}})
    assert not alone.continuous_usage  # only with include_usage, as vLLM


def test_echo_asks_for_prompt_logprobs() -> None:
    request = parse_completion_request({**COMPLETION_MIN, "echo": True, "logprobs": 2})
    params = build_sampling_params(request, stream=False)
    assert request.echo and params.prompt_logprobs == 2
    plain = build_sampling_params(parse_completion_request({**COMPLETION_MIN, "echo": True}), stream=False)
    assert plain.prompt_logprobs is None


def test_embedding_requests() -> None:
    from lylm.openai._embeddings import MAX_INPUTS, parse_embedding_request

    request = parse_embedding_request({"model": "e", "input": ["a", "b"], "encoding_format": "base64", "dimensions": 8})
    assert (request.inputs, request.encoding_format, request.dimensions) == (["a", "b"], "base64", 8)
    assert parse_embedding_request({"model": "e", "input": [1, 2]}).inputs == [[1, 2]]
    assert parse_embedding_request({"model": "e", "input": "x"}).encoding_format == "float"
    bad: list[tuple[dict[str, Any], str]] = [
        ({"input": "x"}, "model"),
        ({"model": "e"}, "input"),
        ({"model": "e", "input": ""}, "input"),
        ({"model": "e", "input": ["a", ""]}, "input[1]"),
        ({"model": "e", "input": ["a"] * (MAX_INPUTS + 1)}, "input"),
        ({"model": "e", "input": [{"role": "user"}]}, "input"),
        ({"model": "e", "input": "x", "encoding_format": "int8"}, "encoding_format"),
        ({"model": "e", "input": "x", "dimensions": 0}, "dimensions"),
        ({"model": "e", "input": "x", "truncate": True}, "truncate"),
    ]
    for body, param in bad:
        with pytest.raises(OpenAIError) as info:
            parse_embedding_request(body)
        assert info.value.status == 400 and info.value.param == param, body


def test_responses_requests_become_chat_requests() -> None:
    from lylm.openai._responses import parse_responses_request

    request = parse_responses_request(
        {
            "model": "m",
            "instructions": "Be brief",
            "input": [
                {"role": "user", "content": "Hi"},
                {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Yo"}]},
            ],
            "max_output_tokens": 7,
            "temperature": 0.5,
            "text": {"format": {"type": "json_schema", "name": "a", "schema": {"type": "object"}}},
            "store": False,
        }
    )
    chat = request.chat
    assert chat.messages == [
        {"role": "system", "content": "Be brief"},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": [{"type": "text", "text": "Yo"}]},
    ]
    assert chat.sampling["max_tokens"] == 7 and chat.sampling["temperature"] == 0.5
    assert chat.sampling["structured_outputs"] == {"json": {"type": "object"}}
    assert request.text == {
        "format": {"type": "json_schema", "name": "a", "schema": {"type": "object"}, "description": None, "strict": None},
        "verbosity": None,
    }
    assert parse_responses_request({"model": "m", "input": "Hello"}).chat.messages == [{"role": "user", "content": "Hello"}]
    refused: list[tuple[dict[str, Any], int, str]] = [
        ({"input": "x", "tools": [{"type": "function", "name": "f"}]}, 400, "tools"),
        ({"input": "x", "previous_response_id": "resp_1"}, 404, "previous_response_id"),
        ({"input": "x", "background": True}, 400, "background"),
        ({"input": []}, 400, "input"),
        ({"input": [{"type": "function_call_output", "call_id": "1"}]}, 400, "input[0].call_id"),
        ({"input": [{"type": "function_call", "role": "user", "content": "x"}]}, 400, "input[0].type"),
        ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "u"}]}]}, 400, "input[0].content[0].image_url"),
        ({"input": [{"role": "user", "content": [{"type": "input_file"}]}]}, 400, "input[0].content[0].type"),
        ({"input": [{"role": "tool", "content": "x"}]}, 400, "input[0].role"),
        ({"input": "x", "max_output_tokens": 0}, 400, "max_output_tokens"),
        ({"input": "x", "text": {"format": {"type": "xml"}}}, 400, "text.format.type"),
        ({"input": "x", "reasoning": {"effort": "low"}}, 400, "reasoning"),
        ({"input": "x", "temperature": 3}, 400, "temperature"),
    ]
    for body, status, param in refused:
        with pytest.raises(OpenAIError) as info:
            parse_responses_request({"model": "m", **body})
        assert (info.value.status, info.value.param) == (status, param), body


def test_json_depth_is_found_inside_long_flat_lists() -> None:
    from lylm.openai._guard import MAX_JSON_DEPTH, _depth_ok

    deep: Any = "leaf"
    for _ in range(MAX_JSON_DEPTH):
        deep = {"k": [deep]}
    assert _depth_ok(list(range(100_000)))  # flat: looked at once
    assert not _depth_ok([*range(1000), deep, *range(1000)])  # a deep branch after many scalars
    assert not _depth_ok({"a": 1, "b": [None, "x", {"c": deep}]})
    assert _depth_ok([[1, 2], {"a": [3]}, "s"])

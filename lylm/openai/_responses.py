"""POST /v1/responses: OpenAI's Responses API for text, over the chat path.

A Responses request becomes a chat request (``instructions`` as a system message,
``input`` as the conversation, ``max_output_tokens``, ``text.format`` as the response
format), served exactly as ``/v1/chat/completions`` serves it (the model's sampling
defaults, its chat template, its reasoning parser), and answered in the Responses
shape as vLLM's server shapes it: one ``message`` output item (after a ``reasoning``
item when the model has a reasoning parser), and, streamed, the event sequence
``response.created`` ... ``response.completed``. Nothing is stored: there is no
``previous_response_id`` or ``GET /v1/responses/{id}``. Tools, images and other input
item types are refused with a 400 naming them.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import attrs
import orjson
from starlette.responses import Response, StreamingResponse

from .._pool import EnginePool
from ._chat import chat_plan, start_chat
from ._dispatch import Started, drain, final_output, to_openai_error
from ._errors import OpenAIError, bad_request
from ._fields import _body, _bool, _int, _invalid, _object, _required, _str
from ._json import json_response
from ._protocol import ChatRequest, parse_chat_request

_KEYS = frozenset(
    {
        "model", "input", "instructions", "max_output_tokens", "temperature", "top_p", "top_k", "min_p",
        "seed", "stop", "stream", "user", "metadata", "store", "text", "parallel_tool_calls", "tool_choice",
        "tools", "previous_response_id", "background", "truncation", "service_tier", "presence_penalty",
        "frequency_penalty", "repetition_penalty", "logit_bias", "ignore_eos", "include_reasoning",
        "chat_template_kwargs",
    }
)  # fmt: skip
# Passed to the chat request under the same name.
_SAMPLING = (
    "temperature", "top_p", "top_k", "min_p", "seed", "stop", "presence_penalty", "frequency_penalty",
    "repetition_penalty", "logit_bias", "ignore_eos", "user", "include_reasoning", "chat_template_kwargs",
)  # fmt: skip
_ROLES = ("user", "system", "developer", "assistant")
_TEXT_PARTS = ("input_text", "output_text")


@attrs.frozen
class ResponsesRequest:
    """A validated ``/v1/responses`` body and the chat request that serves it."""

    chat: ChatRequest
    stream: bool
    instructions: str | None
    metadata: dict[str, Any] | None
    text: dict[str, Any] | None
    parallel_tool_calls: bool
    max_output_tokens: int | None


def parse_responses_request(body: Any) -> ResponsesRequest:
    """Validate a decoded Responses body; a 400 (or 404) :class:`OpenAIError` names what is wrong."""
    obj = _body(body, _KEYS)
    if obj.get("tools"):
        message = "'tools' are not served by lylm's /v1/responses (text only); use /v1/chat/completions"
        raise bad_request(message, param="tools", code="unsupported_parameter")
    if obj.get("tool_choice") not in (None, "none", "auto"):
        raise bad_request("'tool_choice' needs 'tools', which /v1/responses does not serve", param="tool_choice")
    if obj.get("previous_response_id") is not None:
        # Nothing is stored, so no earlier response can be found (vLLM without its store: the same).
        message = f"Response with id {_str(obj['previous_response_id'], 'previous_response_id')!r} not found."
        raise OpenAIError(404, message, param="previous_response_id", code="not_found")
    if _bool(obj.get("background"), "background"):
        raise bad_request("'background' responses are not served by lylm", param="background")
    if obj.get("truncation") not in (None, "disabled"):
        raise _invalid("truncation", "'disabled'", obj["truncation"])
    _bool(obj.get("store"), "store")  # accepted; nothing is stored
    stream = _bool(obj.get("stream"), "stream") or False
    instructions = _str(obj.get("instructions"), "instructions")
    messages = _input(obj.get("input"))
    if instructions:
        messages.insert(0, {"role": "system", "content": instructions})
    max_output = _int(obj.get("max_output_tokens"), "max_output_tokens", 1)
    chat: dict[str, Any] = {"model": obj.get("model"), "messages": messages, "stream": stream}
    chat.update({k: obj[k] for k in _SAMPLING if obj.get(k) is not None})
    if max_output is not None:
        chat["max_tokens"] = max_output
    text = _text(obj.get("text"))
    if text is not None and text["format"]["type"] != "text":
        fmt = text["format"]
        chat["response_format"] = (
            {"type": "json_object"} if fmt["type"] == "json_object" else {"type": "json_schema", "json_schema": {
                k: fmt[k] for k in ("name", "schema", "strict", "description") if fmt.get(k) is not None}}
        )  # fmt: skip
    metadata = obj.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        raise _invalid("metadata", "an object of strings", metadata)
    return ResponsesRequest(
        chat=parse_chat_request(chat),
        stream=stream,
        instructions=instructions,
        metadata=metadata,
        text=text,
        parallel_tool_calls=_bool(obj.get("parallel_tool_calls"), "parallel_tool_calls") is not False,
        max_output_tokens=max_output,
    )


def _input(value: Any) -> list[dict[str, Any]]:
    """``input`` as chat messages: a string is one user message; items are messages."""
    if isinstance(value, str) and value:
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise _invalid("input", "a non-empty string or a non-empty list of messages", value)
    messages = []
    for i, item in enumerate(value):
        where = f"input[{i}]"
        _object(item, where, {"type", "role", "content", "id", "status"})
        kind = item.get("type", "message")
        if kind != "message":
            raise bad_request(f"'{where}.type' {kind!r} is not served by lylm (messages only)", param=f"{where}.type")
        role = _required(item, "role", f"{where}.role")
        if role not in _ROLES:
            raise _invalid(f"{where}.role", "one of " + ", ".join(f"'{r}'" for r in _ROLES), role)
        content = _required(item, "content", f"{where}.content")
        if isinstance(content, str):
            messages.append({"role": role, "content": content})
            continue
        if not isinstance(content, list) or not content:
            raise _invalid(f"{where}.content", "a string or a non-empty list of text parts", content)
        parts = []
        for j, part in enumerate(content):
            at = f"{where}.content[{j}]"
            _object(part, at, {"type", "text", "annotations", "logprobs"})
            if part.get("type") not in _TEXT_PARTS:
                raise _invalid(f"{at}.type", "'input_text' or 'output_text' (lylm serves text only)", part.get("type"))
            parts.append({"type": "text", "text": _str(_required(part, "text", f"{at}.text"), f"{at}.text")})
        messages.append({"role": role, "content": parts})
    return messages


def _text(value: Any) -> dict[str, Any] | None:
    """``text``: ``{"format": {"type": "text" | "json_object" | "json_schema", ...}}``, normalized."""
    if value is None:
        return None
    obj = _object(value, "text", {"format", "verbosity"})
    fmt = _object(obj.get("format") or {"type": "text"}, "text.format", {"type", "name", "schema", "strict", "description"})
    kind = fmt.get("type")
    if kind not in ("text", "json_object", "json_schema"):
        raise _invalid("text.format.type", "'text', 'json_object' or 'json_schema'", kind)
    normalized: dict[str, Any] = {"type": kind}
    if kind == "json_schema":
        normalized.update(
            name=_str(_required(fmt, "name", "text.format.name"), "text.format.name"),
            schema=_required(fmt, "schema", "text.format.schema"),
            description=_str(fmt.get("description"), "text.format.description"),
            strict=_bool(fmt.get("strict"), "text.format.strict"),
        )
    return {"format": normalized, "verbosity": _str(obj.get("verbosity"), "text.verbosity")}


@attrs.define
class _Reply:
    """What one response reports beside its output: ids, settings, usage."""

    request: ResponsesRequest
    id: str = attrs.field(factory=lambda: f"resp_{uuid.uuid4().hex}")
    message_id: str = attrs.field(factory=lambda: f"msg_{uuid.uuid4().hex}")
    created_at: int = attrs.field(factory=lambda: int(time.time()))
    temperature: float = 1.0
    top_p: float = 1.0
    max_output_tokens: int = 0

    def body(self, status: str, output: list[dict[str, Any]], usage: dict[str, Any] | None) -> dict[str, Any]:
        request = self.request
        return {
            "id": self.id,
            "created_at": self.created_at,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "instructions": request.instructions,
            "metadata": request.metadata,
            "model": request.chat.model,
            "object": "response",
            "output": output,
            "parallel_tool_calls": request.parallel_tool_calls,
            "temperature": self.temperature,
            "tool_choice": "none",
            "tools": [],
            "top_p": self.top_p,
            "background": False,
            "max_output_tokens": self.max_output_tokens,
            "max_tool_calls": None,
            "previous_response_id": None,
            "prompt": None,
            "reasoning": None,
            "service_tier": "auto",
            "status": status,
            "text": request.text,
            "top_logprobs": None,
            "truncation": "disabled",
            "usage": usage,
            "user": request.chat.user,
        }

    def message(self, text: str, status: str = "completed") -> dict[str, Any]:
        content = [_text_part(text, None)] if status == "completed" else []
        return {
            "id": self.message_id, "content": content, "role": "assistant", "status": status, "type": "message",
            "phase": None,
        }  # fmt: skip


def _text_part(text: str, logprobs: Any) -> dict[str, Any]:
    return {"annotations": [], "text": text, "type": "output_text", "logprobs": logprobs}


def _reasoning_item(text: str) -> dict[str, Any]:
    return {
        "id": f"rs_{uuid.uuid4().hex}",
        "summary": [],
        "type": "reasoning",
        "content": [{"text": text, "type": "reasoning_text"}],
        "encrypted_content": None,
        "status": None,
    }


def _usage(prompt_tokens: int, output_tokens: int, cached: int | None) -> dict[str, Any]:
    return {
        "input_tokens": prompt_tokens,
        "input_tokens_details": {"cached_tokens": cached or 0},
        "output_tokens": output_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": prompt_tokens + output_tokens,
    }


async def responses(pool: EnginePool, request: ResponsesRequest) -> Response:
    """Serve one Responses request, streamed or not."""
    chat = request.chat
    plan = chat_plan(pool, chat)
    try:
        defaults = pool.sampling_defaults(chat.model)
        context = pool.max_model_len(chat.model)
    except Exception as exc:
        raise to_openai_error(exc) from exc
    if plan is not None and request.stream:
        message = "streamed /v1/responses from a model with a reasoning parser is not served yet; use /v1/chat/completions"
        raise bad_request(message, param="stream")
    reply = _Reply(request)
    reply.temperature = float(chat.sampling.get("temperature", defaults.get("temperature", 1.0)))
    reply.top_p = float(chat.sampling.get("top_p", defaults.get("top_p", 1.0)))
    started = await start_chat(pool, chat, plan, request_id=reply.id, param="input")
    prompt_tokens = len(started.first.prompt_token_ids or ())
    reply.max_output_tokens = request.max_output_tokens or context - prompt_tokens
    if request.stream:
        return StreamingResponse(_events(reply, started), media_type="text/event-stream")
    final = await final_output(started)
    (choice,) = final.outputs
    output = []
    text = choice.text
    if plan is not None:
        parsed, _ = plan.message(plan.parser(), choice, final.prompt_token_ids)
        if parsed.get("reasoning"):
            output.append(_reasoning_item(parsed["reasoning"]))
        text = parsed.get("content") or ""
    output.append(reply.message(text))
    status = "incomplete" if choice.finish_reason == "length" else "completed"
    usage = _usage(prompt_tokens, len(choice.token_ids), final.num_cached_tokens)
    return json_response(reply.body(status, output, usage))


async def _events(reply: _Reply, started: Started) -> AsyncIterator[bytes]:
    sequence = 0

    def event(kind: str, **fields: Any) -> bytes:
        nonlocal sequence
        payload = {**fields, "sequence_number": sequence, "type": kind}
        sequence += 1
        return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(payload) + b"\n\n"

    item = {"item_id": reply.message_id, "output_index": 0}
    yield event("response.created", response=reply.body("in_progress", [], None))
    yield event("response.in_progress", response=reply.body("in_progress", [], None))
    yield event("response.output_item.added", item=reply.message("", "in_progress"), output_index=0)
    yield event("response.content_part.added", content_index=0, **item, part=_text_part("", []))
    text, generated, finish = "", 0, None
    try:
        async for output in drain(started):
            (choice,) = output.outputs
            generated += len(choice.token_ids)
            finish = choice.finish_reason or finish
            if choice.text:
                text += choice.text
                yield event("response.output_text.delta", content_index=0, delta=choice.text, **item, logprobs=[])
    except Exception as exc:
        error = to_openai_error(exc)
        yield event("error", code=error.code, message=error.message, param=error.param)
        return
    yield event("response.output_text.done", content_index=0, **item, logprobs=[], text=text)
    yield event("response.content_part.done", content_index=0, **item, part=_text_part(text, None))
    yield event("response.output_item.done", item=reply.message(text), output_index=0)
    status = "incomplete" if finish == "length" else "completed"
    usage = _usage(len(started.first.prompt_token_ids or ()), generated, started.first.num_cached_tokens)
    yield event("response.completed", response=reply.body(status, [reply.message(text)], usage))

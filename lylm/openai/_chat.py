"""POST /v1/chat/completions: responses and SSE chunks in OpenAI's chat shape.

Tool calls and reasoning come from vLLM's parsers when the request declares tools
or the model has a reasoning parser (:mod:`._tool_calls`); otherwise the output is
the message's content as generated.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from starlette.responses import Response, StreamingResponse

from .._pool import EnginePool
from ._dispatch import Started, check_model, drain, final_output, start, to_openai_error
from ._errors import OpenAIError
from ._logprobs import chat_logprobs
from ._protocol import ChatRequest
from ._tool_calls import ChatParsing, prepare
from . import _sse as sse
from ._sse import DONE, event, usage
from ._json import json_response


def chat_plan(pool: EnginePool, request: ChatRequest) -> ChatParsing | None:
    """Check the model, then how its output will be parsed (None: plain content)."""
    check_model(pool, request.model)
    try:
        parsing = pool.output_parsing(request.model)
    except Exception as exc:  # no healthy engine, shutting down
        raise to_openai_error(exc) from exc
    return prepare(request, parsing)


async def start_chat(
    pool: EnginePool, request: ChatRequest, plan: ChatParsing | None, *, request_id: str, param: str
) -> Started:
    """Dispatch the conversation with the plan's template variables and sampling overrides."""
    (started,) = await start(
        pool,
        request,
        [request.messages],
        request_id=request_id,
        param=param,
        chat_template_kwargs=plan.chat_template_kwargs if plan else request.chat_template_kwargs or None,
        overrides=plan.sampling if plan else None,
    )
    return started


async def chat_completion(pool: EnginePool, request: ChatRequest) -> Response:
    """Serve one chat completion request, streamed or not."""
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    plan = chat_plan(pool, request)
    started = await start_chat(pool, request, plan, request_id=request_id, param="messages")
    created = int(time.time())
    if request.stream:
        return StreamingResponse(
            _chunks(request, plan, started, request_id, created), media_type="text/event-stream"
        )
    final = await final_output(started)
    choices = []
    for c in final.outputs:
        logprobs = None
        if request.logprobs and c.logprobs is not None and (plan is None or request.include_reasoning):
            logprobs = {"content": chat_logprobs(c.token_ids, c.logprobs, request.top_logprobs)}
        if plan is None:
            # reasoning: vLLM's field, null without a reasoning parser
            message: dict[str, Any] = {"role": "assistant", "content": c.text, "refusal": None, "reasoning": None}
            finish_reason = c.finish_reason
        else:
            message, finish_reason = plan.message(plan.parser(), c, final.prompt_token_ids)
        choices.append(
            {
                "index": c.index,
                "message": message,
                "logprobs": logprobs,
                "finish_reason": finish_reason,
                # vLLM's: the stop string or token id that ended it, if one did.
                "stop_reason": getattr(c, "stop_reason", None),
            }
        )
    body = {
        "id": request_id,
        "object": "chat.completion",
        "created": created,
        "model": request.model,
        "choices": choices,
        "service_tier": None,
        "system_fingerprint": None,
        "usage": usage(
            len(final.prompt_token_ids or ()),
            sum(len(c.token_ids) for c in final.outputs),
            final.num_cached_tokens,
        ),
    }
    return json_response(body)


async def _chunks(
    request: ChatRequest, plan: ChatParsing | None, started: Started, request_id: str, created: int
) -> AsyncIterator[bytes]:
    head = {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": request.model}

    def chunk(choices: list[dict[str, Any]], **extra: Any) -> bytes:
        return sse.chunk(head, choices, include_usage=request.include_usage, **extra)

    # OpenAI opens every choice with an empty assistant delta carrying the role.
    for index in range(request.n):
        role = {"role": "assistant", "content": ""}
        yield chunk([{"index": index, "delta": role, "logprobs": None, "finish_reason": None}])

    prompt_ids = started.first.prompt_token_ids
    prompt_tokens = len(prompt_ids or ())
    cached = started.first.num_cached_tokens
    generated = [0] * request.n
    parsers = [plan.parser() for _ in range(request.n)] if plan is not None else []
    tools_streamed = [False] * request.n
    show_logprobs = request.logprobs and (plan is None or request.include_reasoning)
    try:
        async for output in drain(started):
            for c in output.outputs:
                i = c.index
                generated[i] += len(c.token_ids)
                logprobs = None
                if show_logprobs and c.logprobs is not None and c.token_ids:
                    logprobs = {"content": chat_logprobs(c.token_ids, c.logprobs, request.top_logprobs)}
                finish = c.finish_reason
                delta: dict[str, Any] | None
                if plan is None:
                    # A token that ends mid-character has no text yet: nothing to send
                    # unless the client wants each token's logprob.
                    delta = {"content": c.text} if c.text or logprobs else None
                else:
                    if not (c.text or c.token_ids or finish):
                        continue
                    delta = plan.delta(parsers[i], c, prompt_ids)
                    tools_streamed[i] = tools_streamed[i] or bool(delta and delta.get("tool_calls"))
                    if finish is not None:
                        finish = plan.stream_finish_reason(finish, tools_streamed[i])
                if delta is None and logprobs is None and finish is None:
                    continue
                choice: dict[str, Any] = {"index": i, "delta": delta or {}, "logprobs": logprobs, "finish_reason": finish}
                if finish is not None:
                    choice["stop_reason"] = getattr(c, "stop_reason", None)
                extra = {}
                if request.continuous_usage:
                    extra["usage"] = sse.running_usage(prompt_tokens, generated[i])
                yield chunk([choice], **extra)
    except Exception as exc:
        # Headers are sent: the status cannot change, so the error travels as an event.
        error: OpenAIError = to_openai_error(exc)
        yield event(error.body())
        yield DONE
        return
    if request.include_usage:
        yield chunk([], usage=usage(prompt_tokens, sum(generated), cached))
    yield DONE


"""POST /v1/chat/completions: responses and SSE chunks in OpenAI's chat shape."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from starlette.responses import Response, StreamingResponse

from .._pool import EnginePool
from ._dispatch import Started, drain, start, to_openai_error
from ._errors import OpenAIError
from ._logprobs import chat_logprobs
from ._protocol import ChatRequest
from . import _sse as sse
from ._sse import DONE, event, usage
from ._json import json_response


async def chat_completion(pool: EnginePool, request: ChatRequest) -> Response:
    """Serve one chat completion request, streamed or not."""
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    (started,) = await start(pool, request, [request.messages], request_id=request_id, param="messages")
    created = int(time.time())
    if request.stream:
        return StreamingResponse(
            _chunks(request, started, request_id, created), media_type="text/event-stream"
        )
    final = None
    async for output in drain(started):
        final = output
    assert final is not None
    choices = []
    for c in final.outputs:
        logprobs = None
        if request.logprobs and c.logprobs is not None:
            logprobs = {"content": chat_logprobs(c.token_ids, c.logprobs, request.top_logprobs)}
        choices.append(
            {
                "index": c.index,
                "message": {"role": "assistant", "content": c.text, "refusal": None},
                "logprobs": logprobs,
                "finish_reason": c.finish_reason,
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
    request: ChatRequest, started: Started, request_id: str, created: int
) -> AsyncIterator[bytes]:
    head = {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": request.model}

    def chunk(choices: list[dict[str, Any]], **extra: Any) -> bytes:
        return sse.chunk(head, choices, include_usage=request.include_usage, **extra)

    # OpenAI opens every choice with an empty assistant delta carrying the role.
    for index in range(request.n):
        role = {"role": "assistant", "content": ""}
        yield chunk([{"index": index, "delta": role, "logprobs": None, "finish_reason": None}])

    prompt_tokens = len(started.first.prompt_token_ids or ())
    cached = started.first.num_cached_tokens
    generated = 0
    try:
        async for output in drain(started):
            for c in output.outputs:
                generated += len(c.token_ids)
                # A token that ends mid-character has no text yet: nothing to send
                # unless the client wants each token's logprob.
                if c.text or (request.logprobs and c.token_ids):
                    logprobs = None
                    if request.logprobs and c.logprobs is not None:
                        logprobs = {"content": chat_logprobs(c.token_ids, c.logprobs, request.top_logprobs)}
                    delta = {"content": c.text}
                    yield chunk([{"index": c.index, "delta": delta, "logprobs": logprobs, "finish_reason": None}])
                if c.finish_reason is not None:
                    yield chunk([{"index": c.index, "delta": {}, "logprobs": None, "finish_reason": c.finish_reason}])
    except Exception as exc:
        # Headers are sent: the status cannot change, so the error travels as an event.
        error: OpenAIError = to_openai_error(exc)
        yield event(error.body())
        yield DONE
        return
    if request.include_usage:
        yield chunk([], usage=usage(prompt_tokens, generated, cached))
    yield DONE

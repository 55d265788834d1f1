"""POST /v1/completions: responses and SSE chunks in OpenAI's text-completion shape.

Several prompts in one request are dispatched together (each to the engine its
balancer picks) and run concurrently in the engines; their outputs are then
read one prompt after another, which costs nothing since vLLM buffers them.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from starlette.responses import Response, StreamingResponse

from .._pool import EnginePool
from ._dispatch import Started, drain, start, to_openai_error
from ._json import json_response
from ._logprobs import completion_logprobs
from ._protocol import CompletionRequest
from . import _sse as sse
from ._sse import DONE, event, usage


def _prompts(request: CompletionRequest) -> list[Any]:
    return [p if isinstance(p, str) else {"prompt_token_ids": p} for p in request.prompts]


async def completion(pool: EnginePool, request: CompletionRequest) -> Response:
    """Serve one completions request (one or more prompts), streamed or not."""
    request_id = f"cmpl-{uuid.uuid4().hex}"
    started = await start(pool, request, _prompts(request), request_id=request_id, param="prompt")
    created = int(time.time())
    if request.stream:
        return StreamingResponse(
            _chunks(request, started, request_id, created), media_type="text/event-stream"
        )
    choices: list[dict[str, Any]] = []
    prompt_tokens = completion_tokens = cached = 0
    for p, s in enumerate(started):
        final = None
        async for output in drain(s):
            final = output
        assert final is not None
        prompt_tokens += len(final.prompt_token_ids or ())
        cached += final.num_cached_tokens or 0
        for c in final.outputs:
            completion_tokens += len(c.token_ids)
            logprobs = None
            if request.logprobs is not None and c.logprobs is not None:
                logprobs = completion_logprobs(c.token_ids, c.logprobs, request.logprobs, 0)
            choices.append(
                {
                    "index": p * request.n + c.index,
                    "text": c.text,
                    "logprobs": logprobs,
                    "finish_reason": c.finish_reason,
                    # vLLM's: the stop string or token id that ended it, if one did.
                    "stop_reason": getattr(c, "stop_reason", None),
                }
            )
    body = {
        "id": request_id,
        "object": "text_completion",
        "created": created,
        "model": request.model,
        "choices": choices,
        "service_tier": None,
        "system_fingerprint": None,
        "usage": usage(prompt_tokens, completion_tokens, cached),
    }
    return json_response(body)


async def _chunks(
    request: CompletionRequest, started: list[Started], request_id: str, created: int
) -> AsyncIterator[bytes]:
    head = {"id": request_id, "object": "text_completion", "created": created, "model": request.model}

    def chunk(choices: list[dict[str, Any]], **extra: Any) -> bytes:
        return sse.chunk(head, choices, include_usage=request.include_usage, **extra)

    prompt_tokens = completion_tokens = cached = 0
    try:
        for p, s in enumerate(started):
            prompt_tokens += len(s.first.prompt_token_ids or ())
            cached += s.first.num_cached_tokens or 0
            offsets = [0] * request.n
            async for output in drain(s):
                for c in output.outputs:
                    completion_tokens += len(c.token_ids)
                    logprobs = None
                    if request.logprobs is not None and c.logprobs is not None:
                        logprobs = completion_logprobs(
                            c.token_ids, c.logprobs, request.logprobs, offsets[c.index]
                        )
                    offsets[c.index] += len(c.text)
                    if not (c.text or logprobs or c.finish_reason):
                        continue  # a token that ends mid-character: no text yet
                    choice = {
                        "index": p * request.n + c.index,
                        "text": c.text,
                        "logprobs": logprobs,
                        "finish_reason": c.finish_reason,
                    }
                    yield chunk([choice])
    except Exception as exc:
        yield event(to_openai_error(exc).body())
        yield DONE
        return
    finally:
        for s in started:  # prompts not reached yet when the client left
            await s.rest.aclose()
    if request.include_usage:
        yield chunk([], usage=usage(prompt_tokens, completion_tokens, cached))
    yield DONE

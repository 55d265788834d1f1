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

import attrs
from starlette.responses import Response, StreamingResponse

from .._pool import EnginePool
from ._dispatch import Started, close_all, drain, final_output, start, to_openai_error
from ._json import json_response
from ._logprobs import completion_logprobs
from ._protocol import CompletionRequest
from . import _sse as sse
from ._sse import DONE, event, usage


def _prompts(request: CompletionRequest) -> list[Any]:
    return [p if isinstance(p, str) else {"prompt_token_ids": p} for p in request.prompts]


@attrs.frozen
class _Echo:
    """What ``echo`` puts before a prompt's choices: its text, token ids and logprobs."""

    text: str
    token_ids: list[int]
    logprobs: list[Any] | None
    first_token: str  # the text of the first token, which has no logprob

    def prefix(self, output: Any, want_logprobs: bool) -> tuple[str, list[int], list[Any] | None]:
        """``output``'s text, token ids and logprobs with the prompt's in front."""
        logprobs = None
        if want_logprobs and output.logprobs is not None:
            logprobs = [*(self.logprobs or [None] * len(self.token_ids)), *output.logprobs]
        return self.text + output.text, [*self.token_ids, *output.token_ids], logprobs


async def _echo(pool: EnginePool, request: CompletionRequest, first: Any) -> _Echo:
    ids = list(first.prompt_token_ids or ())
    # A text prompt comes back as sent; token ids are detokenized, as vLLM does.
    text = first.prompt if first.prompt is not None else await pool.decode(request.model, ids)
    head = await pool.decode(request.model, ids[:1]) if request.logprobs is not None and ids else ""
    return _Echo(text, ids, list(first.prompt_logprobs) if first.prompt_logprobs is not None else None, head)


async def completion(pool: EnginePool, request: CompletionRequest) -> Response:
    """Serve one completions request (one or more prompts), streamed or not."""
    request_id = f"cmpl-{uuid.uuid4().hex}"
    started = await start(pool, request, _prompts(request), request_id=request_id, param="prompt")
    created = int(time.time())
    echoes: list[_Echo | None] = [None] * len(started)
    if request.echo:
        try:
            echoes = [await _echo(pool, request, s.first) for s in started]
        except BaseException as exc:
            await close_all(started)
            if isinstance(exc, Exception):
                raise to_openai_error(exc) from exc
            raise
    if request.stream:
        return StreamingResponse(
            _chunks(request, started, echoes, request_id, created), media_type="text/event-stream"
        )
    choices: list[dict[str, Any]] = []
    prompt_tokens = completion_tokens = cached = 0
    for p, s in enumerate(started):
        final = await final_output(s)
        prompt_tokens += len(final.prompt_token_ids or ())
        cached += final.num_cached_tokens or 0
        echo = echoes[p]
        for c in final.outputs:
            completion_tokens += len(c.token_ids)
            text, token_ids, lps = c.text, c.token_ids, c.logprobs
            if echo is not None:
                text, token_ids, lps = echo.prefix(c, request.logprobs is not None)
            logprobs = None
            if request.logprobs is not None and lps is not None:
                logprobs = completion_logprobs(token_ids, lps, request.logprobs, 0, echo.first_token if echo else "")
            choices.append(
                {
                    "index": p * request.n + c.index,
                    "text": text,
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
    request: CompletionRequest, started: list[Started], echoes: list[_Echo | None], request_id: str, created: int
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
            generated = [0] * request.n
            echo = echoes[p]
            unechoed = set(range(request.n)) if echo is not None else set()
            async for output in drain(s):
                for c in output.outputs:
                    completion_tokens += len(c.token_ids)
                    generated[c.index] += len(c.token_ids)
                    text, token_ids, lps, unscored = c.text, c.token_ids, c.logprobs, ""
                    if echo is not None and c.index in unechoed:  # the prompt goes first, once
                        unechoed.discard(c.index)
                        text, token_ids, lps = echo.prefix(c, request.logprobs is not None)
                        unscored = echo.first_token
                    logprobs = None
                    if request.logprobs is not None and lps is not None:
                        logprobs = completion_logprobs(token_ids, lps, request.logprobs, offsets[c.index], unscored)
                    offsets[c.index] += len(text)
                    if not (text or logprobs or c.finish_reason):
                        continue  # a token that ends mid-character: no text yet
                    choice = {
                        "index": p * request.n + c.index,
                        "text": text,
                        "logprobs": logprobs,
                        "finish_reason": c.finish_reason,
                        "stop_reason": getattr(c, "stop_reason", None),
                    }
                    extra = {}
                    if request.continuous_usage:
                        extra["usage"] = sse.running_usage(len(s.first.prompt_token_ids or ()), generated[c.index])
                    yield chunk([choice], **extra)
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

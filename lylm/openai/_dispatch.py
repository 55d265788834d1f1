"""From a validated request to running engine streams, with every failure mapped
to an OpenAI error *before* the response starts (a stream cannot change status)."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from typing import Any, Union

import attrs

from .._exceptions import (
    ContextLengthError,
    EngineDeadError,
    EngineError,
    InvalidRequestError,
    LylmError,
    NoHealthyEngineError,
    OverloadedError,
    PromptError,
    ShuttingDownError,
    UnknownModelError,
)
from .._pool import EnginePool, Prompt
from ._errors import OpenAIError, bad_request
from ._protocol import ChatRequest, CompletionRequest, build_sampling_params

Request = Union[ChatRequest, CompletionRequest]


@attrs.define
class Started:
    """One prompt dispatched to an engine: its first output and the rest of its stream."""

    first: Any
    rest: AsyncGenerator[Any, None]


def to_openai_error(exc: BaseException) -> OpenAIError:
    """Map a pool or engine error to the status and body a client should get."""
    if isinstance(exc, OpenAIError):
        return exc
    if isinstance(exc, UnknownModelError):
        return OpenAIError(404, str(exc), param="model", code="model_not_found")
    if isinstance(exc, OverloadedError):
        return OpenAIError(
            429,
            str(exc),
            type="rate_limit_error",
            code="model_at_capacity",
            headers={"Retry-After": str(max(1, round(exc.retry_after)))},
        )
    if isinstance(exc, NoHealthyEngineError):
        return OpenAIError(503, str(exc), type="service_unavailable", code="no_healthy_engine")
    if isinstance(exc, ShuttingDownError):
        # Another replica behind the same load balancer can take it now.
        return OpenAIError(
            503, str(exc), type="service_unavailable", code="shutting_down", headers={"Retry-After": "1"}
        )
    if isinstance(exc, (InvalidRequestError, ValueError, TypeError)):
        return bad_request(str(exc))
    if isinstance(exc, EngineDeadError):
        return OpenAIError(503, str(exc), type="service_unavailable", code="engine_dead")
    if isinstance(exc, (EngineError, LylmError)):
        return OpenAIError(500, str(exc), type="server_error", code="engine_error")
    return OpenAIError(500, "internal error", type="server_error")


async def start(
    pool: EnginePool,
    request: Request,
    prompts: Sequence[Prompt],
    *,
    request_id: str,
    param: str,
) -> list[Started]:
    """Dispatch every prompt and wait for each one's first output.

    Errors (unknown model, prompt too long, no healthy engine, engine rejection)
    surface here, while a proper status can still be sent; on any error the
    streams already started are closed, which aborts them in their engines. The
    pool renders each prompt and checks it against the context, once.
    """
    if request.model not in pool.models:
        raise to_openai_error(UnknownModelError(request.model, pool.models))
    started: list[Started] = []
    try:
        params = build_sampling_params(request, stream=request.stream)
        for i, prompt in enumerate(prompts):
            outputs = pool.generate(
                request.model,
                prompt,
                params,
                request_id=f"{request_id}-{i}",
                session_key=request.user,
            )
            try:
                first = await outputs.__anext__()
            except ContextLengthError as exc:
                raise bad_request(str(exc), param=param, code="context_length_exceeded") from exc
            except PromptError as exc:
                # The tokenizer or chat template rejected what the client sent.
                raise bad_request(str(exc), param=param) from exc
            except BaseException:
                await outputs.aclose()
                raise
            started.append(Started(first, outputs))
    except BaseException as exc:
        for s in started:
            await s.rest.aclose()
        if isinstance(exc, Exception):
            raise to_openai_error(exc) from exc
        raise
    return started


async def drain(started: Started) -> AsyncGenerator[Any, None]:
    """Yield the first output, then the rest; closing this closes the engine stream."""
    try:
        yield started.first
        async for output in started.rest:
            yield output
    finally:
        await started.rest.aclose()

"""From a validated request to running engine streams, with every failure mapped
to an OpenAI error *before* the response starts (a stream cannot change status)."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Mapping, Sequence
from typing import Any, Union

import anyio
import attrs

from .._exceptions import (
    ContextLengthError,
    EngineDeadError,
    EngineError,
    HubUnavailableError,
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

NO_ENGINE_RETRY_AFTER = 5
"""Seconds a 503 for a model without a healthy engine tells clients to wait (``Retry-After``):
a restart takes seconds (the supervisor's backoff) to a minute (an engine's start)."""


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
        # Engines come back by restarting (seconds to a minute): tell clients when to try again.
        retry = {"Retry-After": str(NO_ENGINE_RETRY_AFTER)}
        return OpenAIError(503, str(exc), type="service_unavailable", code="no_healthy_engine", headers=retry)
    if isinstance(exc, HubUnavailableError):
        # The server's hub is busy or stalled; this front end (and the engines) are fine.
        retry = {"Retry-After": str(max(1, round(exc.retry_after)))}
        return OpenAIError(503, str(exc), type="service_unavailable", code="hub_unavailable", headers=retry)
    if isinstance(exc, ShuttingDownError):
        # Another replica behind the same load balancer can take it now.
        return OpenAIError(
            503, str(exc), type="service_unavailable", code="shutting_down", headers={"Retry-After": "1"}
        )
    if isinstance(exc, (InvalidRequestError, ValueError, TypeError)):
        return bad_request(str(exc))
    if isinstance(exc, EngineDeadError):
        retry = {"Retry-After": str(NO_ENGINE_RETRY_AFTER)}
        return OpenAIError(503, str(exc), type="service_unavailable", code="engine_dead", headers=retry)
    if isinstance(exc, (EngineError, LylmError)):
        return OpenAIError(500, str(exc), type="server_error", code="engine_error")
    return OpenAIError(500, "internal error", type="server_error")


def check_model(pool: EnginePool, model: str) -> None:
    """A 404 for a model the pool does not serve."""
    if model not in pool.models:
        raise to_openai_error(UnknownModelError(model, pool.models))


async def start(
    pool: EnginePool,
    request: Request,
    prompts: Sequence[Prompt],
    *,
    request_id: str,
    param: str,
    chat_template_kwargs: Mapping[str, Any] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> list[Started]:
    """Dispatch every prompt at once and wait for each one's first output.

    Errors (unknown model, prompt too long, no healthy engine, engine rejection)
    surface here, while a proper status can still be sent; on any error the
    streams already started are closed, which aborts them in their engines. The
    pool renders each prompt and checks it against the context, once.
    ``chat_template_kwargs`` go to the chat template (declared tools), ``overrides``
    over the request's sampling parameters (a forced tool call's schema).
    """
    check_model(pool, request.model)
    try:
        # What the request leaves out comes from the model's generation config, as with
        # `vllm serve` (Qwen2.5: temperature 0.7, top_p 0.8, top_k 20, ...).
        defaults = pool.sampling_defaults(request.model)
        params = build_sampling_params(request, stream=request.stream, defaults=defaults, overrides=overrides)
    except Exception as exc:
        raise to_openai_error(exc) from exc
    return await dispatch(
        pool,
        request.model,
        prompts,
        params,
        request_id=request_id,
        session_key=request.user,
        param=param,
        chat_template_kwargs=chat_template_kwargs,
    )


async def dispatch(
    pool: EnginePool,
    model: str,
    prompts: Sequence[Prompt],
    params: Any,
    *,
    request_id: str,
    session_key: str | None,
    param: str,
    chat_template_kwargs: Mapping[str, Any] | None = None,
) -> list[Started]:
    """:func:`start` with the engine parameters given (vLLM's ``SamplingParams``, or
    ``PoolingParams`` for embeddings): every prompt at once, errors before any output."""
    limit = pool.limits(model).get("max_in_flight_requests")
    if limit is not None and len(prompts) > limit:
        # Each prompt is a request in flight: this one could never be admitted whole, so
        # waiting (429, Retry-After) would not help.
        message = f"'{param}' has {len(prompts)} prompts; model '{model}' admits at most {limit} requests at once"
        raise bad_request(message, param=param, code="too_many_prompts")
    streams = [
        pool.generate(
            model,
            prompt,
            params,
            request_id=f"{request_id}-{i}",
            session_key=session_key,
            chat_template_kwargs=chat_template_kwargs,
        )
        for i, prompt in enumerate(prompts)
    ]
    firsts: list[Any] = [None] * len(streams)
    errors: list[BaseException | None] = [None] * len(streams)

    async def first(i: int) -> None:
        try:
            firsts[i] = await streams[i].__anext__()
        except Exception as exc:
            errors[i] = exc
            tg.cancel_scope.cancel()  # one prompt failed: the request fails, stop the others

    # Every prompt at once: without streaming, a prompt's first output is its last, so
    # waiting for one before dispatching the next would run them one after another.
    try:
        async with anyio.create_task_group() as tg:
            for i in range(len(streams)):
                tg.start_soon(first, i)
    except BaseException:
        await _close(streams)
        raise
    failed = next((e for e in errors if e is not None), None)
    # The tasks' frames reach this list through their closure and each exception reaches
    # its task's frame through its traceback: clear it, or that cycle keeps every prompt of
    # a failed request alive until a full garbage collection.
    errors.clear()
    if failed is not None or any(f is None for f in firsts):
        await _close(streams)
        if isinstance(failed, ContextLengthError):
            raise bad_request(str(failed), param=param, code="context_length_exceeded") from failed
        if isinstance(failed, PromptError):
            # The tokenizer or chat template rejected what the client sent.
            raise bad_request(str(failed), param=param) from failed
        if failed is None:
            failed = EngineError("an engine stream ended before its first output")
        raise to_openai_error(failed) from failed
    return [Started(f, s) for f, s in zip(firsts, streams)]


async def _close(streams: Sequence[AsyncGenerator[Any, None]]) -> None:
    # Closing a stream aborts its request in the engine (a no-op for one never started).
    with anyio.CancelScope(shield=True):
        for stream in streams:
            await stream.aclose()


async def close_all(started: Sequence[Started]) -> None:
    """Close started streams (aborting their requests in the engines), even when cancelled."""
    await _close([s.rest for s in started])


async def final_output(started: Started) -> Any:
    """The stream's last output: a non-streamed request's whole answer."""
    final = None
    async for output in drain(started):
        final = output
    assert final is not None  # a started stream has at least its first output
    return final


async def drain(started: Started) -> AsyncGenerator[Any, None]:
    """Yield the first output, then the rest; closing this closes the engine stream."""
    try:
        yield started.first
        async for output in started.rest:
            yield output
    finally:
        await started.rest.aclose()

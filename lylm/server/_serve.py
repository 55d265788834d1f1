"""Serving a pool over OpenAI's API with uvicorn: in one process, or with N front-end workers.

``serve(config, workers=1)`` is one process: the pool and the HTTP server share
one event loop, as in any app that mounts the adapter.

``serve(config, workers=N)`` (N > 1) splits the per-token work over N processes,
as ``vllm serve --api-server-count N`` does: the main process launches each
instance's engine core once, for N clients (:class:`lylm.engines._cores.CoreEngine`),
binds the port, and spawns N workers. Each worker attaches an engine front end to
every core (vLLM's ``AsyncLLM`` with ``client_index``) and serves the whole HTTP
API on the shared socket, new connections going to the least loaded worker. The main
process keeps what must be seen whole (the hub, :mod:`lylm.server._hub`): books,
admission, balancers, health, restarts and metrics. Per request a worker makes one
round trip to the hub to learn its instance; tokens go from the engine core to the
worker that serves the request and nowhere else.

Signals: SIGINT/SIGTERM drain (new requests get 503 while those in flight finish,
at most ``drain_timeout`` seconds), then everything stops; a second signal skips the
wait. With workers, a worker that dies is replaced (:mod:`._workers`); should the main
process be killed outright, the watchdog (:mod:`lylm.engines._watchdog`) stops the workers and the
engine cores. The main process with workers is :mod:`._multiprocess`.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import socket
from collections.abc import Callable
from functools import partial
from types import FrameType
from typing import Any

import anyio
import attrs
import uvicorn

from .._config import EngineSpec, PoolConfig
from .._engine import Engine
from .._exceptions import ConfigError, LylmError
from .._pool import EnginePool, PoolOptions
from ..openai import create_app
from ..openai._app import DEFAULT_MAX_BODY_BYTES
from ..openai._monitor import Monitor
from ._http import HttpLimits, bounded_protocol

logger = logging.getLogger("lylm.serve")

#: Seconds the server keeps answering 503 after the drain, before it closes.
LINGER = 1.0
#: Seconds given to requests ended at the drain deadline to send their last bytes.
ENDING_TIMEOUT = 5.0


def _positive_seconds(instance: object, attribute: "attrs.Attribute[Any]", value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or value == float("inf"):
        raise ValueError(f"{attribute.name} must be a positive number of seconds (got {value!r})")


def _replacements(instance: object, attribute: "attrs.Attribute[Any]", value: Any) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise ValueError(f"{attribute.name} must be a non-negative integer or None (got {value!r})")


@attrs.frozen
class ServerOptions:
    """Where and how the HTTP server listens (see :func:`serve`)."""

    host: str = "127.0.0.1"
    port: int = 8000
    api_keys: tuple[str, ...] = ()
    keys_for_health: bool = False
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    drain_timeout: float = 30.0
    log_level: str = "info"
    #: Bounds on reading requests: head size, header count, head and body time (431/408).
    limits: HttpLimits = HttpLimits()
    #: With workers: seconds a worker may go without answering the hub (a stalled event
    #: loop, a SIGSTOP) before it is killed and replaced.
    worker_timeout: float = attrs.field(default=10.0, validator=_positive_seconds)
    #: With workers: how many dead workers may be replaced over the engine cores' life
    #: (each replacement takes a spare client slot on every core); None: one per worker.
    replacements: int | None = attrs.field(default=None, validator=_replacements)


def launch_vllm_core(spec: EngineSpec, clients: int, on_started: Any) -> Engine:
    """The main process's engine for an instance: its vLLM engine core, for ``clients`` workers."""
    from ..engines._cores import CoreEngine

    return CoreEngine(spec, clients=clients, on_started=on_started)


def attach_vllm_engine(spec: EngineSpec, handle: Any, index: int) -> Engine:
    """A worker's engine for an instance: a vLLM front end attached to its core as client ``index``."""
    from ..engines._local import VLLMEngine

    return VLLMEngine.attached(spec, handle, index)


@attrs.frozen
class EngineKinds:
    """How engines are made when there are workers: ``launch(spec, workers, on_started)`` in
    the main process, ``attach(spec, handle, worker_index)`` in each worker (``handle`` is
    the launched engine's ``handle`` attribute). Both must be importable by name: the
    workers are spawned. The default is vLLM's; benchmarks swap in fakes."""

    launch: Callable[[EngineSpec, int, Any], Engine] = launch_vllm_core
    attach: Callable[[EngineSpec, Any, int], Engine] = attach_vllm_engine


def default_workers(config: PoolConfig) -> int:
    """``common.workers`` if set; else, with GPUs in use, one worker per GPU and at least 2
    (at most the CPU count); else 1.

    At least 2 on a GPU because one process was the ceiling even for one engine on one
    H200 (BENCHMARKS.md 13: 256 streams of a 1.5B model, 1.3x with 4 workers).
    """
    if config.workers is not None:
        return config.workers
    gpus = len(config.gpus)
    if not gpus:
        return 1
    return max(1, min(max(2, gpus), os.cpu_count() or 1))


class DrainingServer(uvicorn.Server):
    """uvicorn, but the first SIGTERM/SIGINT drains the pool before the server stops listening.

    Plain uvicorn closes its socket at once, so new clients would see refused
    connections while old requests finish; here they get a 503 they can retry
    elsewhere, until nothing is in flight or the drain timeout passes.
    """

    def __init__(self, config: uvicorn.Config, pool: EnginePool, drain_timeout: float) -> None:
        super().__init__(config)
        self.pool = pool
        self.drain_timeout = drain_timeout
        self._drain: asyncio.Task[None] | None = None
        self._draining = False
        self._loop: asyncio.AbstractEventLoop | None = None
        #: Why the engines did not start (raised by :func:`serve`).
        self.startup_error: Exception | None = None

    async def startup(self, sockets: Any = None) -> None:
        self._loop = asyncio.get_running_loop()
        try:
            # The engines start here, before uvicorn's lifespan (which finds the pool running):
            # a failure is kept for serve() to raise, not logged away by uvicorn as a traceback.
            await self.pool.start()
        except Exception as exc:
            self.startup_error = exc
            self.should_exit = True  # uvicorn returns without serving
            return
        await super().startup(sockets=sockets)  # runs the lifespan
        # Importing torch, transformers and vLLM leaves millions of objects that every
        # full garbage collection walks, stopping the event loop for 0.5 s on a GPU host
        # (BENCHMARKS.md 9.6: TTFT p99 2.4-3.3x worse). Freeze them, as `vllm serve` does.
        gc.collect()
        gc.freeze()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._draining or self._loop is None or not self.started:
            super().handle_exit(sig, frame)  # a second signal, or not serving yet: stop now
            return
        self._draining = True
        self._captured_signals.append(sig)  # re-raised after shutdown, as uvicorn does
        # A signal handler may interrupt the loop anywhere: hand the work to it safely.
        self._loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        if self._drain is None:
            self._drain = asyncio.get_running_loop().create_task(self._drain_then_exit())

    async def _drain_then_exit(self) -> None:
        in_flight = sum(i.in_flight_requests for i in self.pool.instances())
        logger.info("draining: %d request(s) in flight, new ones get 503 (at most %g s)", in_flight, self.drain_timeout)
        clean = await self.pool.drain(self.drain_timeout)
        if not clean:
            instances = self.pool.instances()
            left = sum(i.in_flight_requests for i in instances)
            logger.warning("drain timeout: ending the %d request(s) still in flight", left)
            # End them as any failure ends a request (a stream: OpenAI's error event and
            # [DONE]) rather than leave uvicorn to cut their connections as it closes.
            await self.pool.aclose()
            with anyio.move_on_after(ENDING_TIMEOUT):
                while any(i.in_flight_requests for i in instances):
                    await anyio.sleep(0.02)
        # Clients whose last request just finished send their next one on the same
        # connection at once; answer it (503, Connection: close) rather than cut it
        # off as the server closes.
        await asyncio.sleep(LINGER)
        self.should_exit = True


def serve(
    config: PoolConfig,
    *,
    workers: int = 1,
    options: ServerOptions = ServerOptions(),
    pool_options: PoolOptions | None = None,
    engines: EngineKinds | None = None,
) -> None:
    """Serve ``config``'s pool over OpenAI's API until SIGINT/SIGTERM (see the module docstring).

    ``pool_options`` go to :class:`EnginePool` (:class:`lylm.PoolOptions`: limits,
    ``retries``, ``restart``...).
    ``engines`` is for ``workers`` > 1 only (the single process takes an
    ``engine_factory`` in ``pool_options``).
    """
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a positive integer (got {workers!r})")
    pool_options = PoolOptions(**(pool_options or {}))  # a copy
    if workers == 1:
        # Bound first: a port in use is reported at once, not after every engine started.
        sock = bind(options.host, options.port)
        pool = EnginePool(config, **pool_options)
        app = _app(pool, options)
        logger.info("engines start before the server listens on http://%s:%d", options.host, options.port)
        uv = _uvicorn_config(app, options, host=options.host, port=options.port)
        server = DrainingServer(uv, pool, options.drain_timeout)
        try:
            server.run(sockets=[sock])
        finally:
            sock.close()
        if server.startup_error is not None:
            raise server.startup_error
        return
    if "engine_factory" in pool_options:
        raise ValueError("with workers > 1, engines are made by `engines` (EngineKinds), not engine_factory")
    for model in config.models:
        for spec in model.instances:
            if spec.remote is not None:
                # Workers attach to engine cores the main process launched here; a remote
                # core attaches to one front end. Refused before anything starts.
                raise ConfigError(f"{spec.name}.remote", "remote instances are served by one process (workers 1) for now")
    from ._multiprocess import main_process

    try:
        code = anyio.run(partial(main_process, config, workers, options, pool_options, engines or EngineKinds()))
    except BaseExceptionGroup as group:
        # A start that failed inside the main process's task groups: raise the error itself
        # (a config mistake, an engine that did not start), as one process does.
        leaves = _leaves(group)
        if len(leaves) == 1 and isinstance(leaves[0], LylmError):
            raise leaves[0] from None
        raise
    if code < 0:
        # Stopped by a signal: end by it, as uvicorn (and any Unix program) does.
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    if code:
        raise SystemExit(code)


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    found: list[BaseException] = []
    for exc in group.exceptions:
        found.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return found


def bind(host: str, port: int) -> socket.socket:
    """The server's socket, bound (claiming the port) but not yet listening. A port in use is
    a :class:`ConfigError` naming the address."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(
            "port", f"cannot listen on {host}:{port}: {exc.strerror or exc}; stop what holds it or choose another port"
        ) from None
    return sock


def _app(pool: EnginePool, options: ServerOptions, monitor: Monitor | None = None) -> Any:
    return create_app(
        pool,
        monitor=monitor,
        api_keys=options.api_keys or None,
        keys_for_health=options.keys_for_health,
        max_body_bytes=options.max_body_bytes,
        body_timeout=options.limits.body_timeout,
    )


def _uvicorn_config(app: Any, options: ServerOptions, **where: Any) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        log_level=options.log_level,
        # httptools, with bounds on the size and time of a request's head.
        http=bounded_protocol(options.limits),
        # The pool drains first; this only bounds the last bytes still being sent.
        timeout_graceful_shutdown=5,
        **where,
    )

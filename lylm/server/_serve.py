"""Serving a pool over OpenAI's API with uvicorn: in one process, or with N front-end workers.

``serve(config, workers=1)`` is one process: the pool and the HTTP server share
one event loop, as in any app that mounts the adapter.

``serve(config, workers=N)`` (N > 1) splits the per-token work over N processes,
as ``vllm serve --api-server-count N`` does: the main process launches each
instance's engine core once, for N clients (:class:`lylm._vllm_cores.CoreEngine`),
binds the port, and spawns N workers. Each worker attaches an engine front end to
every core (vLLM's ``AsyncLLM`` with ``client_index``) and serves the whole HTTP
API on the shared socket; the kernel spreads connections over them. The main
process keeps what must be seen whole (the hub, :mod:`lylm.server._hub`): books,
admission, balancers, health, restarts and metrics. Per request a worker makes one
round trip to the hub to learn its instance; tokens go from the engine core to the
worker that serves the request and nowhere else.

Signals: SIGINT/SIGTERM drain (new requests get 503 while those in flight finish,
at most ``drain_timeout`` seconds), then everything stops; a second signal skips the
wait. A worker that exits on its own stops the server (its client slot on every
engine core cannot be taken again). Should the main process be killed outright, the
watchdog (:mod:`lylm._reaper`) stops the workers and the engine cores.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import multiprocessing
import os
import signal
import socket
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from functools import partial
from types import FrameType
from typing import Any

import anyio
import attrs
import uvicorn
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from .._config import EngineSpec, PoolConfig
from .._exceptions import ConfigError
from .._engine import Engine
from ._hub import Hub, HubClient
from .._pool import EnginePool, PoolOptions
from .._reaper import REAPER, process_tree
from ._worker_pool import WorkerPool
from ..openai import create_app
from ..openai._app import DEFAULT_MAX_BODY_BYTES
from ..openai._metrics import PoolMetrics
from ..openai._monitor import Monitor, health_report
from ._http import HttpLimits, bounded_protocol
from ._monitor import HubMonitor

logger = logging.getLogger("lylm.serve")

#: Seconds the server keeps answering 503 after the drain, before it closes.
LINGER = 1.0
#: Seconds given to requests ended at the drain deadline to send their last bytes.
ENDING_TIMEOUT = 5.0


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


def launch_vllm_core(spec: EngineSpec, clients: int, on_started: Any) -> Engine:
    """The main process's engine for an instance: its vLLM engine core, for ``clients`` workers."""
    from .._vllm_cores import CoreEngine

    return CoreEngine(spec, clients=clients, on_started=on_started)


def attach_vllm_engine(spec: EngineSpec, handle: Any, index: int) -> Engine:
    """A worker's engine for an instance: a vLLM front end attached to its core as client ``index``."""
    from .._vllm_engine import VLLMEngine

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

    async def startup(self, sockets: Any = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets=sockets)  # runs the lifespan: the engines are up after it
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
        pool = EnginePool(config, **pool_options)
        app = _app(pool, options)
        logger.info("engines start before the server listens on http://%s:%d", options.host, options.port)
        uv = _uvicorn_config(app, options, host=options.host, port=options.port)
        DrainingServer(uv, pool, options.drain_timeout).run()
        return
    if "engine_factory" in pool_options:
        raise ValueError("with workers > 1, engines are made by `engines` (EngineKinds), not engine_factory")
    for model in config.models:
        for spec in model.instances:
            if spec.remote is not None:
                # Workers attach to engine cores the main process launched here; a remote
                # core attaches to one front end. Refused before anything starts.
                raise ConfigError(f"{spec.name}.remote", "remote instances are served by one process (workers 1) for now")
    code = anyio.run(partial(_main_process, config, workers, options, pool_options, engines or EngineKinds()))
    if code < 0:
        # Stopped by a signal: end by it, as uvicorn (and any Unix program) does.
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    if code:
        raise SystemExit(code)


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


# -- the main process of a server with workers ----------------------------------------


class _WorkerCollector(Collector):
    def __init__(self, hub: Hub) -> None:
        self._hub = hub

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "lylm_worker_requests", "Requests each front-end worker dispatched.", labels=["worker"]
        )
        for index, count in enumerate(self._hub.requests_by_worker):
            family.add_metric([str(index)], count)
        yield family


def _bind(host: str, port: int) -> socket.socket:
    """The server's socket, bound (claiming the port) but not yet listening: the workers listen."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise SystemExit(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


@attrs.frozen
class _WorkerSettings:
    index: int
    config: PoolConfig
    hub_address: str
    handles: Mapping[str, Any]
    attach: Callable[[EngineSpec, Any, int], Engine]
    options: ServerOptions
    retries: int


async def _main_process(
    config: PoolConfig,
    workers: int,
    options: ServerOptions,
    pool_options: PoolOptions,
    engines: EngineKinds,
) -> int:
    sock = _bind(options.host, options.port)
    directory = tempfile.mkdtemp(prefix="lylm-hub-")  # 0700: only this user reaches the hub
    generations: dict[str, int] = {}
    hub: Hub | None = None

    async def core_started(name: str, handle: Any) -> None:
        # A restarted core: every worker attaches to it before it serves again.
        generations[name] = generations.get(name, 0) + 1
        if hub is not None:
            await hub.attach(name, generations[name], handle)

    pool_options["engine_factory"] = lambda spec: engines.launch(spec, workers, core_started)
    pool = EnginePool(config, **pool_options)
    hub = Hub(pool, workers=workers, address=f"ipc://{directory}/hub")
    metrics = PoolMetrics(pool)
    metrics.registry.register(_WorkerCollector(hub))

    def render_metrics() -> bytes:
        responses, hub.responses = hub.responses, {}
        for (route, status), count in responses.items():
            metrics.http_responses.labels(route, status).inc(count)
        return metrics.render()

    hub.handlers["health"] = lambda: health_report(pool)
    hub.handlers["metrics"] = render_metrics
    hub.bind()
    processes: list[Any] = []
    watched: list[Any] = []
    code = 0
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(hub.serve)
            stop = anyio.Event()
            received: list[int] = []
            tg.start_soon(_signals, stop, received, processes)
            instances = sum(len(m.instances) for m in config.models)
            logger.info("starting %d engine core(s) for %d front-end workers", instances, workers)
            with anyio.CancelScope() as startup:
                tg.start_soon(_cancel_when, stop, startup)  # a signal while engines start: stop
                await pool.start()
            if startup.cancelled_caught or stop.is_set():
                tg.cancel_scope.cancel()
                return -received[0] if received else 0
            handles = {i.name: getattr(i.engine, "handle", None) for i in pool.instances()}
            retries = int(pool_options.get("retries", 2))
            context = multiprocessing.get_context("spawn")
            for index in range(workers):
                settings = _WorkerSettings(index, config, hub.address, handles, engines.attach, options, retries)
                process = context.Process(target=_worker_main, args=(settings, sock), name=f"lylm-worker-{index}")
                process.start()
                processes.append(process)
            # Should this process be killed outright, the watchdog stops the workers too.
            watched = process_tree([p.pid for p in processes])
            REAPER.watch(watched)
            died = anyio.Event()
            tg.start_soon(_watch_workers, processes, died)
            tg.start_soon(_announce, hub, options, workers)
            await _first(died, stop)
            if died.is_set():
                code = 1
            else:
                # Drain: the hub takes no new requests; each worker drains its own.
                logger.info("draining %d workers (at most %g s)", workers, options.drain_timeout)
                await pool.drain(0)
                for process in processes:
                    _signal(process, signal.SIGTERM)
                code = -received[0]
            await _join(processes, options.drain_timeout + ENDING_TIMEOUT + LINGER + 10)
            tg.cancel_scope.cancel()
    finally:
        with anyio.CancelScope(shield=True):
            for process in processes:
                if process.exitcode is None:
                    process.kill()
            await pool.aclose()
            hub.close()
            REAPER.forget(watched)
            sock.close()
            try:
                os.unlink(f"{directory}/hub")
            except OSError:
                pass
            os.rmdir(directory)
    return code


async def _cancel_when(event: anyio.Event, scope: anyio.CancelScope) -> None:
    await event.wait()
    scope.cancel()


async def _announce(hub: Hub, options: ServerOptions, workers: int) -> None:
    await hub.wait_ready()
    logger.info("serving on http://%s:%d with %d front-end workers", options.host, options.port, workers)


async def _first(*events: anyio.Event) -> None:
    async with anyio.create_task_group() as tg:
        for event in events:

            async def wait(event: anyio.Event = event) -> None:
                await event.wait()
                tg.cancel_scope.cancel()

            tg.start_soon(wait)


async def _signals(stop: anyio.Event, received: list[int], processes: list[Any]) -> None:
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for number in signals:
            received.append(int(number))
            if not stop.is_set():
                stop.set()
                continue
            # A second signal: the workers stop now (their own second signal).
            logger.warning("second signal: stopping now")
            for process in processes:
                _signal(process, signal.SIGTERM)


async def _watch_workers(processes: list[Any], died: anyio.Event) -> None:
    while not died.is_set():
        for process in processes:
            if process.exitcode is not None:
                logger.error(
                    "front-end worker %s (pid %s) exited with code %s: stopping the server",
                    process.name, process.pid, process.exitcode,
                )
                died.set()
                for other in processes:
                    _signal(other, signal.SIGTERM)
                return
        await anyio.sleep(0.2)


def _signal(process: Any, sig: int) -> None:
    if process.exitcode is None and process.pid is not None:
        try:
            os.kill(process.pid, sig)
        except ProcessLookupError:
            pass


async def _join(processes: list[Any], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while any(p.exitcode is None for p in processes) and time.monotonic() < deadline:
        await anyio.sleep(0.05)
    for process in processes:
        if process.exitcode is None:
            logger.warning("worker %s did not stop within %g s: killing it", process.name, timeout)
            process.kill()


# -- one front-end worker ------------------------------------------------------------


class _WorkerServer(DrainingServer):
    def __init__(self, config: uvicorn.Config, pool: WorkerPool, drain_timeout: float) -> None:
        super().__init__(config, pool, drain_timeout)
        self.worker_pool = pool

    async def startup(self, sockets: Any = None) -> None:
        await self.worker_pool.hub.connect()
        await super().startup(sockets=sockets)
        await self.worker_pool.hub.ready()

    async def shutdown(self, sockets: Any = None) -> None:
        await super().shutdown(sockets=sockets)
        await self.worker_pool.hub.close()


def _worker_main(settings: _WorkerSettings, sock: socket.socket) -> None:
    # Its own process group: a terminal's Ctrl-C reaches the main process alone,
    # which drains every worker with one SIGTERM each.
    os.setpgid(0, 0)
    options = settings.options
    logging.basicConfig(
        level=options.log_level.upper(), format=f"%(levelname)s %(name)s[w{settings.index}]: %(message)s"
    )
    hub = HubClient(settings.hub_address, settings.index)
    pool = WorkerPool(
        settings.config,
        hub=hub,
        attach=lambda spec, handle: settings.attach(spec, handle, settings.index),
        handles=settings.handles,
        retries=settings.retries,
    )
    uv = _uvicorn_config(_app(pool, options, HubMonitor(pool)), options)
    _WorkerServer(uv, pool, options.drain_timeout).run(sockets=[sock])

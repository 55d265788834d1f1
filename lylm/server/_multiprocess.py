"""A server with front-end workers: the main process (engine cores, the hub, the workers'
supervision) and each worker's own main.

The main process launches each instance's engine core once, for every worker and for
spare client slots (:mod:`._workers`), binds the port, keeps the hub (:mod:`._hub`) and
spawns the workers. Each worker attaches to every core, connects to the hub and serves
the whole API on the shared socket; the kernel hands each new connection to one of them.

Signals: SIGINT/SIGTERM drain (the hub takes no new requests; each worker drains its own,
at most ``drain_timeout`` seconds), then everything stops; a second signal skips the
wait. A worker that dies is replaced; should the main process be killed outright, the
watchdog (:mod:`lylm.engines._watchdog`) stops the workers and the engine cores.
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
from collections.abc import Callable, Iterator
from typing import Any

import anyio
import attrs
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .._config import EngineSpec, PoolConfig
from .._engine import Engine
from .._pool import EnginePool, PoolOptions
from ..openai._metrics import PoolMetrics
from ..openai._monitor import health_report
from ._accept import NOT_ACCEPTING, BalancedAcceptor, Loads
from ._hub import Hub
from ._hub_client import HubClient
from ._monitor import HubMonitor
from ._serve import ENDING_TIMEOUT, LINGER, DrainingServer, EngineKinds, ServerOptions, _app, _uvicorn_config, bind
from ._worker_pool import WorkerPool
from ._workers import Workers

logger = logging.getLogger("lylm.serve")


class _HubCollector(Collector):
    """The workers and the hub, for /metrics."""

    def __init__(self, hub: Hub, workers: Callable[[], Workers | None]) -> None:
        self._hub = hub
        self._workers = workers

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "lylm_worker_requests", "Requests each front-end worker slot dispatched.", labels=["worker"]
        )
        for slot, count in sorted(self._hub.requests_by_slot.items()):
            requests.add_metric([str(slot)], count)
        serving = GaugeMetricFamily("lylm_workers_serving", "Front-end workers serving now.")
        serving.add_metric([], self._hub.ready_count())
        workers = self._workers()
        replaced = CounterMetricFamily("lylm_worker_replacements", "Front-end workers replaced after they died.")
        replaced.add_metric([], workers.replaced if workers is not None else 0)
        reconciled = CounterMetricFamily(
            "lylm_hub_reconciled_bookings",
            "Requests the hub ended itself because their worker no longer held them or died (0 while all is well).",
        )
        reconciled.add_metric([], self._hub.reconciled)
        yield from (requests, serving, replaced, reconciled)


@attrs.frozen
class _WorkerSettings:
    slot: int
    client_index: int
    identity: bytes
    config: PoolConfig
    hub_address: str
    attach: Callable[[EngineSpec, Any, int], Engine]
    options: ServerOptions
    pool_options: dict[str, Any]
    loads: Loads


def _worker_pool_options(pool_options: PoolOptions) -> dict[str, Any]:
    # What a worker's own pool needs of the options: retries, and the admission limits
    # (the hub admits; the worker reports them, e.g. to refuse a request of more
    # prompts than a model admits with a 400, as one process does).
    keys = ("retries", "max_in_flight_requests", "max_in_flight_tokens")
    return {k: pool_options[k] for k in keys if k in pool_options}  # type: ignore[literal-required]


async def main_process(
    config: PoolConfig,
    workers: int,
    options: ServerOptions,
    pool_options: PoolOptions,
    engines: EngineKinds,
) -> int:
    """Run the server's main process until stopped; returns the exit code (minus a signal's number)."""
    sock = bind(options.host, options.port)
    directory = tempfile.mkdtemp(prefix="lylm-hub-")  # 0700: only this user reaches the hub
    replacements = workers if options.replacements is None else options.replacements
    clients = workers + replacements
    holder: dict[str, Hub] = {}

    async def core_started(name: str, handle: Any) -> None:
        # Called under the instance's GPU start lock: tell the workers, wait for nobody.
        holder["hub"].core_started(name, handle)

    pool_options["engine_factory"] = lambda spec: engines.launch(spec, clients, core_started)
    pool = EnginePool(config, **pool_options)
    hub = holder["hub"] = Hub(pool, address=f"ipc://{directory}/hub")
    supervised: list[Workers] = []
    metrics = PoolMetrics(pool)
    metrics.registry.register(_HubCollector(hub, lambda: supervised[0] if supervised else None))

    def render_metrics() -> bytes:
        responses, hub.responses = hub.responses, {}
        for (route, status), count in responses.items():
            metrics.http_responses.labels(route, status).inc(count)
        return metrics.render()

    hub.handlers["health"] = lambda: health_report(pool)
    hub.handlers["metrics"] = render_metrics
    hub.bind()
    hub.start()
    code = 0
    try:
        async with anyio.create_task_group() as tg:
            stop = anyio.Event()
            received: list[int] = []
            tg.start_soon(_signals, stop, received, supervised)
            instances = sum(len(m.instances) for m in config.models)
            logger.info(
                "starting %d engine core(s) for %d front-end workers (%d spare client slots)",
                instances, workers, replacements,
            )
            with anyio.CancelScope() as startup:
                tg.start_soon(_cancel_when, stop, startup)  # a signal while engines start: stop
                await pool.start()
            if startup.cancelled_caught or stop.is_set():
                tg.cancel_scope.cancel()
                return -received[0] if received else 0
            for instance in pool.instances():  # engine kinds that do not report their start
                if instance.name not in hub.cores:
                    hub.core_started(instance.name, getattr(instance.engine, "handle", None))
            # Importing torch and vLLM left millions of objects that every full collection
            # would walk, stalling every worker's choices: freeze them, as workers do.
            gc.collect()
            gc.freeze()
            context = multiprocessing.get_context("spawn")
            worker_options = _worker_pool_options(pool_options)
            loads = Loads(workers)  # connections per worker: new ones go to the least loaded

            def start(slot: int, client_index: int, identity: bytes) -> Any:
                loads.set(slot, NOT_ACCEPTING)  # until it accepts (a replacement: its predecessor's count)
                settings = _WorkerSettings(
                    slot, client_index, identity, config, hub.address, engines.attach, options, worker_options, loads
                )
                process = context.Process(target=worker_main, args=(settings, sock), name=f"lylm-worker-{slot}")
                process.start()
                return process

            processes = Workers(
                count=workers,
                clients=clients,
                start=start,
                hub=hub,
                silence_timeout=options.worker_timeout,
                gone=lambda slot: loads.set(slot, NOT_ACCEPTING),
            )
            supervised.append(processes)
            processes.start_all()
            none_left = anyio.Event()
            tg.start_soon(processes.watch, none_left)
            tg.start_soon(_announce, hub, options, workers)
            await _first(none_left, stop)
            if none_left.is_set():
                logger.error("no front-end worker is left serving: stopping the server")
                code = 1
            else:
                # Drain: the hub takes no new requests; each worker drains its own.
                logger.info("draining %d workers (at most %g s)", workers, options.drain_timeout)
                await pool.drain(0)
                processes.stop(signal.SIGTERM)
                code = -received[0]
            await processes.join(options.drain_timeout + ENDING_TIMEOUT + LINGER + 10)
            tg.cancel_scope.cancel()
    finally:
        with anyio.CancelScope(shield=True):
            for processes in supervised:
                processes.kill()
            await pool.aclose()
            hub.close()
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
    while hub.ready_count() < workers:
        await anyio.sleep(0.05)
    logger.info("serving on http://%s:%d with %d front-end workers", options.host, options.port, workers)


async def _first(*events: anyio.Event) -> None:
    async with anyio.create_task_group() as tg:
        for event in events:

            async def wait(event: anyio.Event = event) -> None:
                await event.wait()
                tg.cancel_scope.cancel()

            tg.start_soon(wait)


async def _signals(stop: anyio.Event, received: list[int], supervised: list[Workers]) -> None:
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for number in signals:
            received.append(int(number))
            if not stop.is_set():
                stop.set()
                continue
            # A second signal: the workers stop now (their own second signal).
            logger.warning("second signal: stopping now")
            for processes in supervised:
                processes.stop(signal.SIGTERM)


# -- one front-end worker ------------------------------------------------------------


class _WorkerServer(DrainingServer):
    def __init__(self, config: Any, pool: WorkerPool, drain_timeout: float, loads: Loads, slot: int) -> None:
        super().__init__(config, pool, drain_timeout)
        self.worker_pool = pool
        self._loads = loads
        self._slot = slot
        self._acceptor: BalancedAcceptor | None = None

    async def startup(self, sockets: Any = None) -> None:
        await self.worker_pool.hub.connect()  # the hub's welcome: the engine cores to attach to
        # No asyncio server on the shared socket (it would take every waiting connection):
        # the acceptor leaves new connections to the least loaded worker.
        await super().startup(sockets=[])  # the lifespan attaches the pool's engines
        if not self.started or self.should_exit:
            return
        loop = asyncio.get_running_loop()
        config = self.config

        def protocol() -> Any:
            return config.http_protocol_class(  # type: ignore[call-arg]
                config=config, server_state=self.server_state, app_state=self.lifespan.state, _loop=loop
            )

        async def connect(conn: socket.socket) -> None:
            await loop.connect_accepted_socket(protocol, conn)

        for sock in sockets or ():
            sock.listen(config.backlog)
            self._acceptor = BalancedAcceptor(
                sock, self._loads, self._slot, held=lambda: len(self.server_state.connections), connect=connect
            )
            self._acceptor.start()
        self.worker_pool.hub.ready()

    async def shutdown(self, sockets: Any = None) -> None:
        if self._acceptor is not None:
            await self._acceptor.stop()
        await super().shutdown(sockets=sockets)
        await self.worker_pool.hub.close()


def worker_main(settings: _WorkerSettings, sock: socket.socket) -> None:
    """A front-end worker process: connect to the hub, attach to the cores, serve."""
    # Its own process group: a terminal's Ctrl-C reaches the main process alone,
    # which drains every worker with one SIGTERM each.
    os.setpgid(0, 0)
    options = settings.options
    logging.basicConfig(
        level=options.log_level.upper(), format=f"%(levelname)s %(name)s[w{settings.slot}]: %(message)s"
    )
    hub = HubClient(settings.hub_address, slot=settings.slot, client_index=settings.client_index, identity=settings.identity)
    pool = WorkerPool(
        settings.config,
        hub=hub,
        attach=lambda spec, handle: settings.attach(spec, handle, settings.client_index),
        **settings.pool_options,
    )
    uv = _uvicorn_config(_app(pool, options, HubMonitor(pool)), options)
    # uvicorn's run(): its event loop (uvloop where installed), as a one-process server has.
    server = _WorkerServer(uv, pool, options.drain_timeout, settings.loads, settings.slot)
    server.run(sockets=[sock])
    if server.startup_error is not None:  # the main process sees this worker exit, and why in its log
        raise server.startup_error

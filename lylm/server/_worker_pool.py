"""A front-end worker's pool: engines attached to shared engine cores, choices made by the hub.

Each of a server's front-end workers runs one :class:`WorkerPool`. Its engines are
front ends (vLLM ``AsyncLLM`` clients) attached to engine cores that the main process
launched; every request renders and streams here, in the worker, but its instance is
chosen by the hub (:mod:`._hub`), which sees every worker's requests: admission,
balancers and prefix tables are pool-wide. The worker books its own share locally too
(its engines' health and retries use that) and the hub client (:mod:`._hub_client`)
reports each request's account to the hub.

Engine cores are restarted by the main process, which announces each new core with a
generation number; the worker attaches to the newest one (one attach at a time per
instance) and says so only once attached, and the hub offers it the instance from then on.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from .._balancer import Balancer
from .._books import Books, Tally
from .._config import EngineSpec, PoolConfig
from .._engine import Engine, EngineSignals
from .._exceptions import LylmError, NoHealthyEngineError
from .._instance import Instance
from .._pool import EnginePool
from .._request import RequestEnd, RequestInfo
from ._hub_client import HubClient

logger = logging.getLogger("lylm")

AttachEngine = Callable[[EngineSpec, Any], Engine]
"""Builds an engine attached to an engine core, from the instance's spec and the core's handle."""

_SINGLE = "needs a single front-end process (--workers 1)"

#: Seconds between attempts to attach to a new engine core, and how many attempts.
ATTACH_BACKOFF = 1.0
ATTACH_ATTEMPTS = 5


class _HubBooks(Books):
    """The worker's books, which also tell the hub about each booking's request."""

    def __init__(self, *, hub: HubClient, engine_died: Callable[[Instance, str], None]) -> None:
        super().__init__(clock=time.monotonic, engine_died=engine_died)
        self._hub = hub

    def begin(self, tally: Tally) -> None:
        super().begin(tally)
        self._hub.hold(tally.ticket, tally)

    def end(self, tally: Tally, end: RequestEnd, balancer: Balancer) -> None:
        super().end(tally, end, balancer)
        # Whatever the local books did: the hub's booking ends (once; repeats are ignored).
        self._hub.end(tally.ticket, end)


class WorkerPool(EnginePool):
    """The pool of one front-end worker (see the module docstring).

    ``hub`` must be connected (its welcome holds the engine cores' handles);
    ``attach(spec, handle)`` builds the engine attached to a core. Engines are not
    restarted here: the main process restarts engine cores and the worker re-attaches.
    Runtime membership changes and shadows are the main process's business: they raise
    :class:`LylmError`.
    """

    _subscribes_to_kv_events = False  # the hub chooses, with the main process's KV index

    def __init__(self, config: PoolConfig, *, hub: HubClient, attach: AttachEngine, **options: Any) -> None:
        self._hub = hub
        self._attach = attach
        #: Per instance, the generation of the core its engine is (being) attached to.
        self._generations: dict[str, int] = {}
        self._building: dict[str, int] = {}
        self._attaching: dict[str, asyncio.Task[None]] = {}
        super().__init__(config, engine_factory=self._attached_engine, restart=None, **options)
        self._books = _HubBooks(hub=hub, engine_died=self._supervisor.engine_failed)
        self._supervisor.on_failed = self._engine_failed
        hub.on_attach = self._on_attach
        hub.signals = self._signals
        # Per instance: the engine signals last reported (each engine has its own object) and their values.
        self._signals_seen: dict[str, tuple[EngineSignals, tuple[Any, ...]]] = {}

    @property
    def hub(self) -> HubClient:
        """This worker's connection to the hub."""
        return self._hub

    def _attached_engine(self, spec: EngineSpec) -> Engine:
        generation, handle = self._hub.cores[spec.name]
        self._building[spec.name] = generation
        return self._attach(spec, handle)

    async def start(self) -> None:
        """Attach to every engine core the hub announced; tell the hub which generations.
        Once started, a no-op (the server starts the pool, then its lifespan would again)."""
        if self._state == "running":
            return
        await super().start()
        for instance in self._members.all():
            generation = self._building.get(instance.name, 0)
            self._generations[instance.name] = generation
            self._hub.attached(instance.name, generation)
            if self._hub.cores[instance.name][0] > generation:  # replaced while this worker started
                self._reattach_soon(instance.name)

    async def aclose(self) -> None:
        for task in list(self._attaching.values()):
            task.cancel()
        await super().aclose()

    # -- one request's dispatch, asked of the hub -------------------------------

    def _prepare(self, request: RequestInfo) -> RequestInfo:
        return self._hub.prepare(request)

    async def _choose(self, group: list[Instance], request: RequestInfo, tried: Sequence[Instance]) -> Tally:
        exclude = [i.name for i in tried]
        first = not tried
        while True:
            booking, name = await self._hub.choose(request, exclude, first)
            first = False
            for instance in group:
                if instance.name == name and instance.healthy:
                    return Tally(instance, request, booking)
            # Chosen by the hub but not usable here (this worker saw its engine die
            # before the hub did): bounced back, and asked again without it.
            self._hub.end(booking, RequestEnd("bounced", request.token_budget))
            exclude.append(name)
            if len(exclude) > len(group):
                raise NoHealthyEngineError(request.model)

    # -- engine cores replaced -------------------------------------------------

    def _on_attach(self, name: str, generation: int, handle: Any) -> None:
        if generation <= self._generations.get(name, 0):
            self._hub.attached(name, self._generations[name])  # already there: say so again
            return
        if self._state == "running":
            self._reattach_soon(name)
        # Before start, start() itself attaches to the newest core.

    def _reattach_soon(self, name: str) -> None:
        task = self._attaching.get(name)
        if task is None or task.done():
            self._attaching[name] = asyncio.get_running_loop().create_task(
                self._reattach(name), name=f"lylm-attach {name}"
            )
        # A running attach looks again at the newest generation once it is done.

    async def _reattach(self, name: str) -> None:
        instance = self._members.find(name)
        attempt = 0
        while self._hub.cores[name][0] > self._generations.get(name, 0):
            if instance.state == "healthy":
                # This worker has not noticed the old core's death yet: it has now.
                self._supervisor.engine_failed(instance, "its engine core was replaced")
            if not instance.mark_restarting():
                return  # stopped meanwhile
            try:
                engine = await self._starter.start_engine(instance.spec)
            except Exception as exc:
                generation = self._building.get(name, 0)
                instance.restart_failed(f"attaching to the new engine core failed: {exc}")
                attempt += 1
                logger.warning("%s: attaching to engine core %d failed (attempt %d): %s", name, generation, attempt, exc)
                if attempt >= ATTACH_ATTEMPTS:
                    self._hub.attached(name, generation, str(exc))
                    return
                await asyncio.sleep(ATTACH_BACKOFF)
                continue
            if not instance.replace_engine(engine):
                await engine.shutdown()
                return
            attempt = 0
            self._generations[name] = self._building[name]
            self._hub.attached(name, self._generations[name])

    def _engine_failed(self, instance: Instance, reason: str) -> None:
        # Tell the hub at once (the same detection time as one process): it takes the
        # instance out of every worker's choices and restarts the core.
        try:
            self._hub.died(instance.name, self._generations.get(instance.name, 0), reason)
        except LylmError:
            logger.warning("%s: could not tell the hub its engine failed", instance.name)

    # -- what the hub hears besides requests --------------------------------------

    def _signals(self) -> dict[str, tuple[Any, ...]]:
        """Per instance whose engine reported new signals: running, waiting, KV use, and
        prefix-cache queries and hits since the last call."""
        out: dict[str, tuple[Any, ...]] = {}
        for instance in self._members.all():
            s = instance.engine.signals
            current = (s.running, s.waiting, s.kv_cache_usage, s.prefix_cache_queries, s.prefix_cache_hits)
            seen = self._signals_seen.get(instance.name)
            if seen is not None and seen[0] is s:
                previous = seen[1]
            else:  # a new engine (re-attached): its counters start from zero
                previous = (None, None, None, 0, 0)
            if current == previous:
                continue
            self._signals_seen[instance.name] = (s, current)
            out[instance.name] = (*current[:3], current[3] - previous[3], current[4] - previous[4])
        return out

    # -- what a worker cannot do on its own ------------------------------------

    async def add_instance(self, model: str, **kwargs: Any) -> Instance:
        raise LylmError(f"add_instance {_SINGLE}")

    async def drain_instance(self, instance: Instance | str, *, timeout: float | None = None) -> bool:
        raise LylmError(f"drain_instance {_SINGLE}")

    async def remove_instance(self, instance: Instance | str) -> None:
        raise LylmError(f"remove_instance {_SINGLE}")

    def add_shadow(self, model: str, balancer: Any, **kwargs: Any) -> None:
        raise LylmError(f"shadow balancers {_SINGLE}")

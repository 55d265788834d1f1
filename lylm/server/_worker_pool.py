"""A front-end worker's pool: engines attached to shared engine cores, choices made by the hub.

Each of a server's N front-end workers runs one :class:`WorkerPool`. Its engines
are front ends (vLLM ``AsyncLLM`` clients) attached to engine cores that the main
process launched; every request renders and streams here, in the worker, but its
instance is chosen by the hub (:mod:`lylm.server._hub`), which sees every worker's
requests: admission, balancers, prefix tables and shadows are pool-wide. The
worker books its own share locally too (that is what its engines' health and
retries use) and reports each request's end and its token progress to the hub.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from .._balancer import Balancer
from .._books import Books
from .._config import EngineSpec, PoolConfig
from .._engine import Engine, EngineSignals
from .._exceptions import LylmError, NoHealthyEngineError
from ._hub import HubClient, Progress
from .._instance import Instance, Outcome
from .._pool import EnginePool
from .._request import RequestInfo

AttachEngine = Callable[[EngineSpec, Any], Engine]
"""Builds an engine attached to an engine core, from the instance's spec and the core's handle."""

_SINGLE = "needs a single front-end process (--workers 1)"


class _HubBooks(Books):
    """The worker's books, which also tell the hub how each request ended."""

    def __init__(self, *, hub: HubClient, engine_died: Callable[[Instance, str], None]) -> None:
        super().__init__(clock=time.monotonic, engine_died=engine_died)
        self._hub = hub
        #: Per instance name: token budgets booked at dispatch, and left over at the end.
        self.begun: dict[str, int] = {}
        self.left: dict[str, int] = {}

    def begin(self, instance: Instance, request: RequestInfo) -> None:
        super().begin(instance, request)
        self.begun[instance.name] = self.begun.get(instance.name, 0) + request.token_budget

    def end(
        self,
        instance: Instance,
        request: RequestInfo,
        outcome: Outcome,
        *,
        remaining: int,
        first_token: float | None,
        latency: float,
        generated: int,
        balancer: Balancer,
    ) -> None:
        super().end(
            instance,
            request,
            outcome,
            remaining=remaining,
            first_token=first_token,
            latency=latency,
            generated=generated,
            balancer=balancer,
        )
        self.left[instance.name] = self.left.get(instance.name, 0) + remaining
        self._hub.ended(request.request_id, instance.name, outcome, remaining, first_token, latency, generated)


class WorkerPool(EnginePool):
    """The pool of one front-end worker (see the module docstring).

    ``handles`` maps each instance name to its engine core's handle;
    ``attach(spec, handle)`` builds the engine attached to it. Engines are not
    restarted here: when the hub restarts an engine core it sends the new
    handle, and :meth:`reattach` attaches to it. Runtime membership changes and
    shadows are the main process's business: they raise :class:`LylmError`.
    """

    def __init__(
        self,
        config: PoolConfig,
        *,
        hub: HubClient,
        attach: AttachEngine,
        handles: Mapping[str, Any],
        **options: Any,
    ) -> None:
        self._handles = dict(handles)
        self._attach = attach
        super().__init__(
            config,
            engine_factory=lambda spec: attach(spec, self._handles[spec.name]),
            restart=None,
            **options,
        )
        self._hub = hub
        self._books = self._hub_books = _HubBooks(hub=hub, engine_died=self._supervisor.engine_failed)
        hub.on_attach = self.reattach
        hub.progress = self._progress
        self._reported: dict[str, tuple[int, int, int]] = {}
        # Per instance: the engine signals last reported (each engine has its own object) and their values.
        self._signals_seen: dict[str, tuple[EngineSignals, tuple[Any, ...]]] = {}

    @property
    def hub(self) -> HubClient:
        """This worker's connection to the hub."""
        return self._hub

    async def _choose(self, group: list[Instance], request: RequestInfo, tried: Sequence[Instance]) -> Instance:
        exclude = [i.name for i in tried]
        first = not tried
        by_name = {i.name: i for i in group}
        while True:
            name = await self._hub.choose(request, exclude, first)
            first = False
            instance = by_name.get(name)
            if instance is not None and instance.healthy:
                return instance
            # Chosen by the hub but not usable here yet (this worker is still attaching
            # to a restarted engine core): end it at the hub and ask again without it.
            self._hub.ended(request.request_id, name, "failed", request.token_budget, None, 0.0, 0)
            exclude.append(name)
            if len(exclude) > len(group):
                raise NoHealthyEngineError(request.model)

    async def reattach(self, name: str, handle: Any) -> None:
        """Attach ``name``'s instance to its restarted engine core (``handle``)."""
        instance = self._members.find(name)
        self._handles[name] = handle
        if instance.state == "healthy":
            # This worker has not noticed the old core's death yet: it has now.
            self._supervisor.engine_failed(instance, "its engine core was replaced")
        if not instance.mark_restarting():
            return
        try:
            engine = await self._starter.start_engine(instance.spec)
        except Exception as exc:
            instance.restart_failed(f"attaching to the new engine core failed: {exc}")
            raise
        if not instance.replace_engine(engine):
            await engine.shutdown()

    def _progress(self) -> Progress:
        """Per instance, what changed since the last call: tokens done, prompt and
        generated tokens, and the engine's signals when it reported new ones."""
        out: dict[str, tuple[int, int, int, Any]] = {}
        books = self._hub_books
        for instance in self._members.all():
            name = instance.name
            done_total = books.begun.get(name, 0) - books.left.get(name, 0) - instance.in_flight_tokens
            now = (done_total, instance.prompt_tokens, instance.generated_tokens)
            last = self._reported.get(name, (0, 0, 0))
            signals = self._signal_delta(name, instance.engine)
            if now != last or signals is not None:
                self._reported[name] = now
                out[name] = (now[0] - last[0], now[1] - last[1], now[2] - last[2], signals)
        return out

    def _signal_delta(self, name: str, engine: Engine) -> tuple[Any, ...] | None:
        s = engine.signals
        current = (s.running, s.waiting, s.kv_cache_usage, s.prefix_cache_queries, s.prefix_cache_hits)
        seen = self._signals_seen.get(name)
        if seen is not None and seen[0] is s:
            previous = seen[1]
        else:  # a new engine (re-attached): its counters start from zero
            previous = (None, None, None, 0, 0)
        if current == previous:
            return None
        self._signals_seen[name] = (s, current)
        return (current[0], current[1], current[2], current[3] - previous[3], current[4] - previous[4])

    # -- what a worker cannot do on its own ------------------------------------

    async def add_instance(self, model: str, **kwargs: Any) -> Instance:
        raise LylmError(f"add_instance {_SINGLE}")

    async def drain_instance(self, instance: Instance | str, *, timeout: float | None = None) -> bool:
        raise LylmError(f"drain_instance {_SINGLE}")

    async def remove_instance(self, instance: Instance | str) -> None:
        raise LylmError(f"remove_instance {_SINGLE}")

    def add_shadow(self, model: str, balancer: Any, **kwargs: Any) -> None:
        raise LylmError(f"shadow balancers {_SINGLE}")


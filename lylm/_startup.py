"""Starting engines: side by side where their GPUs allow, with progress in the log.

Every engine start in a pool goes through one :class:`Starter`: the pool's own
start, :meth:`EnginePool.add_instance` and the supervisor's restarts. It holds
the per-GPU start locks (:class:`StartLocks`) around each start, so engines that
share a GPU never profile its memory at the same time, whichever path started
them.

A remote instance whose engine core does not connect in time (:func:`core_absent`)
does not fail the pool's start: the rest starts, and the instance is handed back as
:class:`Absent`, for the supervisor to keep waiting for.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence

import anyio
import attrs

from ._config import EngineSpec
from ._engine import Engine
from ._exceptions import EngineStartError, LylmError
from .engines._placement import StartLocks

logger = logging.getLogger("lylm")

PROGRESS_INTERVAL = 15.0
"""Seconds between "still starting" log lines while engines start (real models take minutes)."""


@attrs.frozen
class StartProgress:
    """One engine start in progress: which instance, since when, and what it waits for."""

    instance: str
    gpu_ids: tuple[int, ...]
    elapsed: float
    waiting_for: tuple[str, ...]  # instances holding a GPU it needs; empty once it starts

    def describe(self) -> str:
        """``models["m"][1] on GPU 2: starting, 41 s`` or ``...: waiting for models["m"][0], 41 s``."""
        what = f"waiting for {', '.join(self.waiting_for)}" if self.waiting_for else "starting"
        return f"{self.instance}{_where(self.gpu_ids)}: {what}, {self.elapsed:.0f} s"


@attrs.frozen
class Absent:
    """A remote instance whose engine core did not connect while the pool started."""

    engine: Engine  # the start's engine, shut down
    error: EngineStartError


def core_absent(spec: EngineSpec, exc: BaseException) -> bool:
    """True when ``exc`` says that a remote instance's core did not connect in time, or
    connected and went away before it was ready (its host's business, not a fault of
    the pool's own)."""
    return (
        spec.remote is not None
        and isinstance(exc, EngineStartError)
        and isinstance(exc.__cause__, (TimeoutError, ConnectionError))
    )


def _where(gpu_ids: tuple[int, ...]) -> str:
    if not gpu_ids:
        return ""
    return f" on GPU{'s' if len(gpu_ids) > 1 else ''} {', '.join(map(str, gpu_ids))}"


class Starter:
    """Starts engines for a pool under its per-GPU start locks (used by :class:`EnginePool`)."""

    def __init__(
        self,
        factory: Callable[[EngineSpec], Engine],
        *,
        clock: Callable[[], float] = time.monotonic,
        progress_interval: float = PROGRESS_INTERVAL,
    ) -> None:
        self._factory = factory
        self._clock = clock
        self._progress_interval = progress_interval
        self.locks = StartLocks()
        self._active: dict[str, tuple[EngineSpec, float]] = {}

    def progress(self) -> list[StartProgress]:
        """The engine starts in progress now."""
        now = self._clock()
        return [
            StartProgress(name, spec.gpu_ids, now - since, tuple(self.locks.blockers(name)))
            for name, (spec, since) in self._active.items()
        ]

    async def start_engine(
        self,
        spec: EngineSpec,
        engine: Engine | None = None,
        on_failure: Callable[[], None] | None = None,
        *,
        validated: bool = False,
    ) -> Engine:
        """Start ``engine`` (by default a new one for ``spec``) once its GPUs are free.

        On failure the engine is shut down and :class:`EngineStartError` names the
        instance (a :class:`LylmError` such as a ConfigError passes unchanged).
        ``on_failure`` runs first, before the start's GPUs are handed on: a pool's start
        cancels the starts queued behind it there, so none of them begins. Unless
        ``validated``, the engine's :meth:`~lylm.Engine.validate` runs first.
        """
        if engine is None:
            engine = self._factory(spec)
        if not validated:
            engine.precheck()
            await anyio.to_thread.run_sync(engine.validate)
        self._active[spec.name] = (spec, self._clock())
        try:
            async with self.locks.hold(spec.gpu_ids, spec.name):
                began = self._clock()
                logger.info("%s: starting its engine%s", spec.name, _where(spec.gpu_ids))
                await engine.start()
            logger.info("%s: engine ready in %.1f s", spec.name, self._clock() - began)
        except BaseException as exc:
            if on_failure is not None and not isinstance(exc, anyio.get_cancelled_exc_class()):
                on_failure()
            with anyio.CancelScope(shield=True):
                await engine.shutdown()
            if isinstance(exc, Exception) and not isinstance(exc, LylmError):
                raise EngineStartError(spec.name, f"{type(exc).__name__}: {exc}") from exc
            raise
        finally:
            del self._active[spec.name]
        return engine

    async def start_all(self, specs: Sequence[EngineSpec]) -> list[Engine | Absent]:
        """Start an engine for each spec, side by side where their GPUs are disjoint.

        Returns the engines in ``specs`` order; a remote instance whose core did not
        connect within its timeout is returned as :class:`Absent` (the rest still
        start). If any other start fails, the others are stopped (a start already
        under way is let finish, then shut down) and the first failure in ``specs``
        order is raised.
        """
        engines: dict[int, Engine | Absent] = {}
        errors: dict[int, Exception] = {}
        began = self._clock()
        # Every instance's configuration is checked before any engine starts: a mistake in
        # the last instance must not cost the first one's start (minutes on a real model).
        made = [self._factory(spec) for spec in specs]
        for engine in made:
            engine.precheck()
        for engine in made:
            await anyio.to_thread.run_sync(engine.validate)

        async def one(index: int, spec: EngineSpec, scope: anyio.CancelScope) -> None:
            engine = made[index]
            try:
                engines[index] = await self.start_engine(spec, engine, scope.cancel, validated=True)
            except Exception as exc:
                if isinstance(exc, EngineStartError) and core_absent(spec, exc):
                    logger.warning("%s: the pool starts without it: %s", spec.name, exc)
                    engines[index] = Absent(engine, exc)
                    return
                errors[index] = exc
                scope.cancel()

        try:
            async with anyio.create_task_group() as progress:
                progress.start_soon(self._log_progress, len(specs), began, engines)
                async with anyio.create_task_group() as starts:
                    for index, spec in enumerate(specs):
                        starts.start_soon(one, index, spec, starts.cancel_scope)
                progress.cancel_scope.cancel()
        finally:
            if errors or len(engines) < len(specs):
                with anyio.CancelScope(shield=True):
                    for index in sorted(engines, reverse=True):
                        started = engines[index]
                        if not isinstance(started, Absent):
                            await started.shutdown()
        if errors:
            raise errors[min(errors)]
        if len(specs) > 1:
            absent = sum(isinstance(e, Absent) for e in engines.values())
            logger.info(
                "%d engines ready in %.1f s%s",
                len(specs) - absent,
                self._clock() - began,
                f" ({absent} remote not connected)" if absent else "",
            )
        return [engines[i] for i in range(len(specs))]

    async def _log_progress(self, total: int, began: float, ready: Mapping[int, Engine | Absent]) -> None:
        while True:
            await anyio.sleep(self._progress_interval)
            starting = self.progress()
            logger.info(
                "starting engines (%d of %d ready after %.0f s): %s",
                sum(not isinstance(e, Absent) for e in ready.values()),
                total,
                self._clock() - began,
                "; ".join(p.describe() for p in starting),
            )

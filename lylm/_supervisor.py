"""Supervision: notice failed engines, take them out of balancing, restart them.

The pool owns one :class:`Supervisor`. It polls every instance's engine health
(``Engine.healthy``, a cheap flag: vLLM flips its ``errored`` flag the moment its
engine process exits) and is also told directly when a request sees the engine
die. A failed instance goes ``dead``: balancers no longer see it, its engine is
shut down (which fails the requests it still holds, so none hangs), and, under a
:class:`RestartPolicy`, a new engine is started in its place after an
exponential backoff, until it serves again (``healthy``) or the attempts run out.
A remote instance's restart that times out waiting for its core is not counted as
a failed attempt: the pool waits for a remote core as long as it runs.

Background work runs as asyncio tasks rather than in a task group, so that a
pool started in one task (an app's lifespan, a test fixture) may be closed in
another. vLLM is asyncio-only, and so is the pool.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from typing import Any

import anyio
import attrs

from ._config import EngineSpec
from ._engine import Engine
from ._instance import Instance
from ._startup import core_absent

logger = logging.getLogger("lylm")


def _positive(instance: object, attribute: "attrs.Attribute[Any]", value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{attribute.name} must be a positive number (got {value!r})")


def _fraction(instance: object, attribute: "attrs.Attribute[Any]", value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ValueError(f"{attribute.name} must be a number from 0 to 1 (got {value!r})")


def _attempts(instance: object, attribute: "attrs.Attribute[Any]", value: Any) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{attribute.name} must be a positive integer or None (got {value!r})")


@attrs.frozen(kw_only=True)
class RestartPolicy:
    """How the pool restarts a failed engine: exponential backoff with jitter, bounded.

    The n-th consecutive attempt (0-based) waits ``min(initial_backoff *
    multiplier**n, max_backoff)`` seconds first, less a random share of up to
    ``jitter`` of it, so that engines that died together (a GPU fault, an OOM
    kill) do not all restart in the same instant. After ``max_attempts`` failed
    starts in a row the instance stays ``dead`` (``None``: never give up). A
    restart that succeeds resets the count.
    """

    initial_backoff: float = attrs.field(default=1.0, validator=_positive)
    max_backoff: float = attrs.field(default=30.0, validator=_positive)
    multiplier: float = attrs.field(default=2.0, validator=_positive)
    max_attempts: int | None = attrs.field(default=10, validator=_attempts)
    jitter: float = attrs.field(default=0.2, validator=_fraction)

    def backoff(self, attempt: int, rng: random.Random | None = None) -> float:
        """Seconds to wait before attempt ``attempt`` (0-based); jittered when given an ``rng``."""
        delay = float(min(self.initial_backoff * self.multiplier**attempt, self.max_backoff))
        if rng is None or not self.jitter:
            return delay
        return delay * (1.0 - self.jitter * rng.random())


class Supervisor:
    """Watches a pool's instances and restarts failed engines (used by :class:`EnginePool`)."""

    def __init__(
        self,
        *,
        instances: Callable[[], Iterable[Instance]],
        start_engine: Callable[[EngineSpec], Awaitable[Engine]],
        policy: RestartPolicy | None,
        interval: float,
        rng: random.Random | None = None,
    ) -> None:
        self._instances = instances
        self._rng = rng if rng is not None else random.Random()
        self._start_engine = start_engine
        self._policy = policy
        self._interval = interval
        self._watcher: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        #: Called with each instance found failed (after it left balancing), if set.
        self.on_failed: Callable[[Instance, str], None] | None = None
        #: When each dead instance was noticed (monotonic), for the restart log line.
        self._died_at: dict[int, float] = {}

    def start(self) -> None:
        """Begin polling engine health."""
        if self._watcher is None:
            self._watcher = asyncio.get_running_loop().create_task(self._watch(), name="lylm-health")

    async def aclose(self) -> None:
        """Stop polling and cancel restarts in progress (their half-started engines are shut down)."""
        tasks = list(self._tasks)
        if self._watcher is not None:
            tasks.append(self._watcher)
            self._watcher = None
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            for instance in list(self._instances()):
                if instance.state not in ("healthy", "draining"):
                    continue
                try:
                    instance.engine.check()
                except Exception:
                    logger.exception("%s: the engine's health check raised", instance.name)
                if not instance.engine.healthy:
                    reason = instance.engine.failure_reason() or "the engine reports itself unhealthy"
                    self.engine_failed(instance, reason)

    def _spawn(self, work: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.get_running_loop().create_task(work, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def engine_failed(self, instance: Instance, reason: str) -> None:
        """Take a failed instance out of balancing; restart it if the policy says so.

        Safe to call many times: only the first call for one failure acts.
        """
        # A draining instance is on its way out: it is not brought back.
        restart = self._policy is not None and instance.state == "healthy"
        if not instance.mark_dead(reason):
            return
        self._died_at[id(instance)] = time.monotonic()
        logger.warning(
            "%s: engine failed (%s); taken out of balancing with %d request(s) in flight%s",
            instance.name,
            reason,
            instance.in_flight_requests,
            "; restarting" if restart else "",
        )
        if self.on_failed is not None:
            try:
                self.on_failed(instance, reason)
            except Exception:
                logger.exception("%s: telling of the failure raised", instance.name)
        self._spawn(self._recover(instance, instance.engine, restart), f"lylm-recover {instance.name}")

    def wait_for_core(self, instance: Instance, reason: str) -> None:
        """A remote instance whose core did not connect while the pool started: listed
        dead, and (under a restart policy) waited for like a dead engine's restart."""
        if not instance.mark_not_started(reason):
            return
        self._died_at[id(instance)] = time.monotonic()
        restart = self._policy is not None
        if restart:
            logger.warning("%s: waiting for its engine core to connect", instance.name)
        self._spawn(self._recover(instance, instance.engine, restart), f"lylm-recover {instance.name}")

    async def _recover(self, instance: Instance, failed: Engine, restart: bool) -> None:
        # Shutting the dead engine down fails the requests it still holds (and
        # reaps its processes) instead of leaving them to wait for it. The engine
        # that failed, not whatever the instance holds when this task runs.
        with anyio.CancelScope(shield=True):
            try:
                await failed.shutdown()
            except Exception:
                logger.exception("%s: shutting the failed engine down raised", instance.name)
        if not restart or self._policy is None:
            return
        policy = self._policy
        attempt = 0
        while policy.max_attempts is None or attempt < policy.max_attempts:
            await asyncio.sleep(policy.backoff(attempt, self._rng))
            if not instance.mark_restarting():  # removed meanwhile
                return
            try:
                # Under the pool's per-GPU start locks, like every other engine start.
                engine = await self._start_engine(instance.spec)
            except Exception as exc:
                if not instance.restart_failed(f"restart failed: {exc}"):
                    return
                if core_absent(instance.spec, exc):
                    # A remote core not (yet) back: its host's business, not a failed
                    # start; the pool keeps waiting, one remote.timeout at a time.
                    logger.warning("%s: still waiting: %s", instance.name, exc)
                    continue
                attempt += 1
                logger.warning("%s: restart attempt %d failed: %s", instance.name, attempt, exc)
                continue
            if not instance.replace_engine(engine):  # removed while it started
                with anyio.CancelScope(shield=True):
                    await engine.shutdown()
                return
            down = time.monotonic() - self._died_at.pop(id(instance), time.monotonic())
            logger.warning("%s: restarted; serving again after %.1f s", instance.name, down)
            return
        logger.error("%s: giving up after %d failed restarts; it stays dead", instance.name, attempt)

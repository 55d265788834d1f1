"""Membership: which instances each model has, and adding or removing them at runtime.

One :class:`Membership` per pool owns the lists of instances by model; nothing
else adds to or removes from them. Starting an engine goes through the pool's
:class:`Starter` (its per-GPU start locks), whether at pool start or later.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import anyio

from ._config import EngineSpec, PoolConfig, instance_spec
from ._engine import Engine
from ._instance import Instance
from ._startup import Absent, Starter

logger = logging.getLogger("lylm")


class Membership:
    """The instances of every model, in the order they joined."""

    def __init__(self, config: PoolConfig, *, starter: Starter, factory: Callable[[EngineSpec], Engine]) -> None:
        self._config = config
        self._starter = starter
        self._factory = factory
        self._groups: dict[str, list[Instance]] = {m.name: [] for m in config.models}
        self._next_index: dict[str, int] = {m.name: len(m.instances) for m in config.models}

    def adopt(self, specs: Sequence[EngineSpec], engines: Sequence[Engine | Absent]) -> list[tuple[Instance, str]]:
        """Add the configured instances, their engines started. Returns those whose remote
        core did not connect (listed as ``starting``), with why, for the supervisor."""
        absent: list[tuple[Instance, str]] = []
        for spec, engine in zip(specs, engines):
            if isinstance(engine, Absent):
                instance = Instance(spec, engine.engine, state="starting")
                absent.append((instance, str(engine.error)))
            else:
                instance = Instance(spec, engine)
            self._groups[spec.model].append(instance)
        return absent

    def all(self) -> tuple[Instance, ...]:
        """Every instance of every model."""
        return tuple(i for group in self._groups.values() for i in group)

    def group(self, model: str) -> list[Instance]:
        """``model``'s instances (the live list: the pool's dispatch reads it per request)."""
        return self._groups[model]

    def find(self, instance: Instance | str) -> Instance:
        """An instance of the pool, given as itself or by name (``'models["m"][1]'``)."""
        for candidate in self.all():
            if candidate is instance or candidate.name == instance:
                return candidate
        raise LookupError(f"no instance {instance!r} in the pool")

    async def add(
        self,
        model: str,
        *,
        engine_args: Mapping[str, Any] | None,
        gpu_ids: Sequence[int],
        weight: float,
    ) -> Instance:
        """See :meth:`EnginePool.add_instance`."""
        group = self._groups[model]
        if engine_args is None:
            engine_args = self._config.model(model).instances[0].engine_args
        index = self._next_index[model]
        spec = instance_spec(
            model,
            {"devices": {"gpu_ids": list(gpu_ids), "weight": weight}, "engine_args": dict(engine_args)},
            index=index,
        )
        self._next_index[model] = index + 1
        # Listed (as 'starting') while its engine starts, so /health shows it.
        instance = Instance(spec, self._factory(spec), state="starting")
        group.append(instance)
        try:
            await self._starter.start_engine(spec, instance.engine)
        except BaseException:
            if instance in group:
                group.remove(instance)
            instance.mark_stopped()
            raise
        instance.mark_healthy()  # unless drained or removed while it started
        return instance

    async def drain(self, instance: Instance | str, *, timeout: float | None) -> bool:
        """See :meth:`EnginePool.drain_instance`."""
        target = self.find(instance)
        target.mark_draining()
        with anyio.move_on_after(timeout):
            while target.in_flight_requests and target.state == "draining":
                await anyio.sleep(0.05)
        clean = target.in_flight_requests == 0
        group = self._groups.get(target.model, [])
        if target in group:
            group.remove(target)
        target.mark_stopped()
        with anyio.CancelScope(shield=True):
            await target.engine.shutdown()
        return clean

    async def stop_all(self) -> None:
        """Stop every instance's engine, all at once (the pool is closing): each engine's
        shutdown waits on its own processes, so one after another took the sum of them."""
        with anyio.CancelScope(shield=True):
            async with anyio.create_task_group() as stops:
                for instance in reversed(self.all()):
                    instance.mark_stopped()
                    stops.start_soon(_stop, instance)


async def _stop(instance: Instance) -> None:
    # One engine's failing shutdown must not cut the others' short.
    try:
        await instance.engine.shutdown()
    except Exception:
        logger.exception("%s: its engine's shutdown failed", instance.name)

"""How a :class:`~._local.VLLMEngine`'s front end reaches its engine core: three strategies.

A vLLM engine is a front end (``AsyncLLM``: rendering, detokenizing, the request
streams) and an engine core (scheduler, model, KV cache) in other processes. What
differs between lylm's engines is only who starts the core and how its death is seen:

* :class:`OwnCore`: the engine starts its core through the launcher, for itself alone,
  and stops it at shutdown (an instance of a single-process pool).
* :class:`SharedCore`: the core was launched for several front ends (``lylm serve``'s
  workers, :class:`~._cores.EngineCores`); the engine attaches as one of its clients and
  stops only its front end.
* :class:`~._remote.RemoteLink`: the core runs on another host and attaches over TCP.

In all three the front end is an ``AsyncLLM`` attached to its core, and vLLM's front end
does not notice its core dying: :meth:`CoreLink.lost`, called by the pool's health
poll, does.
"""

from __future__ import annotations

from typing import Any, Protocol

import anyio

from .._config import EngineSpec
from ._cores import EngineCores
from ._launcher import LAUNCHER, StartGuard, stop_processes


class CoreLink(Protocol):
    """One engine's hold on its engine core."""

    async def open(self, engine_args: dict[str, Any], stat_loggers: list[Any] | None) -> Any:
        """Start or reach the core; return a front end (``AsyncLLM``) attached to it."""
        ...

    def lost(self) -> str | None:
        """Why the core is gone, once it is (from the health poll: cheap, never blocks)."""
        ...

    async def close(self) -> None:
        """A shutdown, possibly during :meth:`open`: end a start under way (before the
        front end shuts down)."""
        ...

    async def release(self) -> None:
        """After the front end shut down: stop what this link started."""
        ...

    def process_ids(self) -> list[int]:
        """The engine core's processes on this host (empty for a remote core)."""
        ...


class OwnCore:
    """The engine's own core, started through the launcher for one front end."""

    def __init__(self, spec: EngineSpec) -> None:
        self.spec = spec
        self._guard = StartGuard(spec.name)
        self.cores: EngineCores | None = None

    async def open(self, engine_args: dict[str, Any], stat_loggers: list[Any] | None) -> Any:
        spec, guard = self.spec, self._guard
        cores: EngineCores = await anyio.to_thread.run_sync(
            lambda: LAUNCHER.launch(
                engine_args, gpu_ids=spec.gpu_ids, path=f"{spec.name}.devices.gpu_ids", clients=1, guard=guard
            )
        )
        self.cores = cores
        return await anyio.to_thread.run_sync(lambda: cores.client(0, stat_loggers=stat_loggers))

    def lost(self) -> str | None:
        return None if self.cores is None or self.cores.alive() else self.cores.failure()

    async def close(self) -> None:
        await anyio.to_thread.run_sync(stop_processes, self._guard.close())

    async def release(self) -> None:
        cores, self.cores = self.cores, None
        if cores is not None:
            await anyio.to_thread.run_sync(cores.shutdown)

    def process_ids(self) -> list[int]:
        return self.cores.process_ids() if self.cores is not None else []


class SharedCore:
    """A core launched for several front ends elsewhere (its owner stops it); this engine
    is its client ``index``."""

    def __init__(self, cores: EngineCores, index: int) -> None:
        if not 0 <= index < cores.clients:
            raise ValueError(f"client_index must be in [0, {cores.clients}) (got {index})")
        self.cores = cores
        self.index = index

    async def open(self, engine_args: dict[str, Any], stat_loggers: list[Any] | None) -> Any:
        return await anyio.to_thread.run_sync(lambda: self.cores.client(self.index, stat_loggers=stat_loggers))

    def lost(self) -> str | None:
        return None if self.cores.alive() else self.cores.failure()

    async def close(self) -> None:
        return None

    async def release(self) -> None:
        return None

    def process_ids(self) -> list[int]:
        return []  # the core is its owner's

"""The front-end worker processes of a server: started, watched, replaced when one dies.

Each worker holds a *slot* (its place, ``0..N-1``, the label of its metrics) and a
client index on every engine core. vLLM greets a client index once per engine core's
life, so a dead worker's index cannot be taken again: the cores are launched with
spare indices (``clients`` in all), and a replacement takes the next unused one. When
none is left, a dead worker is not replaced and the server serves on the others; when
none is left serving, the server stops.

A worker that exits (a crash, the OOM killer, SIGKILL) is noticed within ``POLL``
seconds: the hub ends the requests it held, and a new process takes its slot. A worker
that stops answering the hub for ``silence_timeout`` seconds once it serves (a stalled
event loop, a SIGSTOP), or does not serve within ``START_TIMEOUT`` seconds of its start,
is killed, then replaced the same way.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable
from typing import Any

import anyio
import attrs

from ..engines._watchdog import REAPER, process_tree
from ._hub import Hub, WorkerState

logger = logging.getLogger("lylm.serve")

POLL = 0.1
"""Seconds between looks at the workers' processes."""

START_TIMEOUT = 180.0
"""Seconds a worker may take from its start to serving (importing vLLM and attaching to
every engine core take seconds to tens of seconds on a busy host) before it is killed
and replaced."""

StartWorker = Callable[[int, int, bytes], Any]
"""Starts the worker process for (slot, client index, hub identity); returns it, started."""


@attrs.define
class _Slot:
    process: Any
    identity: bytes
    client_index: int
    started: float
    #: When the worker it replaces was found dead (None: one of the first workers).
    replacing_since: float | None = None
    watched: list[Any] = attrs.field(factory=list)
    #: Why it was killed, once it was (it is replaced once its exit shows).
    killed: str | None = None


class Workers:
    """The worker processes (see the module docstring)."""

    def __init__(
        self,
        *,
        count: int,
        clients: int,
        start: StartWorker,
        hub: Hub,
        silence_timeout: float = 10.0,
        gone: Callable[[int], None] | None = None,
    ) -> None:
        if clients < count:
            raise ValueError(f"clients ({clients}) must be at least the worker count ({count})")
        self.count = count
        self.clients = clients
        self.silence_timeout = silence_timeout
        #: Workers replaced since start.
        self.replaced = 0
        self.slots: dict[int, _Slot] = {}
        self._start = start
        self._hub = hub
        self._next_client = count
        self._incarnations = 0
        self._stopping = False
        #: Called with a slot whose worker is gone (before any replacement starts).
        self._gone = gone
        hub.on_ready = self._ready

    def start_all(self) -> None:
        """Start the first ``count`` workers (client indices ``0..count-1``)."""
        for slot in range(self.count):
            self._spawn(slot, slot, None)

    def _spawn(self, slot: int, client_index: int, replacing_since: float | None) -> None:
        self._incarnations += 1
        identity = f"w{slot}.{self._incarnations}".encode()
        process = self._start(slot, client_index, identity)
        watched = process_tree([process.pid])
        # Should this process be killed outright, the watchdog stops the worker too.
        REAPER.watch(watched)
        self.slots[slot] = _Slot(process, identity, client_index, time.monotonic(), replacing_since, watched)

    def _serves(self, held: _Slot) -> bool:
        worker = self._hub.workers.get(held.identity)
        return worker is not None and worker.ready

    def _ready(self, worker: WorkerState) -> None:
        slot = self.slots.get(worker.slot)
        if slot is None or slot.identity != worker.identity or slot.replacing_since is None:
            return
        logger.warning(
            "worker %d replaced: pid %d (client %d) serves %.1f s after its predecessor was found dead",
            worker.slot, worker.pid, worker.client_index, time.monotonic() - slot.replacing_since,
        )

    async def watch(self, none_left: anyio.Event) -> None:
        """Replace workers that die, kill those that stop answering; set ``none_left`` when
        no worker is left serving. Returns when stopped (:meth:`stop`)."""
        while not self._stopping:
            for slot, held in list(self.slots.items()):
                code = held.process.exitcode
                if code is not None:
                    self._died(slot, held, held.killed or f"exited with code {code}")
                elif held.killed is None and not self._serves(held) and time.monotonic() - held.started > START_TIMEOUT:
                    logger.error("worker %d (pid %d) did not start serving within %g s: killing it",
                                 slot, held.process.pid, START_TIMEOUT)
                    held.killed = f"was killed after {START_TIMEOUT:g} s without starting to serve"
                    _kill(held.process, signal.SIGKILL)
                elif held.killed is None and self._hub.silent_for(held.identity) > self.silence_timeout:
                    silent = self._hub.silent_for(held.identity)
                    logger.error("worker %d (pid %d) has not answered the hub for %.1f s: killing it",
                                 slot, held.process.pid, silent)
                    held.killed = f"was killed after {silent:.1f} s without answering the hub"
                    _kill(held.process, signal.SIGKILL)
            if not self.slots:
                none_left.set()
                return
            await anyio.sleep(POLL)

    def _died(self, slot: int, held: _Slot, how: str) -> None:
        found = time.monotonic()
        ended = self._hub.worker_gone(held.identity)
        REAPER.forget(held.watched)
        del self.slots[slot]
        if self._gone is not None:
            self._gone(slot)
        if self._stopping:
            return
        spare = self._next_client < self.clients
        logger.error(
            "front-end worker %d (pid %s) %s; %d request(s) it held ended%s",
            slot, held.process.pid, how, ended,
            "; starting a replacement" if spare else
            f"; no spare client slot left on the engine cores: serving on {len(self.slots)} worker(s)",
        )
        if spare:
            self.replaced += 1
            self._next_client += 1
            self._spawn(slot, self._next_client - 1, found)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stop replacing; send ``sig`` to every worker (SIGTERM: each drains and exits)."""
        self._stopping = True
        for held in self.slots.values():
            _kill(held.process, sig)

    async def join(self, timeout: float) -> None:
        """Wait for every worker to exit; kill those still running after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for held in self.slots.values():
                if held.process.exitcode is not None:
                    self._hub.worker_gone(held.identity)  # what it held ended, if anything
            if all(h.process.exitcode is not None for h in self.slots.values()):
                break
            await anyio.sleep(0.05)
        self.kill()

    def kill(self) -> None:
        """Kill every worker still running (the last resort of a shutdown)."""
        self._stopping = True
        for held in list(self.slots.values()):
            if held.process.exitcode is None:
                logger.warning("worker %s did not stop in time: killing it", held.process.name)
                held.process.kill()
                held.process.join(5)
            REAPER.forget(held.watched)


def _kill(process: Any, sig: int) -> None:
    if process.exitcode is None and process.pid is not None:
        try:
            os.kill(process.pid, sig)
        except ProcessLookupError:
            pass

"""Accepting connections on a socket that several worker processes share, least loaded first.

With one listening socket shared by N processes, the event loop's own server accepts
every queued connection in whichever process wakes first. A burst of new clients (a
benchmark's 256 streams, a load balancer opening its pool) lands mostly on one worker,
and since clients keep their connections alive it stays there: that worker's event loop
becomes the bottleneck of most requests while the others idle. Here each worker
publishes how many connections it holds in an array the workers share, and a worker
holding more than the least loaded one that accepts leaves a waiting connection to it
for a moment (``DEFER`` seconds, rechecked every millisecond) before taking it itself.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import socket
from collections.abc import Callable
from typing import Any

logger = logging.getLogger("lylm.serve")

DEFER = 0.005
"""Seconds a busier worker leaves a waiting connection to a less loaded one."""

REFRESH = 0.05
"""Seconds between republications of a worker's connection count."""

NOT_ACCEPTING = 2**62
"""The load of a slot whose worker does not accept (not started, dead, shutting down)."""


class Loads:
    """The workers' connection counts, one slot each, in memory every worker shares."""

    def __init__(self, slots: int) -> None:
        self.counts: Any = multiprocessing.get_context("spawn").RawArray("q", [NOT_ACCEPTING] * slots)

    def set(self, slot: int, count: int) -> None:
        self.counts[slot] = count

    def least(self) -> int:
        return int(min(self.counts))


class BalancedAcceptor:
    """Accepts connections on ``sock`` for one worker (``slot``), least loaded worker first,
    and hands each to ``connect`` (the server's protocol, on this event loop)."""

    def __init__(
        self,
        sock: socket.socket,
        loads: Loads,
        slot: int,
        *,
        held: Callable[[], int],
        connect: Callable[[socket.socket], Any],
    ) -> None:
        self._sock = sock
        self._loads = loads
        self._slot = slot
        self._held = held
        self._connect = connect
        self._task: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._connecting = 0

    def start(self) -> None:
        self._sock.setblocking(False)
        loop = asyncio.get_running_loop()
        self._task = loop.create_task(self._accept(), name="lylm-accept")
        self._refresh()

    def _refresh(self) -> None:
        # Connections end without an event here: the count is republished now and then.
        self.publish()
        if self._task is not None:
            self._timer = asyncio.get_running_loop().call_later(REFRESH, self._refresh)

    def publish(self) -> None:
        """Say how many connections this worker holds (while it accepts)."""
        if self._task is not None:
            self._loads.set(self._slot, self._held() + self._connecting)

    async def stop(self) -> None:
        """Stop accepting; the other workers take every new connection from now on."""
        task, self._task = self._task, None
        if self._timer is not None:
            self._timer.cancel()
        self._loads.set(self._slot, NOT_ACCEPTING)
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _accept(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await _readable(loop, self._sock)
            self.publish()
            for _ in range(int(DEFER / 0.001)):
                if self._held() + self._connecting <= self._loads.least():
                    break
                await asyncio.sleep(0.001)
            try:
                conn, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                continue  # another worker took it
            except OSError:  # out of file descriptors, say: asyncio's server waits a second too
                logger.exception("accepting a connection failed")
                await asyncio.sleep(1.0)
                continue
            self._connecting += 1
            self.publish()
            loop.create_task(self._connected(conn))

    async def _connected(self, conn: socket.socket) -> None:
        try:
            await self._connect(conn)
        except asyncio.CancelledError:
            conn.close()
            raise
        except Exception:
            logger.debug("an accepted connection failed to start", exc_info=True)
            conn.close()
        finally:
            self._connecting -= 1
            self.publish()


async def _readable(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(sock.fileno(), wake)
    try:
        await ready
    finally:
        loop.remove_reader(sock.fileno())

"""Engine cores on other hosts: what a remote instance's engine needs beyond a local one.

vLLM runs engine cores apart from their front end for its multi-node data
parallelism: the front end binds a handshake socket at ``--data-parallel-address``
and ``--data-parallel-rpc-port``, and a core started with ``vllm serve MODEL
--headless`` on another host connects to it; tokens then cross the network once per
engine step for the whole batch. A remote instance's engine is an ``AsyncLLM`` built
that way with no local engine (``data_parallel_size_local`` 0). Three things vLLM
leaves to its user, done here:

* noticing that the core is gone: vLLM has no process to watch, so a killed core left
  streams waiting and the engine reported healthy. :class:`Disconnects` watches the
  front end's sockets for ZeroMQ's disconnect event (the core's host closes the TCP
  connections when the process dies: seen within ~40 ms on loopback);
* bounding the wait for a core that never connects, or that connects and goes away
  before it is ready: vLLM's handshake waits without limit when no local process can
  fail. :class:`Attach` watches the handshake's connection and ends the wait with
  :func:`abort_attach`;
* noticing a host that is gone without closing its connections (power, network):
  heartbeats on the front end's sockets (set while vLLM builds them,
  :func:`~lylm.engines._internals.build_with_heartbeats`) close a silent connection, and
  :class:`Disconnects` sees that too;
* the engine args that make the front end wait for a remote core (:func:`remote_engine_args`).

:class:`RemoteLink` holds these for one engine (and the Ray placement that started its
core, when the instance has one).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import anyio

from .._config import EngineSpec, RemoteCore
from .._exceptions import EngineDeadError
from ._internals import build_with_heartbeats, client_sockets

logger = logging.getLogger("lylm")

#: A data-parallel rank no pool uses: vLLM's handshake fails on a message from it.
_ABORT_RANK = 65535


def remote_engine_args(remote: RemoteCore) -> dict[str, Any]:
    """The engine args of a front end whose only engine core attaches from another host."""
    return {
        "data_parallel_size": 1,
        "data_parallel_size_local": 0,
        "data_parallel_address": remote.address,
        "data_parallel_rpc_port": remote.port,
    }


def abort_attach(remote: RemoteCore) -> None:
    """End a front end's wait for its remote core (a timeout, or a shutdown meanwhile).

    vLLM's handshake raises on a message from a rank it does not expect, and the
    build waiting on it fails, its sockets closed. A message sent before the handshake
    socket is bound is dropped after the linger (0.2 s): send until the build has ended.
    """
    import zmq

    context = zmq.Context()
    try:
        socket = context.socket(zmq.DEALER)
        socket.setsockopt(zmq.IDENTITY, _ABORT_RANK.to_bytes(2, "little"))
        socket.connect(f"tcp://{remote.describe()}")
        socket.send(b"lylm: stop waiting for this engine core")
        socket.close(linger=200)
    finally:
        context.term()


class Disconnects:
    """Watches an attached front end's sockets (vLLM's input and output sockets of its
    engine-core client) for a disconnect of the remote core. :meth:`seen` is called
    from the event loop's thread (the pool's health poll); it never blocks.

    Those sockets listen on a TCP port, so anything may connect to them: a port scanner,
    a health probe, a stray ``nc``. ZeroMQ reports such a connection's end as a
    disconnect like the core's, so the watch tells them apart: ZeroMQ reports a failed
    handshake just before that connection's disconnect (one I/O thread, in that order),
    and such a disconnect is not the core's; it is only counted (:attr:`strays`, and a
    warning: these ports carry no authentication). Any other disconnect (the core's
    connections, or a ZeroMQ peer that completed its handshake) is the core leaving.
    The connection's accept is no help: ZeroMQ may report it after its end (the listener
    reports it once it has handed the connection to an I/O thread, which may be another).
    """

    def __init__(self, llm: Any, remote: RemoteCore | None = None) -> None:
        import zmq

        self._zmq = zmq
        self._remote = remote
        self._monitors: list[tuple[str, Any]] = []
        self._owned: list[Any] = []
        self._since = time.monotonic()
        #: Per socket: handshake failures whose disconnect has not come yet.
        self._failed: dict[str, int] = {}
        #: Connections that were not the core (failed handshakes), ended and ignored.
        self.strays = 0
        #: Which socket saw the disconnect, and how long after the watch began (for the reason).
        self.what: str | None = None
        events = zmq.EVENT_DISCONNECTED | _handshake_failures(zmq)
        for key, socket in client_sockets(llm):
            monitor = socket.get_monitor_socket(events)  # in vLLM's (asyncio) context
            self._owned.append(monitor)
            # Read through a plain view of it: non-blocking reads from the health poll.
            self._monitors.append((key, zmq.Socket.shadow(monitor.underlying)))
            self._failed[key] = 0

    def seen(self) -> bool:
        """True once either socket has reported a disconnect of the core."""
        from zmq.utils.monitor import parse_monitor_message

        zmq = self._zmq
        for name, monitor in self._monitors:
            while True:
                try:
                    frames = monitor.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                event = parse_monitor_message(frames)["event"]
                if event & _handshake_failures(zmq):
                    self._failed[name] += 1
                elif event == zmq.EVENT_DISCONNECTED:
                    if self._failed[name] > 0:  # the end of the connection whose handshake failed
                        self._failed[name] -= 1
                        self.strays += 1
                        logger.warning(
                            "a connection to the %s socket of the remote engine core at %s was not "
                            "ZeroMQ (its handshake failed): ignored. These ports carry no "
                            "authentication: keep them on a private network",
                            name,
                            self._remote.describe() if self._remote is not None else "?",
                        )
                        continue
                    self.what = f"{name} socket, {time.monotonic() - self._since:.1f} s after it attached"
                    return True
        return False

    def close(self) -> None:
        """Stop watching (before the engine's sockets close)."""
        self._monitors = []
        for monitor in self._owned:
            monitor.close(linger=0)
        self._owned = []


def _handshake_failures(zmq: Any) -> int:
    return int(
        zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_AUTH
    )


#: Seconds a build may still take after the core's handshake connection closed: READY
#: closes it too, and the front end then finishes building (threads, its own set-up).
_AFTER_HANDSHAKE = 10.0
_POLL = 0.25


def handshake_connected(remote: RemoteCore) -> bool:
    """Whether a core is connected to this process's handshake socket at ``remote``.

    vLLM's core keeps that connection from its hello until it is ready (weights,
    profiling, compiling in between): a connection there is a core starting up."""
    import psutil  # a dependency of vLLM

    return any(
        c.status == psutil.CONN_ESTABLISHED and c.laddr and c.laddr.port == remote.port
        for c in psutil.Process().net_connections(kind="tcp")
    )


class Attach:
    """One start's wait for a remote core (``build`` blocks in vLLM's handshake, in a
    thread no cancellation reaches). The wait is ended with :func:`abort_attach` (and
    the thread let finish) when no core connected within ``remote.timeout``, when the
    core that connected went away before it was ready, or when the start is cancelled
    (a pool closing while a dead remote's restart waits); :meth:`abort` does the same
    for a shutdown meanwhile. A core that connected may take as long as its start
    takes: the timeout bounds the wait for a core to appear, not its loading."""

    def __init__(self, remote: RemoteCore) -> None:
        self.remote = remote
        #: Set once the build's thread has left vLLM's wait.
        self.ended = threading.Event()

    async def run(self, build: Callable[[], None]) -> None:
        """Run ``build`` in a thread; raise TimeoutError naming the command to run when no
        core connected in time, ConnectionError when it left before it was ready, or
        what ``build`` raised."""
        outcome: dict[str, BaseException] = {}

        def guarded() -> None:
            try:
                build()
            except BaseException as exc:
                outcome["error"] = exc
            finally:
                self.ended.set()

        why: str | None = None
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._thread, guarded)
                why = await self._watch()  # returns once the build has ended
        finally:
            if not self.ended.is_set():
                with anyio.CancelScope(shield=True):
                    await self.abort()
        remote = self.remote
        if "error" in outcome:
            if why == "timeout":
                raise TimeoutError(
                    f"no engine core connected to {remote.describe()} within {remote.timeout:g} s; start it on "
                    f"its host with: lylm core --pool {remote.describe()} MODEL (and the instance's engine args "
                    f"as vllm serve's flags; README, 'Remote instances')"
                ) from outcome["error"]
            if why == "left":
                raise ConnectionError(
                    f"the engine core that connected to {remote.describe()} went away before it was ready"
                ) from outcome["error"]
            raise outcome["error"]

    async def _thread(self, guarded: Callable[[], None]) -> None:
        await anyio.to_thread.run_sync(guarded, abandon_on_cancel=True)

    async def _watch(self) -> str | None:
        """Until the build ends: None; or why to end its wait (``timeout``, ``left``)."""
        deadline = anyio.current_time() + self.remote.timeout
        connected = False
        left_at: float | None = None
        while not self.ended.is_set():
            now = anyio.current_time()
            if await anyio.to_thread.run_sync(handshake_connected, self.remote):
                connected, left_at = True, None
            elif connected:
                left_at = now if left_at is None else left_at
                if now - left_at > _AFTER_HANDSHAKE:
                    await self.abort()
                    return "left"
            elif now > deadline:
                await self.abort()
                return "timeout"
            await anyio.to_thread.run_sync(self.ended.wait, _POLL)
        return None

    async def abort(self) -> None:
        """End the wait, if the build is still in it. Repeated until the thread has left it:
        a message sent before the handshake socket is bound (vLLM reads the model's config
        first) is lost."""
        while not self.ended.is_set():
            await anyio.to_thread.run_sync(abort_attach, self.remote)
            await anyio.to_thread.run_sync(self.ended.wait, 0.2)


class RemoteLink:
    """What a remote instance's engine holds of its core beside vLLM's client: the Ray
    placement that started the core (when the instance has one), the start's wait for the
    core to attach (:class:`Attach`), and the watch for its disconnect (:class:`Disconnects`).
    One per :class:`~lylm.engines._local.VLLMEngine`; :meth:`close` may come at any time,
    during :meth:`start` included."""

    def __init__(self, spec: EngineSpec) -> None:
        if spec.remote is None:
            raise ValueError(f"{spec.name} is not a remote instance")
        self.spec = spec
        self.remote: RemoteCore = spec.remote
        self._lock = threading.Lock()
        self._closed = False
        self._placed: Any = None
        self._attach: Attach | None = None
        self._disconnects: Disconnects | None = None

    def _check_open(self) -> None:
        if self._closed:
            raise EngineDeadError(f"{self.spec.name} was shut down while it started")

    async def start(self, build: Callable[[], None], llm: Callable[[], Any]) -> None:
        """Place the core through Ray if the instance says so, run ``build`` (which builds
        the front end and waits in vLLM's handshake) within the attach's bounds, then watch
        the connections of the front end ``llm()`` returns. Watched on the event loop's
        thread, where the health poll reads it."""
        if self.remote.ray is not None:  # the pool starts the core itself, where Ray places it
            from ._ray import RayCore

            placed = RayCore(self.spec)
            with self._lock:
                self._check_open()
                self._placed = placed
            await anyio.to_thread.run_sync(placed.start, self.remote.timeout)
            if self._closed:  # shut down while it was placed: what the placement made goes too
                await anyio.to_thread.run_sync(placed.stop)
                self._check_open()
        self._check_open()
        self._attach = Attach(self.remote)
        await self._attach.run(build)
        self._check_open()  # closed as the build ended: there is nothing to watch
        self._disconnects = Disconnects(llm(), self.remote)

    async def open(self, engine_args: dict[str, Any], stat_loggers: list[Any] | None) -> Any:
        """A front end whose core attaches from its host (a :class:`~._links.CoreLink`):
        built with heartbeats on its sockets, within the attach's bounds."""
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.usage.usage_lib import UsageContext
        from vllm.v1.engine.async_llm import AsyncLLM

        built: list[Any] = []
        args = {**engine_args, **remote_engine_args(self.remote)}

        def build() -> None:
            built.append(build_with_heartbeats(lambda: AsyncLLM.from_engine_args(
                AsyncEngineArgs(**args), usage_context=UsageContext.OPENAI_API_SERVER, stat_loggers=stat_loggers
            ), self.remote.heartbeat))

        try:
            await self.start(build, lambda: built[0])
        except BaseException:
            if built:  # shut down as the build ended: the front end must not outlive the start
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(built[0].shutdown)
            raise
        return built[0]

    def process_ids(self) -> list[int]:
        return []  # on its own host

    def lost(self) -> str | None:
        """Why the core is gone, once the watch saw it leave (from the health poll)."""
        if self._disconnects is None or not self._disconnects.seen():
            return None
        return (
            f"remote engine core at {self.remote.describe()} disconnected "
            f"(closed, or no heartbeat answered in {self.remote.heartbeat:g} s; "
            f"{self._disconnects.what})"
        )

    async def close(self) -> None:
        """Stop waiting for the core and watching it (before the front end shuts down)."""
        with self._lock:
            self._closed = True
        if self._attach is not None:  # a start waiting for the core: end the wait
            await self._attach.abort()
        if self._disconnects is not None:
            self._disconnects.close()
            self._disconnects = None

    async def release(self) -> None:
        """Stop what the placement started (after the front end shut down)."""
        with self._lock:
            placed, self._placed = self._placed, None
        if placed is not None:
            await anyio.to_thread.run_sync(placed.stop)

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
* bounding the wait for a core that never connects: vLLM's handshake waits without
  limit when no local process can fail. :func:`abort_attach` ends it;
* the engine args that make the front end wait for a remote core (:func:`remote_engine_args`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import anyio

from ._config import RemoteCore

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
    from the event loop's thread (the pool's health poll); it never blocks."""

    def __init__(self, llm: Any) -> None:
        import zmq

        self._zmq = zmq
        self._monitors: list[Any] = []
        self._owned: list[Any] = []
        resources = getattr(getattr(llm, "engine_core", None), "resources", None)
        for name in ("input_socket", "output_socket"):
            socket = getattr(resources, name, None)
            if socket is None:
                continue
            monitor = socket.get_monitor_socket(zmq.EVENT_DISCONNECTED)  # in vLLM's (asyncio) context
            self._owned.append(monitor)
            # Read through a plain view of it: non-blocking reads from the health poll.
            self._monitors.append(zmq.Socket.shadow(monitor.underlying))

    def seen(self) -> bool:
        """True once either socket has reported a disconnect."""
        from zmq.utils.monitor import parse_monitor_message

        zmq = self._zmq
        for monitor in self._monitors:
            while True:
                try:
                    frames = monitor.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                if parse_monitor_message(frames)["event"] == zmq.EVENT_DISCONNECTED:
                    return True
        return False

    def close(self) -> None:
        """Stop watching (before the engine's sockets close)."""
        self._monitors = []
        for monitor in self._owned:
            monitor.close(linger=0)
        self._owned = []


class Attach:
    """One start's wait for a remote core to connect (``build`` blocks in vLLM's handshake,
    in a thread no cancellation reaches). Past ``remote.timeout``, or when the start is
    cancelled (a pool closing while a dead remote's restart waits), the wait is ended
    with :func:`abort_attach` and the thread let finish; :meth:`abort` does the same for
    a shutdown meanwhile."""

    def __init__(self, remote: RemoteCore) -> None:
        self.remote = remote
        #: Set once the build's thread has left vLLM's wait.
        self.ended = threading.Event()

    async def run(self, build: Callable[[], None]) -> None:
        """Run ``build`` in a thread; raise TimeoutError naming the command to run when no
        core connected in time, or what ``build`` raised."""
        outcome: dict[str, BaseException] = {}

        def guarded() -> None:
            try:
                build()
            except BaseException as exc:
                outcome["error"] = exc
            finally:
                self.ended.set()

        try:
            with anyio.move_on_after(self.remote.timeout) as waited:
                await anyio.to_thread.run_sync(guarded, abandon_on_cancel=True)
        finally:
            if not self.ended.is_set():
                with anyio.CancelScope(shield=True):
                    await self.abort()
        if "error" in outcome:
            remote = self.remote
            if waited.cancelled_caught:
                raise TimeoutError(
                    f"no engine core connected to {remote.describe()} within {remote.timeout:g} s; start it on "
                    f"its host with: vllm serve MODEL --headless --data-parallel-address {remote.address} "
                    f"--data-parallel-rpc-port {remote.port} (and the instance's engine args)"
                ) from outcome["error"]
            raise outcome["error"]

    async def abort(self) -> None:
        """End the wait, if the build is still in it. Repeated until the thread has left it:
        a message sent before the handshake socket is bound (vLLM reads the model's config
        first) is lost."""
        while not self.ended.is_set():
            await anyio.to_thread.run_sync(abort_attach, self.remote)
            await anyio.to_thread.run_sync(self.ended.wait, 0.2)

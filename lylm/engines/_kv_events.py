"""One engine core's KV events, subscribed to and handed to the pool's :class:`~lylm._kv_index.KVIndex`.

vLLM's engine core publishes its KV-cache events on a ZeroMQ PUB socket (and answers
replay requests on a ROUTER socket) when its engine args carry a ``kv_events_config``.
lylm chooses the endpoints: IPC sockets in a private temporary folder
(:func:`kv_events_endpoints`), never a network address, so nothing else on the host or the
network can listen. (vLLM binds IPC endpoints; a TCP one without a wildcard it would
connect instead.)

:class:`KVEventStream` runs one thread per engine: it subscribes, decodes each batch
(msgpack, kept as plain lists and maps: vLLM's event classes differ between versions, their
field names do not) and applies it to the index in order. A missing sequence number is
asked again from the core's replay buffer; if the buffer no longer has it, the instance's
blocks are forgotten and the stream goes on (:meth:`~lylm._kv_index.KVIndex.resync`).
A subscriber that connects after the core has published (PUB/SUB drops what comes before
the connection) starts with such a gap at sequence 0, and replays it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import threading
from typing import Any

from .._kv_index import KVIndex

logger = logging.getLogger("lylm")

#: vLLM's end-of-replay marker: sequence number -1.
_END = (-1).to_bytes(8, "big", signed=True)


def kv_events_endpoints(folder: str | None = None, name: str = "") -> tuple[str, str]:
    """A new pair of IPC endpoints (publish, replay) in a private folder (mode 0700);
    ``name`` tells several engines' pairs in one folder apart."""
    folder = folder or tempfile.mkdtemp(prefix="lylm-kv-")
    os.chmod(folder, 0o700)
    prefix = f"{folder}/{name}-" if name else f"{folder}/"
    return f"ipc://{prefix}events", f"ipc://{prefix}replay"


def kv_events_config(endpoint: str, replay_endpoint: str | None) -> dict[str, Any]:
    """The ``kv_events_config`` engine argument that makes a core publish on these endpoints
    (vLLM binds an IPC endpoint and connects to a TCP one without a wildcard; no replay
    endpoint: no replay buffer)."""
    config: dict[str, Any] = {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": endpoint}
    if replay_endpoint is not None:
        config["replay_endpoint"] = replay_endpoint
    return config


def remote_endpoint(address: str, port: int) -> str:
    """``tcp://address:port``, an IPv6 address in brackets: where a remote core publishes."""
    host = f"[{address}]" if ":" in address else address
    return f"tcp://{host}:{port}"


class KVEventStream:
    """Subscribes to one engine core's KV events and applies them to ``index`` as ``instance``."""

    def __init__(
        self, index: KVIndex, instance: str, endpoint: str, replay_endpoint: str | None, *, bind: bool = False
    ) -> None:
        self.index = index
        self.instance = instance
        self.endpoint = endpoint
        self.replay_endpoint = replay_endpoint
        #: Listen at ``endpoint`` (a remote core connects its publisher there) rather than
        #: connect to it (a local core's IPC socket).
        self.bind = bind
        self.replays = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Subscribe (returns once the socket is connecting; events follow in the thread)."""
        import zmq

        ready = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(zmq, ready), name=f"lylm-kv-events {self.instance}", daemon=True
        )
        self._thread.start()
        ready.wait(10)

    def stop(self, wait: bool = True) -> None:
        """Unsubscribe and forget the instance's blocks (its engine is stopping). Without
        ``wait`` it returns at once; the thread forgets them as it ends (within 0.1 s)."""
        self._stop.set()
        if wait and self._thread is not None:
            self._thread.join(5)
        self.index.drop(self.instance)

    def _run(self, zmq: Any, ready: threading.Event) -> None:
        import msgspec

        decode = msgspec.msgpack.Decoder().decode
        context = zmq.Context.instance()
        sub = context.socket(zmq.SUB)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.setsockopt(zmq.LINGER, 0)
        try:
            if self.bind:
                ready.set()  # the core connects when it starts: nothing to wait for here
                self._bind(zmq, sub)
            else:
                sub.connect(self.endpoint)
        except Exception:
            logger.exception("%s: cannot listen for KV events at %s", self.instance, self.endpoint)
            self.index.drop(self.instance)
            sub.close(0)
            ready.set()
            return
        ready.set()
        try:
            while not self._stop.is_set():
                if not sub.poll(100):
                    continue
                frames = sub.recv_multipart()
                if len(frames) != 3:
                    continue
                seq = int.from_bytes(frames[1], "big", signed=True)
                events = _events(decode, frames[2])
                if events is None:
                    continue
                if not self.index.apply(self.instance, seq, events):
                    self._recover(zmq, context, decode, seq, events)
        except Exception:  # the core went away mid-message, a decoding surprise: stop, loudly
            if not self._stop.is_set():
                logger.exception("%s: KV event stream failed; its blocks are forgotten", self.instance)
                self.index.drop(self.instance)
        finally:
            sub.close(0)
            if self._stop.is_set():  # a batch applied after stop()'s drop goes too
                self.index.drop(self.instance)

    def _bind(self, zmq: Any, sub: Any) -> None:
        """Listen at the endpoint; the stream of the engine this one replaced may still hold
        it for a moment (it ends on its own within 0.1 s): try again for a few seconds."""
        if self.endpoint.startswith("tcp://["):
            sub.setsockopt(zmq.IPV6, 1)
        for attempt in range(50):
            try:
                sub.bind(self.endpoint)
                return
            except zmq.ZMQError as exc:
                if exc.errno != zmq.EADDRINUSE or attempt == 49 or self._stop.wait(0.1):
                    raise

    def _recover(self, zmq: Any, context: Any, decode: Any, seq: int, events: list[Any]) -> None:
        """Replay what is missing before ``seq`` from the core's buffer, then apply ``seq``;
        resync at ``seq`` where the buffer cannot fill the gap."""
        start = self.index.expected(self.instance)
        if self.replay_endpoint is not None:
            self.replays += 1
            dealer = context.socket(zmq.DEALER)
            dealer.setsockopt(zmq.LINGER, 0)
            try:
                dealer.connect(self.replay_endpoint)
                dealer.send_multipart([b"", start.to_bytes(8, "big")])
                while dealer.poll(2000):
                    frames = dealer.recv_multipart()
                    if len(frames) != 4 or frames[2] == _END:
                        break
                    replayed = _events(decode, frames[3])
                    if replayed is not None:
                        self.index.apply(self.instance, int.from_bytes(frames[2], "big"), replayed)
            finally:
                dealer.close(0)
        if not self.index.apply(self.instance, seq, events):
            logger.warning(
                "%s: KV events %d to %d were lost: its blocks are no longer known, and the balancer "
                "judges it by its own table until its cache is cleared or it restarts",
                self.instance, start, seq - 1,
            )  # fmt: skip
            self.index.resync(self.instance, seq - 1)
            self.index.apply(self.instance, seq, events)


def _events(decode: Any, payload: bytes) -> list[Any] | None:
    """A batch's events (``[ts, events, dp_rank?]``, array-like), or None if not one."""
    with contextlib.suppress(Exception):
        batch = decode(payload)
        if isinstance(batch, list) and len(batch) >= 2 and isinstance(batch[1], list):
            return [e for e in batch[1] if isinstance(e, dict)]
    return None

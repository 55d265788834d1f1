"""The hub: one pool's books and balancers, shared by several front-end worker processes.

With ``--workers N`` a server runs N front-end processes, each attached to every
engine core (vLLM's own multi-client engine cores, see :mod:`lylm._vllm_cores`), so
the per-token work (detokenization, SSE, socket writes) is spread over N processes.
What must be seen whole stays in one place, the hub, in the server's main process:
the instances' books, admission, the balancers (with their own state, such as
``prefix_aware``'s prefix table), shadows, health and restarts. Per request, a
worker asks the hub once which instance serves it (:meth:`HubClient.choose`, one
round trip) and tells it once how it ended; tokens never pass through the hub.
Token progress, engine signals and HTTP counts reach it in batches every
``FLUSH_INTERVAL`` seconds.

Transport: a ZeroMQ ROUTER socket (the hub) and one DEALER per worker, on an IPC
path in a private directory; messages are pickled tuples. Both ends are the same
program of the same user on the same host: nothing listens on a network port.

Messages, worker -> hub::

    ("hello", worker)
    ("choose", call, request_fields, exclude_names, first)  -> ("ok", call, name) | ("err", call, error)
    ("call", call, name)                                      -> ("ok", call, value) | ("err", call, error)
    ("batch", ends, progress, responses)       ends: [(request_id, instance, outcome, remaining, ttft, latency, generated)]
    ("ready",) ("attached", name, generation)

hub -> worker: replies, and ``("attach", name, generation, handle)`` when an
engine core was restarted (the worker attaches to the new one and answers
``attached``).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import pickle
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from .. import _exceptions
from .._exceptions import EngineError, LylmError
from .._request import RequestInfo

if TYPE_CHECKING:
    from .._instance import Instance, Outcome
    from .._pool import EnginePool

logger = logging.getLogger("lylm")

FLUSH_INTERVAL = 0.05
"""Seconds between a worker's batches of token progress, engine signals and HTTP counts."""

CALL_TIMEOUT = 30.0
"""Seconds a worker waits for the hub's answer before failing the request."""

Progress = Mapping[str, tuple[int, int, int, Any]]
"""Per instance name: (tokens done, prompt tokens, generated tokens, signals or None)."""


def encode_error(exc: BaseException) -> tuple[str, tuple[Any, ...], dict[str, Any]]:
    """An exception as picklable parts, for the other end to rebuild (lylm's own types only)."""
    return type(exc).__name__, tuple(exc.args), dict(getattr(exc, "__dict__", {}))


def decode_error(parts: tuple[str, tuple[Any, ...], dict[str, Any]]) -> LylmError:
    """The lylm error :func:`encode_error` described (an :class:`EngineError` for any other)."""
    name, args, attributes = parts
    cls = getattr(_exceptions, name, None)
    if not (isinstance(cls, type) and issubclass(cls, LylmError)):
        return EngineError(f"the hub failed: {name}: {args[0] if args else ''}")
    error = cls.__new__(cls)
    Exception.__init__(error, *args)
    error.__dict__.update(attributes)
    return error


def request_fields(request: RequestInfo) -> tuple[Any, ...]:
    """``request`` as a picklable tuple (prompt ids packed when they are a list)."""
    ids = request.prompt_token_ids
    return (
        request.model,
        request.request_id,
        request.prompt_tokens,
        request.max_tokens,
        request.n,
        ids if isinstance(ids, (bytes, tuple)) else tuple(ids),
        request.prefix_hashes,
        request.session_key,
    )


class Hub:
    """The hub side, in the server's main process, over a pool of engine-core launchers.

    ``pool`` is a running :class:`EnginePool` whose engines launch the engine cores
    and serve nothing themselves; the hub books the workers' requests in it.
    ``handlers`` answer ``call`` messages by name (the HTTP layer registers
    ``health`` and ``metrics``).
    """

    def __init__(self, pool: EnginePool, *, workers: int, address: str) -> None:
        self.pool = pool
        self.workers = workers
        self.address = address
        self.handlers: dict[str, Callable[[], Any]] = {}
        #: Requests each worker was given an instance for (first tries), by worker index.
        self.requests_by_worker = [0] * workers
        #: HTTP responses counted by the workers, by (route, status).
        self.responses: dict[tuple[str, str], int] = {}
        self._identities: dict[int, bytes] = {}
        self._ready: set[int] = set()
        self._ready_event = asyncio.Event()
        # (worker, request id, instance name): a retried request is booked once per instance.
        self._pending: dict[tuple[int, str, str], tuple[RequestInfo, Instance]] = {}
        self._acks: dict[tuple[str, int], set[int]] = {}
        self._ack_event = asyncio.Event()
        self._socket: Any = None
        self._context: Any = None

    # -- lifecycle ---------------------------------------------------------------

    def bind(self) -> None:
        """Listen on the hub's address (call before the workers start)."""
        import zmq
        import zmq.asyncio

        self._context = zmq.asyncio.Context()
        self._socket = self._context.socket(zmq.ROUTER)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.bind(self.address)

    async def serve(self) -> None:
        """Answer the workers until cancelled."""
        socket = self._socket
        while True:
            identity, payload = await socket.recv_multipart()
            try:
                message = pickle.loads(payload)
                reply = self._handle(identity, message)
            except Exception:
                logger.exception("hub: a worker's message could not be handled")
                continue
            if reply is not None:
                await socket.send_multipart([identity, pickle.dumps(reply, protocol=pickle.HIGHEST_PROTOCOL)])

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close(0)
            self._context.term()
            self._socket = None

    async def wait_ready(self) -> None:
        """Until every worker has started its pool and serves."""
        await self._ready_event.wait()

    # -- engine cores replaced -----------------------------------------------------

    async def attach(self, name: str, generation: int, handle: Any, *, timeout: float = 120.0) -> bool:
        """Tell every worker to attach to ``name``'s new engine core; wait for all of them.

        Returns False if some did not confirm within ``timeout`` seconds (they
        then fail requests sent to that instance, which retry elsewhere).
        """
        if not self._identities:
            return True
        key = (name, generation)
        self._acks[key] = set()
        message = pickle.dumps(("attach", name, generation, handle), protocol=pickle.HIGHEST_PROTOCOL)
        for identity in self._identities.values():
            await self._socket.send_multipart([identity, message])
        deadline = time.monotonic() + timeout
        try:
            while len(self._acks[key]) < len(self._identities):
                left = deadline - time.monotonic()
                if left <= 0:
                    logger.warning(
                        "%s: %d of %d workers attached to the new engine core within %g s",
                        name, len(self._acks[key]), len(self._identities), timeout,
                    )
                    return False
                self._ack_event.clear()
                try:
                    await asyncio.wait_for(self._ack_event.wait(), left)
                except asyncio.TimeoutError:
                    pass
            return True
        finally:
            del self._acks[key]

    # -- messages ----------------------------------------------------------------

    def _handle(self, identity: bytes, message: tuple[Any, ...]) -> tuple[Any, ...] | None:
        kind = message[0]
        worker = int.from_bytes(identity, "big")
        if kind == "choose":
            _, call, fields, exclude, first = message
            try:
                return ("ok", call, self._choose(worker, fields, exclude, first))
            except LylmError as exc:
                return ("err", call, encode_error(exc))
        if kind == "batch":
            _, ends, progress, responses = message
            self._progress(progress)
            for end in ends:
                self._end(worker, *end)
            for key, count in responses.items():
                self.responses[key] = self.responses.get(key, 0) + count
            return None
        if kind == "call":
            _, call, name = message
            handler = self.handlers.get(name)
            if handler is None:
                return ("err", call, encode_error(LylmError(f"the hub has no {name!r}")))
            try:
                return ("ok", call, handler())
            except Exception as exc:
                logger.exception("hub: %s failed", name)
                return ("err", call, encode_error(exc if isinstance(exc, LylmError) else LylmError(str(exc))))
        if kind == "hello":
            self._identities[worker] = identity
            return None
        if kind == "ready":
            self._ready.add(worker)
            if len(self._ready) >= self.workers:
                self._ready_event.set()
            return None
        if kind == "attached":
            _, name, generation = message
            acks = self._acks.get((name, generation))
            if acks is not None:
                acks.add(worker)
                self._ack_event.set()
            return None
        logger.warning("hub: unknown message %r from worker %d", kind, worker)
        return None

    def _choose(self, worker: int, fields: tuple[Any, ...], exclude: Sequence[str], first: bool) -> str:
        request = RequestInfo(*fields)
        instance = self.pool._dispatch_elsewhere(request, exclude, first)
        self._pending[(worker, request.request_id, instance.name)] = (request, instance)
        if first and 0 <= worker < self.workers:
            self.requests_by_worker[worker] += 1
        return instance.name

    def _end(
        self,
        worker: int,
        request_id: str,
        name: str,
        outcome: Outcome,
        remaining: int,
        first_token: float | None,
        latency: float,
        generated: int,
    ) -> None:
        pending = self._pending.pop((worker, request_id, name), None)
        if pending is None:
            return
        request, instance = pending
        self.pool._ended_elsewhere(
            instance,
            request,
            outcome,
            remaining=remaining,
            first_token=first_token,
            latency=latency,
            generated=generated,
        )

    def _progress(self, progress: Progress) -> None:
        if not progress:
            return
        by_name = {i.name: i for i in self.pool.instances()}
        for name, (done, prompt, generated, signals) in progress.items():
            instance = by_name.get(name)
            if instance is None:
                continue
            instance.in_flight_tokens -= done
            instance.prompt_tokens += prompt
            instance.generated_tokens += generated
            if signals is not None:
                running, waiting, kv, queries, hits = signals
                target = instance.engine.signals
                target.running, target.waiting, target.kv_cache_usage = running, waiting, kv
                target.prefix_cache_queries += queries
                target.prefix_cache_hits += hits


def _expire(future: asyncio.Future[Any]) -> None:
    if not future.done():
        future.set_exception(EngineError(f"the hub did not answer within {CALL_TIMEOUT:g} s"))


class HubClient:
    """A worker's side of the hub: one DEALER socket, one reader task, one sender task."""

    def __init__(self, address: str, worker: int) -> None:
        self.address = address
        self.worker = worker
        #: Called for ``attach`` messages: (instance name, engine-core handle); returns when attached.
        self.on_attach: Callable[[str, Any], Awaitable[None]] | None = None
        #: Returns the worker's per-instance progress since the last call (see :data:`Progress`).
        self.progress: Callable[[], Progress] = dict
        self._calls: dict[int, asyncio.Future[Any]] = {}
        self._ids = itertools.count()
        self._ends: list[tuple[Any, ...]] = []
        self._responses: dict[tuple[str, str], int] = {}
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._socket: Any = None
        self._context: Any = None

    async def connect(self) -> None:
        """Connect to the hub and start the reader and the sender (on the running loop)."""
        if self._socket is not None:
            return
        import zmq
        import zmq.asyncio

        self._context = zmq.asyncio.Context()
        self._socket = self._context.socket(zmq.DEALER)
        self._socket.setsockopt(zmq.IDENTITY, self.worker.to_bytes(4, "big"))
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.connect(self.address)
        await self._send(("hello", self.worker))
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._read(), name="lylm-hub-reader"),
            loop.create_task(self._flush(), name="lylm-hub-sender"),
            loop.create_task(self._tick(), name="lylm-hub-ticker"),
        ]

    async def close(self) -> None:
        """Send what is left, stop the tasks and close the socket."""
        if self._socket is None:
            return
        try:
            await asyncio.wait_for(self._send_batch(), 1.0)
        except Exception:
            pass
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._socket.close(0)
        self._context.term()
        self._socket = None
        for future in self._calls.values():
            if not future.done():
                future.set_exception(EngineError("the worker is closing"))

    async def _send(self, message: tuple[Any, ...]) -> None:
        await self._socket.send(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))

    async def _request(self, message: tuple[Any, ...], call: int) -> Any:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._calls[call] = future
        # A timer, not asyncio.wait_for: that costs a task per call, on every request.
        timer = loop.call_later(CALL_TIMEOUT, _expire, future)
        try:
            await self._send(message)
            return await future
        finally:
            timer.cancel()
            self._calls.pop(call, None)

    async def choose(self, request: RequestInfo, exclude: Sequence[str], first: bool) -> str:
        """The name of the instance the hub chose for ``request`` (admitting it when ``first``)."""
        call = next(self._ids)
        return str(await self._request(("choose", call, request_fields(request), tuple(exclude), first), call))

    async def call(self, name: str) -> Any:
        """The value of the hub's handler ``name`` (``health``, ``metrics``)."""
        call = next(self._ids)
        return await self._request(("call", call, name), call)

    async def ready(self) -> None:
        """Tell the hub this worker serves."""
        await self._send(("ready",))

    def ended(
        self,
        request_id: str,
        instance: str,
        outcome: Outcome,
        remaining: int,
        first_token: float | None,
        latency: float,
        generated: int,
    ) -> None:
        """Queue the end of a request for the hub (sent within a loop turn, batched)."""
        self._ends.append((request_id, instance, outcome, remaining, first_token, latency, generated))
        self._wake.set()

    def count_response(self, route: str, status: int) -> None:
        """Count one HTTP response for the hub's metrics (sent with the next batch)."""
        key = (route, str(status))
        self._responses[key] = self._responses.get(key, 0) + 1

    async def _send_batch(self) -> None:
        ends, self._ends = self._ends, []
        responses, self._responses = self._responses, {}
        progress = self.progress()
        if ends or responses or progress:
            await self._send(("batch", ends, progress, responses))

    async def _flush(self) -> None:
        # A request's end goes out at once, with the token progress up to it, so the
        # hub's books never lag behind an ended request; progress of requests still
        # streaming goes out every FLUSH_INTERVAL (the ticker wakes this loop).
        while True:
            await self._wake.wait()
            self._wake.clear()
            await self._send_batch()

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_INTERVAL)
            self._wake.set()

    async def _read(self) -> None:
        while True:
            message = pickle.loads(await self._socket.recv())
            kind = message[0]
            if kind in ("ok", "err"):
                future = self._calls.get(message[1])
                if future is not None and not future.done():
                    if kind == "ok":
                        future.set_result(message[2])
                    else:
                        future.set_exception(decode_error(message[2]))
            elif kind == "attach":
                _, name, generation, handle = message
                asyncio.get_running_loop().create_task(self._attach(name, generation, handle))

    async def _attach(self, name: str, generation: int, handle: Any) -> None:
        try:
            if self.on_attach is not None:
                await self.on_attach(name, handle)
        except Exception:
            logger.exception("worker %d: attaching %s to its new engine core failed", self.worker, name)
            return
        await self._send(("attached", name, generation))

"""The hub: one pool's books and balancers, shared by several front-end worker processes.

With ``--workers N`` a server runs N front-end processes, each attached to every
engine core (vLLM's own multi-client engine cores, see :mod:`lylm.engines._cores`), so
the per-token work (detokenization, SSE, socket writes) is spread over N processes.
What must be seen whole stays in one place, the hub, in the server's main process:
the instances' books, admission, the balancers (with their own state, such as
``prefix_aware``'s prefix table), health and restarts. Per request, a worker asks
the hub once which instance serves it (one round trip) and tells it once how it
ended; tokens never pass through the hub. The messages are in :mod:`._wire`.

**Books that converge.** The hub books a request when it chooses its instance, under
the worker's number for that choice (a *booking*). The worker ends every booking it
opened, and every heartbeat carries the set it still holds open; the hub ends any
other booking of that worker, and every booking of a worker that died. So the books
return to the truth after any lost, late or never-sent message (a worker cancelled
while it waited for the answer, a worker killed mid-stream), and a booking ended by
that rule is counted (:attr:`Hub.reconciled`): it should stay 0.

**Liveness.** The transport is callback driven (no reader task to die): a ZeroMQ
ROUTER socket whose file descriptor the event loop watches. Workers report at least
every ``HEARTBEAT`` seconds and the hub answers each heartbeat; a worker that has not
been heard from for ``WORKER_TIMEOUT`` seconds is listed as silent.

**Engine cores replaced.** Each core start has a generation number. The hub sends
every worker the new core's handle and does not wait: it offers an instance to a
worker only once that worker has said it attached to the current generation.
"""

from __future__ import annotations

import asyncio
import logging
import pickle
import time
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import anyio
import zmq

from .._books import Tally
from .._exceptions import LylmError
from .._request import RequestEnd
from . import _wire as wire
from ._socket import NOBLOCK, LoopSocket

if TYPE_CHECKING:
    from .._pool import EnginePool

logger = logging.getLogger("lylm")

HEARTBEAT = 0.25
"""Seconds between a worker's heartbeats (each carries the bookings it holds open)."""

WORKER_TIMEOUT = 2.0
"""Seconds without a message after which the hub lists a worker as silent."""

_PICKLE = pickle.HIGHEST_PROTOCOL


class WorkerState:
    """The hub's view of one front-end worker process (one incarnation of a slot)."""

    __slots__ = (
        "identity",
        "slot",
        "client_index",
        "pid",
        "bookings",
        "attached",
        "unattached",
        "last_seen",
        "ready",
        "silent",
    )

    def __init__(self, identity: bytes, slot: int, client_index: int, pid: int, now: float) -> None:
        self.identity = identity
        self.slot = slot
        self.client_index = client_index
        self.pid = pid
        #: Booking number -> the request's account, for the requests it holds.
        self.bookings: dict[int, Tally] = {}
        #: Instance name -> the generation of the engine core it attached to.
        self.attached: dict[str, int] = {}
        #: Instances it has not attached to at their current generation: not offered to it.
        self.unattached: set[str] = set()
        self.last_seen = now
        self.ready = False
        self.silent = False


class Hub:
    """The hub side, in the server's main process, over a pool of engine-core launchers.

    ``pool`` is an :class:`EnginePool` whose engines launch the engine cores and serve
    nothing themselves; the hub books the workers' requests in it. ``handlers`` answer
    ``call`` messages by name (the server registers ``health`` and ``metrics``).
    """

    def __init__(self, pool: EnginePool, *, address: str, clock: Callable[[], float] = time.monotonic) -> None:
        self.pool = pool
        self.address = address
        self.handlers: dict[str, Callable[[], Any]] = {}
        #: Instance name -> (generation, handle) of its current engine core.
        self.cores: dict[str, tuple[int, Any]] = {}
        #: Workers by identity (the connected ones; a dead one is removed).
        self.workers: dict[bytes, WorkerState] = {}
        #: Requests each worker slot was given an instance for (first tries), since start.
        self.requests_by_slot: dict[int, int] = {}
        #: HTTP responses counted by the workers, by (route, status), since the last metrics.
        self.responses: dict[tuple[str, str], int] = {}
        #: Bookings the hub ended because their worker no longer held them (or died).
        self.reconciled = 0
        #: Called with a worker's state once it serves (its first READY).
        self.on_ready: Callable[[WorkerState], None] | None = None
        self._clock = clock
        self._socket: Any = None
        self._reader: LoopSocket | None = None
        self._context: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._watchdog: asyncio.TimerHandle | None = None

    # -- lifecycle ---------------------------------------------------------------

    def bind(self) -> None:
        """Listen on the hub's address (call before the workers start)."""
        self._context = zmq.Context()
        socket = self._context.socket(zmq.ROUTER)
        socket.setsockopt(zmq.LINGER, 0)
        # A message to a worker that is gone raises instead of vanishing unseen.
        socket.setsockopt(zmq.ROUTER_MANDATORY, 1)
        socket.setsockopt(zmq.SNDHWM, 1 << 20)
        socket.setsockopt(zmq.RCVHWM, 0)
        socket.bind(self.address)
        self._socket = socket
        self._reader = LoopSocket(socket, handle=self._message, multipart=True, name="hub")

    def start(self) -> None:
        """Answer the workers from the running event loop (no task: a callback on the socket)."""
        if self._loop is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._watchdog = self._loop.call_later(HEARTBEAT, self._watch)
        assert self._reader is not None, "bind() first"
        self._reader.start(self._loop)  # and what came before the loop watched the socket

    def stop(self) -> None:
        """Stop answering (the socket stays open until :meth:`close`)."""
        if self._loop is None:
            return
        if self._watchdog is not None:
            self._watchdog.cancel()
        if self._reader is not None:
            self._reader.stop()
        self._loop = None

    async def serve(self) -> None:
        """Answer the workers until cancelled."""
        self.start()
        try:
            await anyio.sleep_forever()
        finally:
            self.stop()

    def close(self) -> None:
        """Stop and close the socket; idempotent."""
        self.stop()
        if self._socket is not None:
            self._socket.close(0)
            self._context.term()
            self._socket = None

    def ready_count(self) -> int:
        """How many connected workers serve."""
        return sum(1 for w in self.workers.values() if w.ready)

    # -- engine cores and workers, as the main process sees them ---------------------

    def core_started(self, name: str, handle: Any) -> int:
        """Instance ``name`` has a new engine core: every worker is told to attach to it, and
        the instance is offered to each worker only once that worker has. Returns its
        generation. Does not wait (it is called under the engine's GPU start lock)."""
        generation = self.cores.get(name, (0, None))[0] + 1
        self.cores[name] = (generation, handle)
        message = pickle.dumps((wire.ATTACH, name, generation, handle), protocol=_PICKLE)
        for worker in list(self.workers.values()):
            worker.unattached.add(name)
            self._send(worker.identity, message)
        return generation

    def worker_gone(self, identity: bytes) -> int:
        """A worker process is gone: end every request it held (failed). Returns how many."""
        worker = self.workers.pop(identity, None)
        if worker is None:
            return 0
        bookings = list(worker.bookings.values())
        worker.bookings.clear()
        for tally in bookings:
            self._end_lost(tally)
        return len(bookings)

    def silent_for(self, identity: bytes) -> float:
        """Seconds since the worker was last heard from, once it serves (0 for one not
        connected or still starting: importing vLLM and attaching may hold its loop)."""
        worker = self.workers.get(identity)
        if worker is None or not worker.ready:
            return 0.0
        return max(0.0, self._clock() - worker.last_seen)

    # -- the socket ----------------------------------------------------------------

    def _send(self, identity: bytes, payload: bytes) -> None:
        try:
            self._socket.send_multipart([identity, payload], flags=NOBLOCK)
        except zmq.ZMQError as exc:  # a worker that is gone (ROUTER_MANDATORY): its loss
            logger.debug("hub: a message to worker %r was not sent: %s", identity, exc)
        if self._reader is not None:
            self._reader.recheck()

    def _message(self, frames: list[bytes]) -> None:
        identity, payload = frames
        self._handle(identity, pickle.loads(payload))

    def _reply(self, identity: bytes, message: tuple[Any, ...]) -> None:
        self._send(identity, pickle.dumps(message, protocol=_PICKLE))

    # -- messages ----------------------------------------------------------------

    def _handle(self, identity: bytes, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == wire.HELLO:  # a new worker, or the same one again (reconnected): welcomed
            self._hello(identity, message)
            return
        worker = self.workers.get(identity)
        if worker is None:
            return  # a worker declared gone: what it sent before it died is moot
        worker.last_seen = self._clock()
        if worker.silent:
            worker.silent = False
            logger.warning("hub: worker %d (pid %d) answers again", worker.slot, worker.pid)
        if kind == wire.CHOOSE:
            _, booking, fields, exclude, first = message
            try:
                name = self._choose(worker, booking, fields, exclude, first)
            except LylmError as exc:
                self._reply(identity, (wire.REFUSED, booking, wire.encode_error(exc)))
            else:
                self._reply(identity, (wire.CHOSEN, booking, name))
        elif kind == wire.REPORT:
            self._report(worker, message)
        elif kind == wire.CALL:
            _, call, name = message
            self._reply(identity, self._call(call, name))
        elif kind == wire.ATTACHED:
            _, name, generation, error = message
            self._attached(worker, name, generation, error)
        elif kind == wire.DIED:
            _, name, generation, reason = message
            self._died(worker, name, generation, reason)
        elif kind == wire.READY:
            if not worker.ready:
                worker.ready = True
                if self.on_ready is not None:
                    self.on_ready(worker)
        else:
            logger.warning("hub: unknown message %r from worker %d", kind, worker.slot)

    def _hello(self, identity: bytes, message: tuple[Any, ...]) -> None:
        _, slot, client_index, pid = message
        worker = self.workers.get(identity)
        if worker is None:
            worker = self.workers[identity] = WorkerState(identity, slot, client_index, pid, self._clock())
            worker.unattached.update(self.cores)
        worker.last_seen = self._clock()
        needs = {model: self._needs(model) for model in self.pool.models}
        self._reply(identity, (wire.WELCOME, dict(self.cores), needs))

    def _needs(self, model: str) -> tuple[bool, Any]:
        # What the worker sends for the model's balancer: token ids only if it reads them,
        # and what it computes from them first (prefix hashes), where they were rendered.
        balancer = self.pool.balancer(model)
        preparer = balancer.preparer()
        if preparer is not None:
            try:
                pickle.dumps(preparer, protocol=_PICKLE)
            except Exception as exc:
                # Workers cannot get it: they send the token ids, and choose() works from them.
                logger.warning(
                    "hub: %s.preparer() returned %r, which does not pickle (%s): workers send "
                    "%r's token ids instead; make it a module-level function or a partial of one",
                    type(balancer).__name__, preparer, exc, model,
                )
                return True, None
        return bool(balancer.reads_token_ids), preparer

    def _choose(self, worker: WorkerState, booking: int, fields: Sequence[Any], exclude: Sequence[str], first: bool) -> str:
        request = wire.request_from_fields(fields)
        if worker.unattached:
            exclude = (*exclude, *worker.unattached)
        tally = self.pool._dispatch_elsewhere(request, exclude, first)
        tally.ticket = booking
        worker.bookings[booking] = tally
        if first:
            self.requests_by_slot[worker.slot] = self.requests_by_slot.get(worker.slot, 0) + 1
        return tally.instance.name

    def _report(self, worker: WorkerState, message: tuple[Any, ...]) -> None:
        _, ends, progress, live, responses, signals = message
        bookings = worker.bookings
        for fields in ends:
            booking, end = wire.end_from_fields(fields)
            tally = bookings.pop(booking, None)
            if tally is not None:
                self.pool._ended_elsewhere(tally, end)
        for booking, remaining, generated in progress:
            tally = bookings.get(booking)
            if tally is not None:
                tally.sync(remaining, generated)
        if signals:
            self._signals(signals)
        for key, count in responses.items():
            self.responses[key] = self.responses.get(key, 0) + count
        if live is not None:
            self._reconcile(worker, live)
            self._reply(worker.identity, (wire.BEAT,))

    def _reconcile(self, worker: WorkerState, live: Iterable[int]) -> None:
        bookings = worker.bookings
        held = set(live)
        if len(held) == len(bookings) and held.issuperset(bookings):
            return
        for booking in [b for b in bookings if b not in held]:
            tally = bookings.pop(booking)
            logger.warning(
                "hub: worker %d no longer holds request %s on %s: ended here",
                worker.slot, tally.request.request_id, tally.instance.name,
            )
            self._end_lost(tally)

    def _end_lost(self, tally: Tally) -> None:
        self.reconciled += 1
        self.pool._ended_elsewhere(tally, RequestEnd("failed", tally.remaining, tally.generated))

    def _signals(self, signals: dict[str, tuple[Any, ...]]) -> None:
        by_name = {i.name: i for i in self.pool.instances()}
        for name, (running, waiting, kv, queries, hits) in signals.items():
            instance = by_name.get(name)
            if instance is None:
                continue
            target = instance.engine.signals
            target.running, target.waiting, target.kv_cache_usage = running, waiting, kv
            target.prefix_cache_queries += queries
            target.prefix_cache_hits += hits

    def _call(self, call: int, name: str) -> tuple[Any, ...]:
        handler = self.handlers.get(name)
        if handler is None:
            return (wire.FAILED, call, wire.encode_error(LylmError(f"the hub has no {name!r}")))
        try:
            return (wire.ANSWER, call, handler())
        except Exception as exc:
            logger.exception("hub: %s failed", name)
            return (wire.FAILED, call, wire.encode_error(exc if isinstance(exc, LylmError) else LylmError(str(exc))))

    def _attached(self, worker: WorkerState, name: str, generation: int, error: str | None) -> None:
        if error is not None:
            logger.error(
                "hub: worker %d could not attach to %s's engine core (generation %d): %s; "
                "the instance is not offered to it", worker.slot, name, generation, error,
            )
            return
        worker.attached[name] = generation
        if self.cores.get(name, (0, None))[0] == generation:
            worker.unattached.discard(name)

    def _died(self, worker: WorkerState, name: str, generation: int, reason: str) -> None:
        # A worker saw the engine core die (vLLM told its front end): act on it now, as a
        # single process would, rather than when this process's own watch notices.
        if self.cores.get(name, (0, None))[0] != generation:
            return  # an old core: its death was handled when it was replaced
        for instance in self.pool.instances():
            if instance.name == name and instance.state == "healthy":
                self.pool._supervisor.engine_failed(instance, f"{reason} (seen by worker {worker.slot})")

    def _watch(self) -> None:
        loop = self._loop
        if loop is None:
            return
        self._watchdog = loop.call_later(HEARTBEAT, self._watch)
        try:
            # What is queued in the socket first: after a stall of this process, the
            # workers' heartbeats are waiting there and they are not silent.
            if self._reader is not None:
                self._reader.readable()
            now = self._clock()
            for worker in self.workers.values():
                if worker.ready and not worker.silent and now - worker.last_seen > WORKER_TIMEOUT:
                    worker.silent = True
                    logger.warning(
                        "hub: worker %d (pid %d) has not been heard from for %.1f s",
                        worker.slot, worker.pid, now - worker.last_seen,
                    )
        except Exception:
            logger.exception("hub: the watchdog failed")


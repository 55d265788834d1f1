"""A front-end worker's side of the hub (:mod:`._hub`): choices, ends, heartbeats.

One ZeroMQ DEALER socket, driven by callbacks on the event loop (no reader or sender
task that could die unnoticed): a callback on the socket's descriptor handles the
hub's answers, a timer every ``FLUSH_INTERVAL`` seconds reports token progress and,
every ``HEARTBEAT``, the bookings the worker holds open, and the ends of requests
go out within the loop turn that ended them.

**Every booking ends.** A booking opens when the worker asks for a choice and stays
open until :meth:`HubClient.end`; a choice whose answer the worker stops waiting for
(its client hung up, the hub was silent) is ended here, whether or not the hub has
booked it yet. The heartbeat's set of open bookings lets the hub end whatever it holds
beyond them.

**A silent hub fails requests fast.** When a heartbeat stays unanswered for
``HUB_TIMEOUT`` seconds, the choices and calls waiting for the hub fail with
:class:`HubUnavailableError` (503 with ``Retry-After``), and so do new ones at once,
until the hub answers again. Streams already running go on: their tokens never pass
through the hub.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import pickle
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import zmq

from .._exceptions import EngineError, HubUnavailableError, LylmError
from .._request import RequestEnd, RequestInfo
from . import _wire as wire
from ._hub import HEARTBEAT
from ._socket import NOBLOCK, LoopSocket

if TYPE_CHECKING:
    from .._books import Tally
    from .._instance import Outcome

logger = logging.getLogger("lylm")

FLUSH_INTERVAL = 0.05
"""Seconds between a worker's reports of token progress, engine signals and HTTP counts."""

HUB_TIMEOUT = 1.0
"""Seconds a heartbeat may stay unanswered before the worker treats the hub as unavailable."""

CALL_TIMEOUT = 10.0
"""Seconds a worker waits for one answer of a hub that does answer heartbeats."""

_PICKLE = pickle.HIGHEST_PROTOCOL

Signals = Callable[[], Mapping[str, tuple[Any, ...]]]
"""Per instance name, the engine's signals when they changed: (running, waiting, KV use,
prefix-cache queries and hits since the last call)."""


class HubClient:
    """A worker's connection to the hub (see the module docstring).

    ``slot`` is the worker's place in the server (a replacement takes the slot of the
    worker it replaces), ``client_index`` its client index on every engine core, and
    ``identity`` its name on the hub's socket, unique to this process.
    """

    def __init__(
        self,
        address: str,
        *,
        slot: int,
        client_index: int | None = None,
        identity: bytes | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.address = address
        self.slot = slot
        self.client_index = slot if client_index is None else client_index
        self.identity = identity if identity is not None else f"w{slot}.{os.getpid()}".encode()
        #: Instance name -> (generation, handle) of its engine core, from the hub's welcome.
        self.cores: dict[str, tuple[int, Any]] = {}
        #: Model -> (whether its balancer reads token ids, its preparer), from the welcome.
        self.needs: dict[str, tuple[bool, Any]] = {}
        #: Called for each ATTACH: (instance name, generation, handle). Must not block.
        self.on_attach: Callable[[str, int, Any], None] | None = None
        #: The engines' signals that changed since the last call (see :data:`Signals`).
        self.signals: Signals = dict
        self._clock = clock
        self._loop: asyncio.AbstractEventLoop | None = None
        self._socket: Any = None
        self._reader: LoopSocket | None = None
        self._context: Any = None
        self._welcome: asyncio.Future[None] | None = None
        self._bookings = itertools.count(1)
        self._call_ids = itertools.count(1)
        #: Bookings held open: None while the choice is awaited, then the request's tally.
        self._open: dict[int, Tally | None] = {}
        self._reported: dict[int, tuple[int, int]] = {}
        self._choices: dict[int, tuple[asyncio.Future[str], float]] = {}
        self._calls: dict[int, tuple[asyncio.Future[Any], float]] = {}
        self._ends: list[tuple[Any, ...]] = []
        self._responses: dict[tuple[str, str], int] = {}
        self._flush_scheduled = False
        self._timer: asyncio.TimerHandle | None = None
        self._next_beat = 0.0
        #: Since when a heartbeat has waited for the hub (None: the hub has answered since).
        self._unanswered_since: float | None = None
        self._unavailable_logged = False

    # -- lifecycle ---------------------------------------------------------------

    async def connect(self, timeout: float = 60.0) -> None:
        """Connect, say hello and wait for the hub's welcome (its engine cores)."""
        if self._socket is not None:
            return
        self._loop = loop = asyncio.get_running_loop()
        self._context = zmq.Context()
        socket = self._context.socket(zmq.DEALER)
        socket.setsockopt(zmq.IDENTITY, self.identity)
        socket.setsockopt(zmq.LINGER, 0)
        socket.setsockopt(zmq.SNDHWM, 1 << 20)
        socket.setsockopt(zmq.RCVHWM, 0)
        socket.connect(self.address)
        self._socket = socket
        self._welcome = loop.create_future()
        self._reader = LoopSocket(
            socket, handle=lambda payload: self._handle(pickle.loads(payload)), multipart=False,
            name=f"worker {self.slot}",
        )
        self._reader.start(loop)
        self._send((wire.HELLO, self.slot, self.client_index, os.getpid()))
        try:
            await asyncio.wait_for(asyncio.shield(self._welcome), timeout)
        except asyncio.TimeoutError:
            await self.close()
            raise HubUnavailableError(f"the hub did not answer within {timeout:g} s") from None
        self._next_beat = self._clock()
        self._timer = loop.call_later(FLUSH_INTERVAL, self._tick)

    async def close(self) -> None:
        """Send the ends still queued, then close; what waits for the hub fails. Idempotent."""
        if self._socket is None:
            return
        if self._timer is not None:
            self._timer.cancel()
        if self._reader is not None:
            self._reader.stop()
        self._flush()  # the ends still queued
        socket, self._socket = self._socket, None
        self._fail_waiting(lambda: EngineError("the worker is closing"))
        # A short linger: the last report should reach the hub (its ends), but a hub
        # that is gone must not hold the worker's exit.
        socket.close(linger=500)
        context, self._context = self._context, None
        await asyncio.get_running_loop().run_in_executor(None, context.term)

    @property
    def available(self) -> bool:
        """False while a heartbeat has waited longer than ``HUB_TIMEOUT`` for the hub."""
        since = self._unanswered_since
        return since is None or self._clock() - since <= HUB_TIMEOUT

    # -- what a worker asks and tells ---------------------------------------------

    async def choose(self, request: RequestInfo, exclude: Sequence[str], first: bool) -> tuple[int, str]:
        """Ask the hub for ``request``'s instance (admitting it when ``first``).

        Returns the booking and the instance's name; the booking is open until
        :meth:`end` (:meth:`hold` attaches the request's tally to it). If no answer is
        taken (an error, a cancellation, a silent hub), the booking is ended here.
        """
        self._check_available()
        loop = self._loop
        assert loop is not None
        booking = next(self._bookings)
        future: asyncio.Future[str] = loop.create_future()
        self._open[booking] = None
        self._choices[booking] = (future, self._clock() + CALL_TIMEOUT)
        reads_ids = self.needs.get(request.model, (True, None))[0]
        outcome: Outcome | None = "failed"
        try:
            self._send((wire.CHOOSE, booking, wire.request_fields(request, reads_ids), tuple(exclude), first))
            name = await future
            outcome = None
        except asyncio.CancelledError:
            outcome = "aborted"
            raise
        finally:
            self._choices.pop(booking, None)
            if outcome is not None and booking in self._open:
                # The hub may have booked it, or will when this message's turn comes:
                # end it there too (an end the hub does not know is ignored).
                self.end(booking, RequestEnd(outcome, request.token_budget))
        return booking, name

    def prepare(self, request: RequestInfo) -> RequestInfo:
        """``request`` as the hub's balancer for its model wants it (its preparer, if any)."""
        preparer = self.needs.get(request.model, (True, None))[1]
        return request if preparer is None else preparer(request)

    def hold(self, booking: int, tally: Tally) -> None:
        """The request of ``booking`` is being served: report its account's progress."""
        if booking in self._open:
            self._open[booking] = tally

    def end(self, booking: int, end: RequestEnd) -> None:
        """End ``booking`` (once; a second end is ignored): sent within this loop turn."""
        if self._open.pop(booking, _MISSING) is _MISSING:
            return
        self._reported.pop(booking, None)
        self._ends.append(wire.end_fields(booking, end))
        self._schedule_flush()

    async def call(self, name: str) -> Any:
        """The value of the hub's handler ``name`` (``health``, ``metrics``)."""
        self._check_available()
        assert self._loop is not None
        call = next(self._call_ids)
        future: asyncio.Future[Any] = self._loop.create_future()
        self._calls[call] = (future, self._clock() + CALL_TIMEOUT)
        try:
            self._send((wire.CALL, call, name))
            return await future
        finally:
            self._calls.pop(call, None)

    def ready(self) -> None:
        """Tell the hub this worker serves."""
        self._send((wire.READY,))

    def attached(self, name: str, generation: int, error: str | None = None) -> None:
        """Tell the hub this worker attached to ``name``'s core of ``generation`` (or failed to)."""
        self._send((wire.ATTACHED, name, generation, error))

    def died(self, name: str, generation: int, reason: str) -> None:
        """Tell the hub that ``name``'s engine core of ``generation`` died, as this worker saw it."""
        self._send((wire.DIED, name, generation, reason))

    def count_response(self, route: str, status: int) -> None:
        """Count one HTTP response for the hub's metrics (sent with the next report)."""
        key = (route, str(status))
        self._responses[key] = self._responses.get(key, 0) + 1

    # -- the socket ----------------------------------------------------------------

    def _send(self, message: tuple[Any, ...]) -> None:
        if self._socket is None:
            raise HubUnavailableError("this worker's connection to the hub is closed")
        try:
            self._socket.send(pickle.dumps(message, protocol=_PICKLE), flags=NOBLOCK)
        except zmq.Again:  # past a million queued messages: the hub is long gone
            raise HubUnavailableError("the hub does not take messages") from None
        if self._reader is not None:
            self._reader.recheck()

    def _readable(self) -> None:
        if self._reader is not None:
            self._reader.readable()

    def _handle(self, message: tuple[Any, ...]) -> None:
        self._unanswered_since = None
        if self._unavailable_logged:
            self._unavailable_logged = False
            logger.warning("worker %d: the hub answers again", self.slot)
        kind = message[0]
        if kind == wire.CHOSEN or kind == wire.REFUSED:
            booking = message[1]
            entry = self._choices.pop(booking, None)
            if entry is None:
                return  # no longer awaited: ended by the one who stopped waiting
            future = entry[0]
            if kind == wire.REFUSED:
                self._open.pop(booking, None)  # the hub booked nothing
                if not future.done():
                    future.set_exception(wire.decode_error(message[2]))
            elif not future.done():
                future.set_result(message[2])
        elif kind == wire.ANSWER or kind == wire.FAILED:
            call_entry = self._calls.pop(message[1], None)
            if call_entry is not None and not call_entry[0].done():
                if kind == wire.ANSWER:
                    call_entry[0].set_result(message[2])
                else:
                    call_entry[0].set_exception(wire.decode_error(message[2]))
        elif kind == wire.BEAT:
            pass
        elif kind == wire.ATTACH:
            _, name, generation, handle = message
            self.cores[name] = (generation, handle)
            if self.on_attach is not None:
                self.on_attach(name, generation, handle)
        elif kind == wire.WELCOME:
            _, cores, needs = message
            self.cores.update(cores)
            self.needs = dict(needs)
            if self._welcome is not None and not self._welcome.done():
                self._welcome.set_result(None)
        else:
            logger.warning("worker %d: unknown message %r from the hub", self.slot, kind)

    # -- reports and timeouts ------------------------------------------------------

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled and self._loop is not None:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self, live: tuple[int, ...] | None = None) -> None:
        self._flush_scheduled = False
        if self._socket is None:
            return
        ends, self._ends = self._ends, []
        progress = self._progress() if live is not None or not ends else []
        responses, self._responses = self._responses, {}
        signals = self.signals() if live is not None or not ends else {}
        if ends or progress or responses or signals or live is not None:
            try:
                self._send((wire.REPORT, ends, progress, live, responses, signals))
            except LylmError:
                logger.warning("worker %d: a report to the hub was not sent", self.slot)

    def _progress(self) -> list[tuple[int, int, int]]:
        out = []
        reported = self._reported
        for booking, tally in self._open.items():
            if tally is None or not tally.prefilled:
                continue
            state = (tally.remaining, tally.generated)
            if reported.get(booking) != state:
                reported[booking] = state
                out.append((booking, *state))
        return out

    def _tick(self) -> None:
        loop = self._loop
        if loop is None or self._socket is None:
            return
        self._timer = loop.call_later(FLUSH_INTERVAL, self._tick)
        try:
            self._readable()  # answers queued while this loop was busy count as heard
            now = self._clock()
            if now >= self._next_beat:
                self._next_beat = now + HEARTBEAT
                if self._unanswered_since is None:
                    self._unanswered_since = now
                self._flush(live=tuple(self._open))
            else:
                self._flush()
            self._expire(now)
        except Exception:
            logger.exception("worker %d: the hub client's timer failed", self.slot)

    def _check_available(self) -> None:
        if not self.available:
            self._readable()  # its answer may be waiting unread
        if not self.available:
            raise HubUnavailableError(f"the hub has not answered for more than {HUB_TIMEOUT:g} s")

    def _expire(self, now: float) -> None:
        if not self.available:
            if not self._unavailable_logged:
                self._unavailable_logged = True
                logger.warning(
                    "worker %d: the hub has not answered for %.1f s: requests get 503 until it does",
                    self.slot, now - (self._unanswered_since or now),
                )
            self._fail_waiting(lambda: HubUnavailableError(f"the hub has not answered for more than {HUB_TIMEOUT:g} s"))
            return
        for waiting in (self._choices, self._calls):
            for key, (future, deadline) in list(waiting.items()):
                if now > deadline and not future.done():
                    future.set_exception(EngineError(f"the hub did not answer within {CALL_TIMEOUT:g} s"))

    def _fail_waiting(self, error: Callable[[], LylmError]) -> None:
        for waiting in (self._choices, self._calls):
            for future, _ in list(waiting.values()):
                if not future.done():
                    future.set_exception(error())


_MISSING: Any = object()

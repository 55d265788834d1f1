"""A ZeroMQ socket read by the event loop's own callbacks: no reader task that could die unseen.

ZeroMQ's file descriptor signals edges, not levels: it wakes the loop when messages
arrive, and a send may take the signal of a message that arrived meanwhile. So the
socket is drained on every wake, and looked at again after every send of its owner
(:meth:`LoopSocket.recheck`). At most ``batch`` messages are handled a turn, so that a
flood does not hold the event loop.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import zmq

logger = logging.getLogger("lylm")

# ZeroMQ's constants as plain ints: its flag enums cost a microsecond per use.
EVENTS, POLLIN, NOBLOCK = int(zmq.EVENTS), int(zmq.POLLIN), int(zmq.NOBLOCK)


class LoopSocket:
    """Hands each message of ``socket`` to ``handle`` (its frames as a list when
    ``multipart``, else its bytes), from callbacks of the event loop it is started on.
    An exception in ``handle`` is logged (``name`` says whose) and the next message read."""

    def __init__(
        self, socket: Any, *, handle: Callable[[Any], None], multipart: bool, name: str, batch: int = 256
    ) -> None:
        self.socket = socket
        self._handle = handle
        self._receive = socket.recv_multipart if multipart else socket.recv
        self._name = name
        self._batch = batch
        self._loop: asyncio.AbstractEventLoop | None = None
        self._scheduled = False

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Watch the socket from ``loop`` (and handle what already waits)."""
        self._loop = loop
        loop.add_reader(self.socket.getsockopt(zmq.FD), self.readable)
        self.readable()

    def stop(self) -> None:
        """Stop watching (the socket stays open: its owner closes it)."""
        if self._loop is not None:
            self._loop.remove_reader(self.socket.getsockopt(zmq.FD))
            self._loop = None

    def recheck(self) -> None:
        """After a send: if input waits, read it soon (the send may have taken its signal)."""
        if not self._scheduled and self._loop is not None and self.socket.get(EVENTS) & POLLIN:
            self._scheduled = True
            self._loop.call_soon(self.readable)

    def readable(self) -> None:
        """Handle what the socket holds, ``batch`` messages at most this turn."""
        self._scheduled = False
        if self._loop is None:
            return
        receive, handle = self._receive, self._handle
        for _ in range(self._batch):
            try:
                message = receive(NOBLOCK)
            except zmq.Again:
                break
            try:
                handle(message)
            except Exception:
                logger.exception("%s: a message could not be handled", self._name)
        self.recheck()  # more waiting (a full batch, or an edge a send took): after other work

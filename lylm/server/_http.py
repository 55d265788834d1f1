"""uvicorn's HTTP/1.1 protocol (httptools), bounded: request heads have a size, a count
and a time limit.

Plain uvicorn with httptools reads a request head for as long as it takes and as
large as it comes: a 64 MB header block was accepted (the event loop stalled for
seconds meanwhile), and a thousand connections sending a byte a second were all
kept. :func:`bounded_protocol` makes the protocol class that :func:`serve
<lylm.openai.serve>` hands to uvicorn: a head larger than ``max_header_bytes`` or
with more than ``max_headers`` header lines gets a 431, one not complete within
``header_timeout`` seconds of the connection opening (or of its first byte, for
the next request on a kept-alive connection) a 408, both with ``Connection:
close``. The body's own time limit is the app's (:func:`lylm.openai._guard.read_json`),
which sees every body whichever server runs it.
"""

from __future__ import annotations

import asyncio
import math
from typing import Any, ClassVar

import attrs
import orjson
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from ..openai._guard import DEFAULT_BODY_TIMEOUT

__all__ = ["HttpLimits", "bounded_protocol"]


def _positive_int(instance: object, attribute: "attrs.Attribute[Any]", value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{attribute.name} must be a positive integer (got {value!r})")


def _positive_seconds(instance: object, attribute: "attrs.Attribute[Any]", value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{attribute.name} must be a positive number of seconds (got {value!r})")


@attrs.frozen
class HttpLimits:
    """Bounds on reading a request (the defaults sit well above any real client's)."""

    #: Request line plus headers, in bytes (nginx and Node.js take 8-16 KiB by default).
    max_header_bytes: int = attrs.field(default=64 * 1024, validator=_positive_int)
    #: Header lines per request.
    max_headers: int = attrs.field(default=128, validator=_positive_int)
    #: Seconds from a connection opening, or from the first byte of a further request on
    #: it, to the end of the request's head.
    header_timeout: float = attrs.field(default=20.0, validator=_positive_seconds)
    #: Seconds from the end of the head to the end of the body (read by the app).
    body_timeout: float = attrs.field(default=DEFAULT_BODY_TIMEOUT, validator=_positive_seconds)


def _error_body(message: str, code: str) -> bytes:
    return orjson.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}})


def _error_response(status: int, reason: bytes, message: str, code: str) -> bytes:
    body = _error_body(message, code)
    return b"".join(
        [
            b"HTTP/1.1 %d %s\r\n" % (status, reason),
            b"content-type: application/json\r\n",
            b"content-length: %d\r\n" % len(body),
            b"connection: close\r\n\r\n",
            body,
        ]
    )


class _BoundedHttpToolsProtocol(HttpToolsProtocol):
    limits: ClassVar[HttpLimits] = HttpLimits()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # State of the request head being read; "in head" from the end of the previous
        # request (or the connection's start) to on_headers_complete.
        self._in_head = True
        self._head_bytes = 0  # raw bytes received while in the head: bounds what httptools buffers
        self._head_size = 0  # request line and header bytes, as parsed
        self._head_count = 0
        self._head_timer: asyncio.TimerHandle | None = None

    # -- the head's time limit

    def _arm(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self.limits.header_timeout, self._head_timed_out)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing() or not self._in_head:
            return
        if self.cycle is not None and not self.cycle.response_complete:
            # The previous request's response is still being sent (a client that
            # pipelines): its next request is not read before that ends. Look again later.
            self._arm()
            return
        message = f"the request's head did not arrive within {self.limits.header_timeout:g} s"
        self.transport.write(_error_response(408, b"Request Timeout", message, "request_timeout"))
        self.transport.close()

    # -- asyncio protocol

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()  # a connection that never sends a byte is bounded too

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._in_head:
            self._head_bytes += len(data)
            self._arm()
        super().data_received(data)
        if self._in_head and not self.transport.is_closing() and self._over_bounds(self._head_bytes):
            # Still no end of head, and already too much of it (httptools buffers a
            # header line until it ends): refuse before reading any more.
            self._disarm()
            if self.cycle is None or self.cycle.response_complete:
                self.transport.write(
                    _error_response(431, b"Request Header Fields Too Large", self._too_large_message(), "headers_too_large")
                )
            self.transport.close()

    def _over_bounds(self, size: int) -> bool:
        return size > self.limits.max_header_bytes or self._head_count > self.limits.max_headers

    # -- httptools callbacks

    def on_message_begin(self) -> None:
        self._head_size = 0
        self._head_count = 0
        self._arm()  # the first byte of a request (perhaps in the same read as the last one's end)
        super().on_message_begin()

    def on_url(self, url: bytes) -> None:
        self._head_size += len(url)
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_size += len(name) + len(value) + 4  # ": " and CRLF
        self._head_count += 1
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._disarm()
        if not self._over_bounds(self._head_size):
            super().on_headers_complete()
            return
        # A complete head over the bounds (it came in one read): uvicorn runs a small
        # app that answers 431 in place of the real one, as it does for its own 503.
        app, self.app = self.app, self._refuse_head
        try:
            super().on_headers_complete()
        finally:
            self.app = app

    async def _refuse_head(self, scope: Any, receive: Any, send: Any) -> None:
        start = {
            "type": "http.response.start",
            "status": 431,
            "headers": [(b"content-type", b"application/json"), (b"connection", b"close")],
        }
        await send(start)
        await send({"type": "http.response.body", "body": _error_body(self._too_large_message(), "headers_too_large")})

    def _too_large_message(self) -> str:
        return (
            f"the request's head is over the server's bounds ({self.limits.max_header_bytes} bytes, "
            f"{self.limits.max_headers} header lines)"
        )

    def on_message_complete(self) -> None:
        super().on_message_complete()
        # What follows on this connection is the next request's head.
        self._in_head = True
        self._head_bytes = self._head_size = self._head_count = 0


def bounded_protocol(limits: HttpLimits) -> type[asyncio.Protocol]:
    """uvicorn's httptools protocol class, bounded by ``limits`` (pass it as ``http=``)."""
    return type("BoundedHttpToolsProtocol", (_BoundedHttpToolsProtocol,), {"limits": limits})

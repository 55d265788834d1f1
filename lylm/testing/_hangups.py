"""Clients that hang up early: what load-balancer probes, impatient clients and SDKs with
short timeouts do all day. For tests and benchmarks of a server's books.

Each client opens its own connection to ``127.0.0.1`` (or any host given), sends one
JSON POST and closes the connection ``after`` seconds later, whether or not an answer
has begun. Plain asyncio streams, no HTTP library: the hang-up is exactly timed and
nothing is read, retried or kept alive.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Mapping, Sequence
from typing import Any

import attrs
import orjson


@attrs.frozen
class HangUpReport:
    """What a round of hang-ups did: how many were sent, how many could not connect."""

    sent: int
    failed_to_connect: int


async def hang_up(host: str, port: int, path: str, body: Mapping[str, Any], after: float) -> None:
    """POST ``body`` as JSON to ``path``, then close the connection ``after`` seconds after
    the request was written, reading nothing."""
    _, writer = await asyncio.open_connection(host, port)
    payload = orjson.dumps(body)
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\n\r\n"
    ).encode()
    try:
        writer.write(head + payload)
        await writer.drain()
        if after > 0:
            await asyncio.sleep(after)
    finally:
        # Hang up: a FIN, or a reset where answer bytes are unread.
        writer.transport.abort()


async def hang_ups(
    host: str,
    port: int,
    path: str,
    body: Mapping[str, Any],
    *,
    delays: Sequence[float],
    count: int,
    concurrency: int = 32,
    seed: int = 0,
) -> HangUpReport:
    """``count`` hang-ups, ``concurrency`` at a time, each after a delay drawn from ``delays``."""
    rng = random.Random(seed)
    plan = [rng.choice(list(delays)) for _ in range(count)]
    refused = 0
    slots = asyncio.Semaphore(concurrency)

    async def one(after: float) -> None:
        nonlocal refused
        async with slots:
            try:
                await hang_up(host, port, path, body, after)
            except OSError:
                refused += 1

    await asyncio.gather(*(one(after) for after in plan))
    return HangUpReport(sent=count, failed_to_connect=refused)

"""What the hub and its front-end workers say to each other.

Messages are pickled tuples whose first item names their kind. Both ends are the
same program of the same user on the same host (a ZeroMQ IPC path in a private
directory), so pickle is safe here and the cheapest encoding there is.

worker -> hub::

    (HELLO, slot, client_index, pid)                        -> (WELCOME, cores, needs)
    (CHOOSE, booking, request fields, exclude, first)      -> (CHOSEN, booking, name) | (REFUSED, booking, error)
    (CALL, call, name)                                      -> (ANSWER, call, value) | (FAILED, call, error)
    (REPORT, ends, progress, live, responses, signals)      -> (BEAT,) when ``live`` is not None
    (ATTACHED, name, generation, error or None)
    (DIED, name, generation, reason)
    (READY,)

hub -> worker: the replies above, and (ATTACH, name, generation, handle) when an
instance's engine core was (re)started.

A *booking* is a worker's number for one choice the hub made for it (a retried request
has one per instance tried). The hub books the request as in flight when it chooses;
the worker ends every booking it opened, with a :class:`RequestEnd` (``ends``), also a
choice whose answer it no longer waited for. ``progress`` brings each streaming
booking's account to its current state (``(booking, remaining, generated)``); ``live``,
sent with every heartbeat, is the set of bookings the worker holds open: the hub ends
any other booking of that worker, so its books converge to the worker's whatever
message was lost. Messages from one worker arrive in the order it sent them (one
ZeroMQ connection), so a booking is never ended before it was made.
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from typing import Any

from .. import _exceptions
from .._exceptions import EngineError, LylmError
from .._request import RequestEnd, RequestInfo

HELLO, WELCOME = "hello", "welcome"
CHOOSE, CHOSEN, REFUSED = "choose", "chosen", "refused"
CALL, ANSWER, FAILED = "call", "answer", "failed"
REPORT, BEAT = "report", "beat"
ATTACH, ATTACHED, DIED, READY = "attach", "attached", "died", "ready"


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


def request_fields(request: RequestInfo, token_ids: bool) -> tuple[Any, ...]:
    """``request`` as a picklable tuple: its prompt's token ids only when the balancer reads
    them (``token_ids``), prefix hashes packed (a 4,096-token prompt's 256 hashes pickle as
    one 2 KB string, not 256 integers)."""
    ids: Any = ()
    if token_ids:
        ids = request.prompt_token_ids
        if not isinstance(ids, (bytes, tuple)):
            ids = tuple(ids)
    hashes: Any = request.prefix_hashes
    if hashes:
        hashes = array("q", hashes).tobytes()
    return (
        request.model,
        request.request_id,
        request.prompt_tokens,
        request.max_tokens,
        request.n,
        ids,
        hashes,
        request.session_key,
    )


def request_from_fields(fields: Sequence[Any]) -> RequestInfo:
    """The :class:`RequestInfo` that :func:`request_fields` described."""
    model, request_id, prompt_tokens, max_tokens, n, ids, hashes, session_key = fields
    if hashes:
        packed = array("q")
        packed.frombytes(hashes)
        hashes = tuple(packed)
    return RequestInfo(model, request_id, prompt_tokens, max_tokens, n, ids, hashes or (), session_key)


def end_fields(booking: int, end: RequestEnd) -> tuple[Any, ...]:
    """One booking's end as a plain tuple (a tuple pickles faster than the record)."""
    return (
        booking, end.outcome, end.remaining, end.generated_tokens, end.time_to_first_token, end.latency,
        end.cached_tokens,
    )  # fmt: skip


def end_from_fields(fields: Sequence[Any]) -> tuple[int, RequestEnd]:
    """The booking and :class:`RequestEnd` that :func:`end_fields` described."""
    booking, outcome, remaining, generated, first_token, latency, cached = fields
    return booking, RequestEnd(outcome, remaining, generated, first_token, latency, cached)

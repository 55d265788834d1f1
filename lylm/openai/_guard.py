"""What a request must pass before any handler runs: its API key and its body size."""

from __future__ import annotations

import hmac
from collections.abc import Iterable
from typing import Any

import anyio
import orjson
from starlette.requests import Request

from ._errors import OpenAIError, bad_request

#: JSON nested deeper than this is refused: no valid request comes near it, and
#: recursive handling of hostile depth is a cheap way to hurt a server.
MAX_JSON_DEPTH = 32

#: Seconds a request's body may take to arrive, from the end of its head.
DEFAULT_BODY_TIMEOUT = 60.0


class ApiKeys:
    """The accepted API keys; checked in constant time, never logged or shown."""

    def __init__(self, keys: Iterable[str]) -> None:
        given = list(keys)
        if any(not k for k in given):
            # An empty key is a mistake (an unset variable), never a key to accept or skip.
            raise ValueError("api_keys holds an empty key")
        self._keys = [k.encode() for k in given]
        if not self._keys:
            raise ValueError("api_keys is empty: pass None to serve without keys")

    def __repr__(self) -> str:
        return f"<ApiKeys: {len(self._keys)} key(s)>"

    def check(self, request: Request) -> None:
        """Raise a 401 unless the request carries ``Authorization: Bearer <a valid key>``."""
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        given = token.strip().encode()
        # Compare against every key, without stopping early, so timing reveals nothing.
        ok = False
        for key in self._keys:
            ok |= hmac.compare_digest(given, key)
        if scheme.lower() != "bearer" or not given or not ok:
            raise OpenAIError(
                401,
                "Incorrect or missing API key: send 'Authorization: Bearer <key>'.",
                code="invalid_api_key",
            )


_CONTAINERS = (dict, list)


def _depth_ok(value: Any) -> bool:
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            return False
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        # Only containers can nest further: a list of millions of token ids is looked at
        # once, at C speed (the types it holds), not pushed element by element.
        if children and not {dict, list}.isdisjoint(set(map(type, children))):
            stack.extend((v, depth + 1) for v in children if isinstance(v, _CONTAINERS))
    return True


async def read_json(request: Request, max_bytes: int, timeout: float = DEFAULT_BODY_TIMEOUT) -> Any:
    """The request body as JSON: 413 past ``max_bytes``, 408 if it takes longer than
    ``timeout`` seconds to arrive, 400 if it is not (sane) JSON."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise _too_large(max_bytes)
    body = bytearray()
    with anyio.move_on_after(timeout) as reading:
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_bytes:  # a lying or missing Content-Length
                raise _too_large(max_bytes)
    if reading.cancelled_caught:
        # A client sending a byte now and then holds a connection and a task: bounded.
        # Connection: close, or the server would go on reading the rest of the body.
        raise OpenAIError(
            408,
            f"the request body did not arrive within {timeout:g} s",
            code="request_timeout",
            headers={"Connection": "close"},
        )
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise bad_request(f"the request body is not valid JSON: {exc}", code="invalid_json") from None
    if not _depth_ok(data):
        raise bad_request(f"the request body nests deeper than {MAX_JSON_DEPTH} levels", code="invalid_json")
    return data


def _too_large(max_bytes: int) -> OpenAIError:
    return OpenAIError(413, f"the request body exceeds {max_bytes} bytes", code="request_too_large")

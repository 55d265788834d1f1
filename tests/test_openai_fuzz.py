"""Property-based fuzzing of the HTTP API (part of issue 5): whatever a client sends,
the answer is never a 5xx and the server stays healthy; and the hostile requests of
issue 15 (a huge token-id prompt, a huge or never-ending request head, a body that
never ends) are refused without the server reading them to the end.

Runs against the real adapter under uvicorn on 127.0.0.1, its HTTP protocol bounded
as ``lylm.openai.serve`` bounds it (short time limits here), with FakeEngines behind it
(the property is about the front end, and 2,000 cases must stay fast).
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from _helpers import fake_specs
from _server import uvicorn_thread
from lylm import EnginePool
from lylm.openai import create_app
from lylm.server import HttpLimits
from lylm.testing import FakeEngine

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=12,
)

CHAT = {"model": "fake", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
COMPLETION = {"model": "fake", "prompt": "hi", "max_tokens": 4}
KNOWN_KEYS = sorted(
    {"model", "messages", "prompt", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k",
     "min_p", "n", "stop", "seed", "presence_penalty", "frequency_penalty", "repetition_penalty", "logprobs",
     "top_logprobs", "response_format", "ignore_eos", "user", "stream", "stream_options"}
)


@st.composite
def bodies(draw: st.DrawFn) -> tuple[str, bytes]:
    path = draw(st.sampled_from(["/v1/chat/completions", "/v1/completions"]))
    kind = draw(st.sampled_from(["mutated", "mutated", "mutated", "any json", "raw bytes"]))
    if kind == "raw bytes":
        return path, draw(st.binary(max_size=64))
    if kind == "any json":
        return path, json.dumps(draw(json_values)).encode()
    body: dict[str, Any] = dict(CHAT if "chat" in path else COMPLETION)
    for key in draw(st.lists(st.sampled_from(KNOWN_KEYS), min_size=1, max_size=3)):
        body[key] = draw(json_values | st.integers(-5, 5) | st.sampled_from([True, "stop", [1, 2], {"type": "json_object"}]))
    # json, not orjson: it also writes what a hostile client could (huge ints, Infinity).
    return path, json.dumps(body).encode()


LIMITS = HttpLimits(max_header_bytes=16 * 1024, max_headers=50, header_timeout=1.0, body_timeout=1.0)
CONTEXT = 4096


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    pool = EnginePool.from_config(
        fake_specs([1.0, 2.0], model="fake"), engine_factory=lambda s: FakeEngine(max_model_len=CONTEXT)
    )
    with uvicorn_thread(create_app(pool, body_timeout=LIMITS.body_timeout), limits=LIMITS) as url:
        yield url


@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=bodies())
@pytest.mark.slow
def test_no_input_gets_a_5xx(server: str, case: tuple[str, bytes]) -> None:
    path, body = case
    r = httpx.post(server + path, content=body, headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code < 500, (path, body, r.status_code, r.text)
    if r.status_code >= 400:
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}


def test_server_is_healthy_after_the_fuzzing(server: str) -> None:
    health = httpx.get(f"{server}/health").json()
    assert health["status"] == "ok"
    assert all(e["in_flight_requests"] == 0 for e in health["models"]["fake"]["engines"])


def test_a_huge_token_id_prompt_is_refused_as_too_long(server: str) -> None:
    # 3.5M ids (7 MB, inside the body limit): context_length_exceeded, the server healthy.
    ids = ",".join(["7"] * 3_500_000)
    body = f'{{"model": "fake", "prompt": [{ids}], "max_tokens": 1}}'.encode()
    r = httpx.post(f"{server}/v1/completions", content=body, headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert httpx.get(f"{server}/health", timeout=30).status_code == 200


def _connect(server: str) -> socket.socket:
    host, port = server.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    return sock


def _read_response(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (10 s deadline per read)."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def _status(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


def test_a_huge_header_block_gets_431_before_it_is_read(server: str) -> None:
    # The server stops reading at its bound and closes: of 64 MB offered, a sliver is sent.
    sock = _connect(server)
    sent = 0
    line = b"x-filler: " + b"a" * 1000 + b"\r\n"
    try:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\n")
        while sent < 64 * 1024 * 1024:
            sock.sendall(line * 64)
            sent += len(line) * 64
    except (BrokenPipeError, ConnectionResetError):
        pass
    assert sent < 16 * 1024 * 1024, f"the server read {sent} bytes of header"
    try:
        response = _read_response(sock)
        assert _status(response) == 431, response[:200]
        assert json.loads(response.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "headers_too_large"
    except ConnectionResetError:
        pass  # the 431 was sent, but the kernel reset the connection over the unread bytes
    finally:
        sock.close()
    assert httpx.get(f"{server}/health", timeout=30).status_code == 200


@pytest.mark.parametrize("count, size", [(200, 10), (1, 20_000)], ids=["too many headers", "one header too large"])
def test_a_complete_head_over_the_bounds_gets_431(server: str, count: int, size: int) -> None:
    headers = {f"x-h{i}": "v" * size for i in range(count)}
    r = httpx.post(f"{server}/v1/completions", json=COMPLETION, headers=headers, timeout=30)
    assert r.status_code == 431 and r.json()["error"]["code"] == "headers_too_large"
    assert r.headers["connection"] == "close"
    # Within the bounds: served.
    r = httpx.post(f"{server}/v1/completions", json=COMPLETION, headers={"x-h": "v" * 8000}, timeout=30)
    assert r.status_code == 200


@pytest.mark.parametrize(
    "sent",
    [b"", b"POST /v1/completions HTTP/1.1\r\nhost: x\r\n", b"GET /health HTTP/1.1\r\nhost: x\r\n\r\nGET /he"],
    ids=["nothing", "half a head", "a second head, half"],
)
def test_a_head_that_never_ends_gets_408_and_the_connection_closes(server: str, sent: bytes) -> None:
    sock = _connect(server)
    try:
        sock.sendall(sent)
        response = _read_response(sock)  # returns when the server closes
    finally:
        sock.close()
    last = response[response.rfind(b"HTTP/1.1 "):]
    assert _status(last) == 408, response
    assert b"connection: close" in last.lower()


def test_a_body_that_never_ends_gets_408_and_the_connection_closes(server: str) -> None:
    sock = _connect(server)
    try:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{\"mod")
        began = time.monotonic()
        response = _read_response(sock)
    finally:
        sock.close()
    assert _status(response) == 408, response
    assert json.loads(response.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "request_timeout"
    assert time.monotonic() - began < 10  # not kept for the socket's own deadline

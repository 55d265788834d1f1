"""Property-based fuzzing of the HTTP API (part of issue 5): whatever a client sends,
the answer is never a 5xx and the server stays healthy.

Runs against the real adapter under uvicorn on 127.0.0.1 with FakeEngines behind it
(the property is about the front end, and 2,000 cases must stay fast).
"""

from __future__ import annotations

import json
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


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    pool = EnginePool.from_config(fake_specs([1.0, 2.0], model="fake"), engine_factory=lambda s: FakeEngine())
    with uvicorn_thread(create_app(pool)) as url:
        yield url


@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=bodies())
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

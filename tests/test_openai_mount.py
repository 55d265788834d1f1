"""lylm.openai's routes inside a user's own Starlette app, under a prefix, served by
uvicorn on 127.0.0.1 and called with the openai client (FakeEngines behind it)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route

from _helpers import fake_specs
from _server import uvicorn_thread
from lylm import EnginePool
from lylm.openai import create_app, routes
from lylm.testing import FakeEngine


@pytest.fixture(scope="module")
def mounted() -> Iterator[tuple[str, EnginePool]]:
    pool = EnginePool.from_config(
        fake_specs([1.0, 2.0], model="fake"), engine_factory=lambda spec: FakeEngine(token_delay=0.001)
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with pool:  # the user's app owns the pool's lifecycle
            yield

    async def home(request: Request) -> PlainTextResponse:
        return PlainTextResponse("the user's own app")

    app = Starlette(routes=[Route("/", home), Mount("/llm", routes=routes(pool))], lifespan=lifespan)
    with uvicorn_thread(app) as url:
        yield url, pool


def test_routes_serve_under_the_users_prefix(mounted: tuple[str, EnginePool]) -> None:
    url, pool = mounted
    assert httpx.get(f"{url}/").text == "the user's own app"
    client = openai.OpenAI(base_url=f"{url}/llm/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list()] == ["fake"]
    r = client.chat.completions.create(model="fake", messages=[{"role": "user", "content": "hi"}], max_tokens=5)
    assert r.usage is not None and r.usage.completion_tokens == 5
    assert r.choices[0].finish_reason == "length"
    r2 = client.completions.create(model="fake", prompt="hi", max_tokens=3, stream=True)
    assert [c.choices[0].text for c in r2] == [" ", "!", '"']
    assert httpx.get(f"{url}/llm/health").json()["status"] == "ok"
    assert "lylm_requests_total" in httpx.get(f"{url}/llm/metrics").text


def test_non_streaming_request_is_aborted_when_the_client_leaves(mounted: tuple[str, EnginePool]) -> None:
    url, pool = mounted
    engines = [i.engine for i in pool.instances()]
    for e in engines:
        e.token_delay = 0.01  # type: ignore[attr-defined]
    try:
        with pytest.raises(httpx.ReadTimeout):
            # 2,000 tokens take 20 s; the client gives up after 0.5 s.
            httpx.post(f"{url}/llm/v1/completions", json={"model": "fake", "prompt": "hi", "max_tokens": 2000}, timeout=0.5)
        # A bound that catches "never aborted", not a slow machine: it is met in milliseconds.
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline and any(i.in_flight_requests for i in pool.instances()):
            time.sleep(0.02)
        assert [i.in_flight_requests for i in pool.instances()] == [0, 0]
        assert sum(i.aborted for i in pool.instances()) == 1
    finally:
        for e in engines:
            e.token_delay = 0.001  # type: ignore[attr-defined]


def test_no_healthy_engine_is_a_503() -> None:
    # A pool of its own: it kills every engine (restart=None keeps them dead).
    pool = EnginePool.from_config(fake_specs([1.0, 2.0], model="fake"), engine_factory=lambda spec: FakeEngine(), restart=None)
    with uvicorn_thread(create_app(pool)) as url:
        for instance in pool.instances():
            instance.engine.kill()  # type: ignore[attr-defined]
        r = httpx.post(f"{url}/v1/completions", json={"model": "fake", "prompt": "hi"})
        assert r.status_code == 503
        assert r.json()["error"]["code"] == "no_healthy_engine"
        assert r.headers["retry-after"] == "5"  # restarts take seconds: when to try again
        assert httpx.get(f"{url}/health").status_code == 503


@pytest.fixture(scope="module")
def guarded() -> Iterator[str]:
    pool = EnginePool.from_config(fake_specs([1.0], model="fake"), engine_factory=lambda spec: FakeEngine())
    app = create_app(pool, api_keys=["key-one", "key-two"], max_body_bytes=2048)
    with uvicorn_thread(app) as url:
        yield url


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({}, 401),
        ({"authorization": "Bearer wrong"}, 401),
        ({"authorization": "key-one"}, 401),  # no scheme
        ({"authorization": "Basic key-one"}, 401),
        ({"authorization": "Bearer key-one"}, 200),
        ({"authorization": "Bearer key-two"}, 200),
    ],
)
def test_api_keys(guarded: str, headers: dict[str, str], status: int) -> None:
    r = httpx.post(f"{guarded}/v1/completions", json={"model": "fake", "prompt": "hi", "max_tokens": 2}, headers=headers)
    assert r.status_code == status, r.text
    if status == 401:
        assert r.json()["error"]["code"] == "invalid_api_key"
        assert "key-one" not in r.text
    # Health and metrics stay open unless keys_for_health is set.
    assert httpx.get(f"{guarded}/health").status_code == 200


def test_api_keys_are_compared_in_constant_time(guarded: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import hmac

    from lylm.openai import _guard

    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(_guard.hmac, "compare_digest", spy)
    r = httpx.get(f"{guarded}/v1/models", headers={"authorization": "Bearer key-one"})
    assert r.status_code == 200
    # Every key is compared, even after the first one matched.
    assert calls == [(b"key-one", b"key-one"), (b"key-one", b"key-two")]


def test_openai_client_with_a_key(guarded: str) -> None:
    good = openai.OpenAI(base_url=f"{guarded}/v1", api_key="key-two", max_retries=0)
    assert [m.id for m in good.models.list()] == ["fake"]
    bad = openai.OpenAI(base_url=f"{guarded}/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_keys_for_health_covers_health_and_metrics() -> None:
    pool = EnginePool.from_config(fake_specs([1.0], model="fake"), engine_factory=lambda spec: FakeEngine())
    with uvicorn_thread(create_app(pool, api_keys=["k"], keys_for_health=True)) as url:
        assert httpx.get(f"{url}/health").status_code == 401
        assert httpx.get(f"{url}/metrics").status_code == 401
        assert httpx.get(f"{url}/health", headers={"authorization": "Bearer k"}).status_code == 200


def test_body_limit_and_hostile_json(guarded: str) -> None:
    auth = {"authorization": "Bearer key-one"}
    big = {"model": "fake", "prompt": "x" * 4096}
    r = httpx.post(f"{guarded}/v1/completions", json=big, headers=auth)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit must hold while reading
        yield b'{"model": "fake", "prompt": "'
        for _ in range(8):
            yield b"x" * 512
        yield b'"}'

    r = httpx.post(f"{guarded}/v1/completions", content=chunks(), headers=auth)
    assert r.status_code == 413
    deep = b"[" * 40 + b"]" * 40
    r = httpx.post(f"{guarded}/v1/completions", content=deep, headers=auth)
    assert r.status_code == 400 and "nests deeper" in r.json()["error"]["message"]
    r = httpx.post(f"{guarded}/v1/completions", content=b'{"model": "\xff\xfe"}', headers=auth)
    assert r.status_code == 400


def test_past_the_admission_limit_is_a_429_with_retry_after() -> None:
    pool = EnginePool.from_config(
        fake_specs([1.0], model="fake"),
        engine_factory=lambda spec: FakeEngine(token_delay=0.01),
        max_in_flight_requests=1,
    )
    with uvicorn_thread(create_app(pool)) as url:
        body = {"model": "fake", "prompt": "hi", "max_tokens": 100, "stream": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=30) as first:
            lines = first.iter_lines()
            next(lines)  # the first request holds the only slot
            r = httpx.post(f"{url}/v1/completions", json={"model": "fake", "prompt": "hi", "max_tokens": 2})
            assert r.status_code == 429
            assert r.headers["retry-after"] == "1"
            assert r.json()["error"]["code"] == "model_at_capacity"
            assert [line for line in lines if line][-1] == "data: [DONE]"  # the admitted one finishes
        r = httpx.post(f"{url}/v1/completions", json={"model": "fake", "prompt": "hi", "max_tokens": 2})
        assert r.status_code == 200


@pytest.mark.parametrize("value", ["", ",", "key-one,", " , "])
def test_an_empty_api_key_never_opens_the_server(value: str) -> None:
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "LYLM_API_KEYS": value}
    # The check runs before any engine starts, so the process exits at once.
    out = subprocess.run(
        [sys.executable, "-m", "lylm", "serve", "--port", "1"], env=env, capture_output=True, text=True, timeout=120,
        cwd=root,
    )
    assert out.returncode == 2 and "LYLM_API_KEYS holds an empty API key" in out.stderr
    with pytest.raises(ValueError, match="empty key"):
        create_app(EnginePool.from_config(fake_specs([1.0])), api_keys=["k", ""])


def test_a_request_larger_than_the_admission_limit_is_a_400_not_a_429() -> None:
    pool = EnginePool.from_config(
        fake_specs([1.0], model="fake"), engine_factory=lambda spec: FakeEngine(), max_in_flight_requests=2
    )
    with uvicorn_thread(create_app(pool)) as url:
        # Three prompts are three requests in flight: never admissible under a limit of 2,
        # on an idle server too, so no Retry-After could help.
        r = httpx.post(f"{url}/v1/completions", json={"model": "fake", "prompt": ["a", "b", "c"]}, timeout=60)
        assert r.status_code == 400 and "retry-after" not in r.headers
        assert (r.json()["error"]["param"], r.json()["error"]["code"]) == ("prompt", "too_many_prompts")
        two = httpx.post(f"{url}/v1/completions", json={"model": "fake", "prompt": ["a", "b"]}, timeout=60)
        assert two.status_code == 200 and len(two.json()["choices"]) == 2


@pytest.mark.anyio
async def test_a_refused_request_leaves_no_cycle_holding_its_prompt() -> None:
    # A prompt too long for the context is refused after rendering; before the fix, the
    # exception's traceback and the dispatcher's error list formed a cycle that kept every
    # refused prompt's token list alive until a full collection (issue 15, item 5).
    import gc
    import warnings

    with warnings.catch_warnings():  # vLLM's import chatter, when this test runs first
        warnings.simplefilter("ignore")
        import vllm.sampling_params  # noqa: F401

    pool = EnginePool.from_config(fake_specs([1.0], model="fake"), engine_factory=lambda s: FakeEngine(max_model_len=64))
    app = create_app(pool, manage_pool=False)
    marker = [ord("y")] * 300  # the fake engine's tokens are the prompt's bytes
    async with pool, httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://lylm") as client:
        gc.collect()
        gc.disable()
        try:
            for _ in range(5):
                r = await client.post("/v1/completions", json={"model": "fake", "prompt": "y" * 300, "max_tokens": 1})
                assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
            alive = sum(1 for o in gc.get_objects() if type(o) is list and o is not marker and o == marker)
        finally:
            gc.enable()
    assert alive == 0


@pytest.mark.anyio
async def test_a_client_that_leaves_while_sending_its_body_is_counted_as_499_not_500(
    caplog: pytest.LogCaptureFixture,
) -> None:
    pool = EnginePool.from_config(fake_specs([1.0], model="fake"), engine_factory=lambda s: FakeEngine())
    app = create_app(pool, manage_pool=False)
    incoming = [
        {"type": "http.request", "body": b'{"model": "fake", "pro', "more_body": True},
        {"type": "http.disconnect"},
    ]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return incoming.pop(0) if incoming else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
        "path": "/v1/completions", "raw_path": b"/v1/completions", "query_string": b"", "root_path": "",
        "headers": [(b"content-type", b"application/json"), (b"content-length", b"100")],
        "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 8000),
    }  # fmt: skip
    async with pool:
        await app(scope, receive, send)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://lylm") as client:
            metrics = (await client.get("/metrics")).text
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 499
    assert 'lylm_http_responses_total{route="/v1/completions",status="499"} 1.0' in metrics
    assert 'status="500"' not in metrics
    assert "unexpected error" not in caplog.text


def test_a_token_id_prompt_longer_than_the_context_is_refused_before_its_ids_are_checked() -> None:
    # Rejecting a huge prompt must cost no more than accepting a valid one (issue 15,
    # item 3): its length is compared with the context first. The last id is invalid, so
    # had every id been checked first, the error would name it instead.
    pool = EnginePool.from_config(fake_specs([1.0], model="fake"), engine_factory=lambda s: FakeEngine(max_model_len=64))
    with uvicorn_thread(create_app(pool)) as url:
        for path, key in (("/v1/completions", "prompt"), ("/v1/embeddings", "input")):
            for prompt in ([7] * 100 + [-1], [[1, 2], [7] * 100 + [-1]]):
                r = httpx.post(f"{url}{path}", json={"model": "fake", key: prompt}, timeout=60)
                assert r.status_code == 400, r.text
                assert (r.json()["error"]["code"], r.json()["error"]["param"]) == ("context_length_exceeded", key)
        # Within the context, each id is still checked.
        r = httpx.post(f"{url}/v1/completions", json={"model": "fake", "prompt": [7, -1]}, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt[1]"

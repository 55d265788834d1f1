"""lylm.openai's routes inside a user's own Starlette app, under a prefix, served by
uvicorn on 127.0.0.1 and called with the openai client (FakeEngines behind it)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator

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
from lylm.openai import routes
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


def test_no_healthy_engine_is_a_503(mounted: tuple[str, EnginePool]) -> None:
    url, pool = mounted
    for instance in pool.instances():
        instance.engine.kill()  # type: ignore[attr-defined]
    r = httpx.post(f"{url}/llm/v1/completions", json={"model": "fake", "prompt": "hi"})
    assert r.status_code == 503
    assert r.json()["error"]["code"] == "no_healthy_engine"
    assert httpx.get(f"{url}/llm/health").status_code == 503

"""Engine failures as HTTP clients see them (FakeEngines behind a real uvicorn on
127.0.0.1): a 503 before the first byte, an SSE error event then [DONE] mid-stream,
retries they never notice, and engine states in /health and /metrics."""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import anyio.from_thread
import httpx
import openai
import pytest

from _helpers import fake_specs
from _server import metric, uvicorn_thread
from lylm import EnginePool, EngineSpec, RestartPolicy
from lylm.openai import create_app
from lylm.testing import FakeEngine

MODEL = "fake"


class Gated(FakeEngine):
    """A FakeEngine whose restarts (every start after the first of its kind) wait for ``gate``."""

    gate = threading.Event()
    starts = 0

    async def start(self) -> None:
        type(self).starts += 1
        if type(self).starts > 2:
            while not self.gate.is_set():
                await anyio.sleep(0.01)
        await super().start()


@pytest.fixture()
def served() -> Iterator[Callable[..., tuple[str, EnginePool]]]:
    """A factory: serve a pool of FakeEngines made by ``make`` with ``create_app``."""
    stack: list[Any] = []

    def serve(n: int, make: Callable[[EngineSpec], FakeEngine], **options: Any) -> tuple[str, EnginePool]:
        options.setdefault("health_interval", 0.01)
        pool = EnginePool.from_config(
            fake_specs([1.0] * n, model=MODEL), engine_factory=make, rng=random.Random(5), **options
        )
        context = uvicorn_thread(create_app(pool))
        url = context.__enter__()
        stack.append(context)
        return url, pool

    yield serve
    for context in reversed(stack):
        context.__exit__(None, None, None)


def wait_for(condition: Callable[[], bool], what: str, limit: float = 10.0) -> None:
    deadline = time.monotonic() + limit
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert condition(), f"still waiting for: {what}"


def test_an_engine_dying_mid_stream_ends_it_with_an_error_event_then_done(served: Any) -> None:
    url, pool = served(1, lambda s: FakeEngine(token_delay=0.02), restart=None)
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 500, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=30) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        assert next(lines).startswith("data: {")
        pool.instances()[0].engine.kill()  # type: ignore[attr-defined]
        rest = [line for line in lines if line]
    assert rest[-1] == "data: [DONE]"
    error = json.loads(rest[-2].removeprefix("data: "))["error"]
    assert error["code"] == "engine_dead" and error["type"] == "service_unavailable"
    # The official client surfaces it as an error, not as a silently short answer.
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.APIStatusError) as info:
        client.completions.create(model=MODEL, prompt="hi", max_tokens=5)
    assert info.value.status_code == 503


def test_death_before_the_first_token_is_retried_or_a_503_before_any_byte(served: Any) -> None:
    url, pool = served(2, lambda s: FakeEngine(prefill_delay=0.3), restart=None)
    a, b = pool.instances()
    a.weight, b.weight = 1.0, 1e-9  # the first choice is a
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=30)
    result: list[Any] = []
    thread = threading.Thread(
        target=lambda: result.append(client.completions.create(model=MODEL, prompt="hi", max_tokens=3))
    )
    thread.start()
    wait_for(lambda: a.in_flight_requests == 1, "the request on a")
    a.engine.kill()  # type: ignore[attr-defined]
    thread.join(30)
    assert result and result[0].choices[0].finish_reason == "length"  # served whole by b
    assert (a.failed, b.completed) == (1, 1)

    # With no engine left to retry on, the client gets a 503 and no partial stream.
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 3, "stream": True}
    statuses: list[tuple[int, bytes, str | None]] = []

    def call() -> None:
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=30) as r:
            statuses.append((r.status_code, r.read(), r.headers.get("retry-after")))

    thread = threading.Thread(target=call)
    thread.start()
    wait_for(lambda: b.in_flight_requests == 1, "the request on b")
    b.engine.kill()  # type: ignore[attr-defined]
    thread.join(30)
    ((status, raw, retry_after),) = statuses
    assert status == 503 and json.loads(raw)["error"]["code"] == "engine_dead" and retry_after == "5"


def test_health_and_metrics_show_each_state_through_a_restart(served: Any) -> None:
    Gated.gate.clear()
    Gated.starts = 0
    policy = RestartPolicy(initial_backoff=0.01)
    url, pool = served(2, lambda s: Gated(), restart=policy)
    a = pool.instances()[0]

    def states() -> list[tuple[str, bool, int]]:
        health = httpx.get(f"{url}/health").json()
        return [(e["state"], e["healthy"], e["restarts"]) for e in health["models"][MODEL]["engines"]]

    assert states() == [("healthy", True, 0), ("healthy", True, 0)]
    a.engine.kill()  # type: ignore[attr-defined]
    wait_for(lambda: a.state == "restarting", "a restarting")
    assert states() == [("restarting", False, 0), ("healthy", True, 0)]
    health = httpx.get(f"{url}/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"  # the model still serves
    assert "killed" in health.json()["models"][MODEL]["engines"][0]["last_error"]
    state = metric(url, "lylm_engine_state")
    assert state[f'{{engine="0",model="{MODEL}",state="restarting"}}'] == 1
    assert state[f'{{engine="0",model="{MODEL}",state="healthy"}}'] == 0
    assert state[f'{{engine="1",model="{MODEL}",state="healthy"}}'] == 1
    Gated.gate.set()
    wait_for(lambda: a.state == "healthy", "a restarted")
    assert states() == [("healthy", True, 1), ("healthy", True, 0)]
    assert metric(url, "lylm_engine_restarts_total")[f'{{engine="0",model="{MODEL}"}}'] == 1


def test_a_draining_pool_answers_503_and_health_says_so(served: Any) -> None:
    url, pool = served(1, lambda s: FakeEngine(token_delay=0.02))
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 40, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=30) as first:
        lines = first.iter_lines()
        next(lines)
        with anyio.from_thread.start_blocking_portal() as portal:
            future = portal.start_task_soon(pool.drain, 30)
            wait_for(lambda: pool.draining, "draining")
            r = httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": "hi"})
            assert r.status_code == 503 and r.headers["retry-after"] == "1"
            assert r.headers["connection"] == "close"  # no idle connection left to cut off
            assert r.json()["error"]["code"] == "shutting_down"
            health = httpx.get(f"{url}/health")
            assert health.status_code == 503 and health.json()["status"] == "draining"
            # The model list too: not a 200 with no context length (its engines are stopping).
            models = httpx.get(f"{url}/v1/models")
            assert models.status_code == 503 and models.json()["error"]["code"] == "shutting_down"
            assert [line for line in lines if line][-1] == "data: [DONE]"  # in flight: finishes
            assert future.result(30) is True

"""Failure edges of one server process (issue 26, item 8): bad timing gets a clear answer
and loses nothing.

- The drain deadline: while a pool is being closed (its engines stopping, seconds with
  vLLM), new requests are refused as during the drain (``ShuttingDownError``: 503
  ``shutting_down`` with ``Retry-After``) and ``/health`` says ``draining``.
"""

from __future__ import annotations

import json
import random
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import anyio
import httpx
import pytest

from _helpers import fake_specs, until
from _server import ServerProcess
from lylm import EnginePool, EngineSpec, ShuttingDownError
from lylm.openai._monitor import health_report
from lylm.testing import FakeEngine, FakeSamplingParams

pytestmark = pytest.mark.anyio


def pool_of(n: int, make: Callable[[EngineSpec], FakeEngine], **options: Any) -> EnginePool:
    options.setdefault("health_interval", 0.01)
    return EnginePool.from_config(fake_specs([1.0] * n), engine_factory=make, rng=random.Random(0), **options)


async def collect(pool: EnginePool, prompt: Any = "hi", params: Any = FakeSamplingParams(max_tokens=4)) -> list[Any]:
    return [o async for o in pool.generate("m", prompt, params)]


# -- the drain deadline: a pool being closed ----------------------------------------


class HeldStop(FakeEngine):
    """Stops serving at once, then holds its shutdown until ``release`` is set (a vLLM
    engine's processes take seconds to exit)."""

    def __init__(self, release: anyio.Event) -> None:
        super().__init__()
        self.release = release

    async def shutdown(self) -> None:
        await super().shutdown()
        await self.release.wait()


async def test_a_pool_being_closed_refuses_requests_as_shutting_down_and_health_says_draining() -> None:
    release = anyio.Event()
    pool = pool_of(2, lambda s: HeldStop(release))
    await pool.start()
    a, b = pool.instances("m")
    async with anyio.create_task_group() as tg:
        tg.start_soon(pool.aclose)
        try:
            # The last instance stops first: while it does, the other still looks healthy.
            await until(lambda: b.state == "stopped")
            assert a.healthy
            with pytest.raises(ShuttingDownError, match="the pool is closed"):
                await collect(pool)
            assert pool.draining
            status, body = health_report(pool)
            assert (status, body["status"]) == (503, "draining")
        finally:
            release.set()
    # Closed for good: the same answers, and a library caller is told the pool is closed.
    with pytest.raises(ShuttingDownError, match="the pool is closed"):
        await collect(pool)
    assert pool.draining and health_report(pool)[0] == 503


class HeldRender(FakeEngine):
    """Renders once ``release`` is set (a long prompt, a busy tokenizer thread)."""

    def __init__(self, release: anyio.Event) -> None:
        super().__init__()
        self.release = release
        self.rendering = 0

    async def render_text(self, text: str) -> Any:
        self.rendering += 1
        await self.release.wait()
        return await super().render_text(text)


async def test_a_request_the_close_catches_before_dispatch_is_told_the_server_shut_down() -> None:
    release = anyio.Event()
    pool = pool_of(2, lambda s: HeldRender(release))
    await pool.start()
    a = pool.instances("m")[0]
    errors: list[Exception] = []

    async def client() -> None:
        try:
            await collect(pool)
        except Exception as exc:
            errors.append(exc)

    async with anyio.create_task_group() as tg:
        tg.start_soon(client)
        await until(lambda: a.engine.rendering == 1)  # type: ignore[attr-defined]
        await pool.aclose()  # every engine stops while the prompt renders
        release.set()
    # Not "no healthy engine" (503 with Retry-After: 5): the server is going away.
    assert [type(e) for e in errors] == [ShuttingDownError], errors
    assert "shut down before this request finished" in str(errors[0])


@pytest.mark.engines  # a server process (FakeEngines: it starts in seconds)
def test_new_requests_get_503_shutting_down_until_the_server_exits(tmp_path: Any) -> None:
    # Observed on the demo server (issue 26, item 8): after the drain deadline the engines
    # took ~10 s to stop, and meanwhile new requests got 500 and /health said ok.
    proc = ServerProcess(
        "--token-delay", "0.02", "--drain-timeout", "1", "--shutdown-delay", "2",
        log=tmp_path / "fake_server.log", module="lylm.testing.fake_server", workers=1,
    )  # fmt: skip
    stream_lines: list[str] = []
    first_token = threading.Event()
    stream_ended = threading.Event()

    def stream() -> None:
        # 2,000 tokens at 20 ms: still running at the drain deadline, ended by the close.
        body = {"model": "fake", "prompt": "hi", "max_tokens": 2000, "stream": True}
        try:
            with httpx.stream("POST", f"{proc.url}/v1/completions", json=body, timeout=60) as response:
                for line in response.iter_lines():
                    if line:
                        stream_lines.append(line)
                        first_token.set()
        finally:
            stream_ended.set()

    # (phase, what): phase "draining" before the stream ended, "closing" after it (the
    # pool is being closed: its engines stop, 2 s each).
    answers: list[tuple[str, str, int, str | None, str | None]] = []
    try:
        proc.wait_ready(timeout=120)
        thread = threading.Thread(target=stream)
        thread.start()
        assert first_token.wait(30)
        proc.proc.send_signal(signal.SIGTERM)
        body = {"model": "fake", "prompt": "new", "max_tokens": 2}
        deadline = time.monotonic() + 60
        while proc.proc.poll() is None and time.monotonic() < deadline:
            phase = "closing" if stream_ended.is_set() else "draining"
            try:
                r = httpx.post(f"{proc.url}/v1/completions", json=body, timeout=10)
                code = r.json()["error"]["code"] if r.status_code != 200 else None
                answers.append((phase, "POST", r.status_code, code, r.headers.get("retry-after")))
                h = httpx.get(f"{proc.url}/health", timeout=10)
                answers.append((phase, "health", h.status_code, h.json()["status"], None))
            except httpx.TransportError:
                pass  # the server stopped listening: it is about to exit
            time.sleep(0.02)
        thread.join(30)
        assert proc.proc.wait(30) != 0
    finally:
        proc.stop()
    assert stream_lines[-1] == "data: [DONE]"
    assert json.loads(stream_lines[-2].removeprefix("data: "))["error"]["code"] == "shutting_down"
    # The window this is about was seen, and every answer in it (and before it) was a refusal.
    assert sum(1 for a in answers if a[0] == "closing" and a[1] == "POST") >= 5, answers
    unexpected = [
        a for a in answers
        if a[1:] not in (("POST", 503, "shutting_down", "1"), ("health", 503, "draining", None))
    ]  # fmt: skip
    assert unexpected == [], unexpected

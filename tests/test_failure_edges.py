"""Failure edges of one server process (issue 26, item 8): bad timing gets a clear answer
and loses nothing.

- The drain deadline: while a pool is being closed (its engines stopping, seconds with
  vLLM), new requests are refused as during the drain (``ShuttingDownError``: 503
  ``shutting_down`` with ``Retry-After``) and ``/health`` says ``draining``.
- Requests arriving as an engine dies: the engine that renders a prompt (the model's
  first healthy one) may die while it does; the prompt is then rendered on another
  instance and served there, not failed with ``EngineDeadError`` (503 ``engine_dead``)
  while another engine is up.
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

from _helpers import fake_specs, until, wait_until
from _server import ServerProcess, uvicorn_thread
from lylm import EngineDeadError, EngineError, EnginePool, EngineSpec, ShuttingDownError
from lylm.openai import create_app
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
            # Every engine stops at once, held here: while they stop, requests are refused as
            # the pool's closing (not as "no healthy engine").
            await until(lambda: a.state == b.state == "stopped")
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


# -- requests arriving as an engine dies ---------------------------------------------


class ShutDownMidRender(FakeEngine):
    """Like a VLLMEngine: once shut down, reading its context length or defaults raises
    EngineDeadError (its AsyncLLM is gone), while a render already under way completes
    (or, with ``render_survives=False``, fails as vLLM's renderer does once its thread
    pool is shut down). Renders wait for ``release`` (set from any thread): the window
    in which the pool sees the engine die and shuts it down."""

    def __init__(self, release: threading.Event, *, render_survives: bool = True) -> None:
        super().__init__()
        self.release = release
        self.render_survives = render_survives
        self.rendering = 0

    def _require(self) -> None:
        if self.stopped:
            raise EngineDeadError("the engine is not running")

    @property
    def max_model_len(self) -> int:
        self._require()
        return super().max_model_len

    def default_sampling_params(self) -> FakeSamplingParams:
        self._require()
        return super().default_sampling_params()

    async def render_text(self, text: str) -> Any:
        self.rendering += 1
        while not self.release.is_set():
            await anyio.sleep(0.005)
        if self.stopped and not self.render_survives:
            raise EngineError("RuntimeError: cannot schedule new futures after shutdown")
        return await super().render_text(text)


class DeadBeforeItsFlag(FakeEngine):
    """An engine whose process died before its ``healthy`` flag says so (vLLM flips
    ``errored`` only once the death reaches its front end): everything asked of it
    fails with EngineDeadError, and the health watch sees nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.dead_inside = False
        self.renders = 0

    async def render_text(self, text: str) -> Any:
        self.renders += 1
        if self.dead_inside:
            raise EngineDeadError("its engine core is gone")
        return await super().render_text(text)

    async def decode(self, token_ids: Any) -> str:
        if self.dead_inside:
            raise EngineDeadError("its engine core is gone")
        return await super().decode(token_ids)


def first_one(make: Callable[[], FakeEngine]) -> Callable[[EngineSpec], FakeEngine]:
    """An engine factory: ``make()`` for the first engine, plain FakeEngines for the rest."""
    made: list[FakeEngine] = []

    def factory(spec: EngineSpec) -> FakeEngine:
        made.append(make() if not made else FakeEngine())
        return made[-1]

    return factory


@pytest.mark.parametrize("render_survives", [True, False], ids=["render completes", "render fails"])
async def test_requests_rendering_on_an_engine_that_dies_are_served_by_another(render_survives: bool) -> None:
    # Measured with two real engines: 30 requests rendering on engine 0 when the pool shut
    # it down (its death seen by a request or the health watch) all failed with "is not
    # running", read from it after their render: 503 engine_dead while engine 1 served.
    release = threading.Event()
    make = lambda: ShutDownMidRender(release, render_survives=render_survives)  # noqa: E731
    pool = pool_of(2, first_one(make), restart=None)
    async with pool:
        a, b = pool.instances("m")
        results: list[Any] = []

        async def client(params: Any) -> None:
            try:
                results.append(len(await collect(pool, params=params)))
            except Exception as exc:
                results.append(exc)

        async with anyio.create_task_group() as tg:
            for i in range(10):
                # Half with the model's default sampling parameters, read from an engine too.
                tg.start_soon(client, FakeSamplingParams(max_tokens=4) if i % 2 else None)
            await until(lambda: a.engine.rendering == 10)  # type: ignore[attr-defined]
            a.engine.kill()  # type: ignore[attr-defined]
            await until(lambda: a.engine.stopped)  # type: ignore[attr-defined]
            release.set()
        assert all(isinstance(r, int) for r in results), results  # no request failed
        assert sorted(results) == [4] * 5 + [16] * 5  # whole answers: 16 tokens by default
        assert (a.dispatched, b.completed, a.state) == (0, 10, "dead")


async def test_an_engine_found_dead_while_rendering_is_reported_and_skipped() -> None:
    # retries=0: rendering elsewhere is no retry (no engine had the request yet).
    pool = pool_of(2, first_one(DeadBeforeItsFlag), restart=None, retries=0)
    async with pool:
        a, b = pool.instances("m")
        engine_a = a.engine
        assert isinstance(engine_a, DeadBeforeItsFlag)
        engine_a.dead_inside = True
        assert a.healthy  # its flag says nothing yet: only a request can find out
        for _ in range(5):
            assert len(await collect(pool)) == 4
        # The first render told the pool; the requests behind it went straight to b.
        assert engine_a.renders == 1 and a.state == "dead" and a.last_error == "its engine core is gone"
        assert engine_a.stopped and (a.dispatched, b.completed) == (0, 5)
        # /tokenize and /detokenize (pool.render, pool.decode) do the same.
        assert (await pool.render("m", "hi")).token_ids == list(b"hi")
        assert await pool.decode("m", list(b"hi")) == "hi"


async def test_with_no_other_engine_the_render_failure_is_the_engines_and_others_are_the_requests() -> None:
    # The only engine dies while rendering: its own error, as when it dies serving (503
    # engine_dead, Retry-After: 5), not "no healthy engine".
    async with pool_of(1, first_one(DeadBeforeItsFlag), restart=None) as pool:
        (a,) = pool.instances("m")
        a.engine.dead_inside = True  # type: ignore[attr-defined]
        with pytest.raises(EngineDeadError, match="its engine core is gone"):
            await collect(pool)
        assert a.state == "dead"

    class Refusing(FakeEngine):
        renders = 0

        async def render_text(self, text: str) -> Any:
            type(self).renders += 1
            raise EngineError("the tokenizer failed on this prompt")

    # A failure of the render on an engine still up is the request's: rendered once, and
    # the engine stays in service.
    async with pool_of(3, lambda s: Refusing(), restart=None) as pool:
        with pytest.raises(EngineError, match="tokenizer failed"):
            await collect(pool)
        assert Refusing.renders == 1 and all(i.state == "healthy" for i in pool.instances())


def test_http_clients_see_no_503_while_another_engine_serves() -> None:
    # The symptom (issue 26, item 8): `lylm serve`, two engines, engine 0's worker killed:
    # 27 requests started 10-70 ms later all got 503 engine_dead while engine 1 was up.
    release = threading.Event()
    pool = pool_of(2, first_one(lambda: ShutDownMidRender(release)), restart=None)
    with uvicorn_thread(create_app(pool)) as url:
        a = pool.instances("m")[0]
        statuses: list[int] = []

        def client(i: int) -> None:
            body = {"model": "m", "prompt": f"hi {i}", "max_tokens": 3}
            statuses.append(httpx.post(f"{url}/v1/completions", json=body, timeout=30).status_code)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(20)]
        for thread in threads:
            thread.start()
        try:
            wait_until(lambda: a.engine.rendering == 20)  # type: ignore[attr-defined]
            a.engine.kill()  # type: ignore[attr-defined]
            wait_until(lambda: a.engine.stopped)  # type: ignore[attr-defined]
        finally:
            release.set()
            for thread in threads:
                thread.join(30)
    assert statuses == [200] * 20

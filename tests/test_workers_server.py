"""lylm serve --workers 2 over 2 real CPU engines: API keys and admission limits that
hold in every worker and for the whole server, and a server killed outright (SIGKILL)
that leaves no process behind. Over FakeEngines (the same server, started in seconds):
workers killed or stalled are replaced, and streams open at the drain deadline end
cleanly."""

from __future__ import annotations

import contextlib
import json
import signal
import threading
import time
from collections.abc import Iterator

import httpx
import psutil
import pytest

from _server import ServerProcess, metric

pytestmark = pytest.mark.engines

MODEL = "lylm-tiny-demo"
KEY = {"Authorization": "Bearer test-key"}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    cache = tmp_path_factory.mktemp("lylm-cache")
    log = tmp_path_factory.mktemp("logs") / "serve.log"
    proc = ServerProcess("--max-in-flight", "2", "--api-key", "test-key", env={"LYLM_CACHE_DIR": str(cache)}, log=log, workers=2)
    try:
        proc.wait_ready(timeout=240)
        yield proc
    finally:
        proc.stop()


def test_every_worker_asks_for_the_api_key(server: ServerProcess) -> None:
    body = {"model": MODEL, "prompt": "key?", "max_tokens": 2}
    statuses = set()
    for _ in range(8):  # new connections: whichever worker takes each
        statuses.add(httpx.post(f"{server.url}/v1/completions", json=body, timeout=60).status_code)
        statuses.add(httpx.post(f"{server.url}/v1/completions", json=body, headers={"Authorization": "Bearer nope"}).status_code)
    assert statuses == {401}
    assert httpx.post(f"{server.url}/v1/completions", json=body, headers=KEY, timeout=60).status_code == 200
    assert httpx.get(f"{server.url}/health").status_code == 200  # public, as configured


def test_the_admission_limit_is_the_whole_servers(server: ServerProcess) -> None:
    # 900 tokens (the tiny model's context is 1024) stream for well over a second on the CPU.
    body = {"model": MODEL, "prompt": "hold", "max_tokens": 900, "ignore_eos": True, "stream": True}
    release = threading.Event()
    streaming = threading.Semaphore(0)

    def hold() -> None:
        # Each on its own connection, so that they can land on either worker.
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body, headers=KEY, timeout=60) as r:
            assert r.status_code == 200
            for _ in r.iter_lines():
                streaming.release()
                if release.wait(0):
                    break

    threads = [threading.Thread(target=hold) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        assert streaming.acquire(timeout=60) and streaming.acquire(timeout=60)
        with contextlib.suppress(ValueError):
            while streaming.acquire(blocking=False):
                pass
        assert sum(metric(server.url, "lylm_in_flight_requests").values()) == 2
        before = metric(server.url, "lylm_worker_requests_total")
        statuses: list[int] = []

        def more(i: int) -> None:
            # Every other one streamed: a stream refused by admission gets Retry-After too.
            extra_body = {"model": MODEL, "prompt": f"more {i}", "max_tokens": 2, "stream": i % 2 == 1}
            r = httpx.post(f"{server.url}/v1/completions", json=extra_body, headers=KEY)
            statuses.append(r.status_code)
            if r.status_code == 429:
                assert float(r.headers["retry-after"]) > 0

        # Concurrent, on new connections: whichever worker takes each, it is refused.
        extra = [threading.Thread(target=more, args=(i,)) for i in range(8)]
        for t in extra:
            t.start()
        for t in extra:
            t.join(30)
        # Honest only while both streams still hold their slots.
        assert sum(metric(server.url, "lylm_in_flight_requests").values()) == 2
        assert statuses == [429] * 8
        assert metric(server.url, "lylm_worker_requests_total") == before  # refused before dispatch
    finally:
        release.set()
        for t in threads:
            t.join(60)
    deadline = time.monotonic() + 10
    while sum(metric(server.url, "lylm_in_flight_requests").values()) and time.monotonic() < deadline:
        time.sleep(0.05)
    r = httpx.post(f"{server.url}/v1/completions", json={"model": MODEL, "prompt": "again", "max_tokens": 2}, headers=KEY, timeout=60)
    assert r.status_code == 200


def test_a_killed_worker_is_replaced_on_a_spare_client_slot_of_the_real_engine_cores(server: ServerProcess) -> None:
    # vLLM greets a client index once per core: the replacement attaches as client 2.
    _until(lambda: _total(server.url, "lylm_workers_serving") == 2, 60)
    killed = _workers_of(server)[0]
    killed.kill()
    _until(lambda: _total(server.url, "lylm_worker_replacements_total") == 1, 60)
    _until(lambda: _total(server.url, "lylm_workers_serving") == 2, 180)
    assert "(client 2) serves" in server.tail(400)
    body = {"model": MODEL, "prompt": "after", "max_tokens": 4, "ignore_eos": True}
    # New connections, so that both workers (the replacement too) take some.
    for _ in range(8):
        r = httpx.post(f"{server.url}/v1/completions", json=body, headers=KEY, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
    requests = metric(server.url, "lylm_worker_requests_total")
    assert len(requests) == 2 and all(v > 0 for v in requests.values()), requests


def test_sigkill_of_the_server_leaves_no_worker_and_no_engine(server: ServerProcess) -> None:
    # Last here: it kills the shared server.
    descendants = psutil.Process(server.proc.pid).children(recursive=True)
    names = [" ".join(p.cmdline()) for p in descendants]
    assert sum("lylm.openai._server" in n or "spawn_main" in n for n in names) >= 2, names
    assert sum(1 for p in descendants if "EngineCore" in p.name() or "EngineCore" in " ".join(p.cmdline())) == 2
    server.proc.send_signal(signal.SIGKILL)
    server.proc.wait(10)

    def alive() -> list[str]:
        found = []
        for p in descendants:
            with contextlib.suppress(psutil.Error):
                if p.status() != psutil.STATUS_ZOMBIE:
                    found.append(f"{p.pid} {p.name()}")
        return found

    deadline = time.monotonic() + 20
    while alive() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert alive() == []


def _workers_of(proc: ServerProcess) -> list[psutil.Process]:
    descendants = psutil.Process(proc.proc.pid).children(recursive=True)
    return [
        p for p in descendants
        if "spawn_main" in " ".join(p.cmdline()) and "resource_tracker" not in " ".join(p.cmdline())
    ]


def _gone(processes: list[psutil.Process]) -> list[int]:
    found = []
    for p in processes:
        with contextlib.suppress(psutil.Error):
            if p.status() != psutil.STATUS_ZOMBIE:
                found.append(p.pid)
    return found


def _until(condition: object, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"still waiting after {timeout} s"
        time.sleep(0.1)


def _total(url: str, name: str) -> float:
    return sum(metric(url, name).values()) or float(
        next((line.split()[-1] for line in httpx.get(f"{url}/metrics").text.splitlines() if line.startswith(name + " ")), 0)
    )


def test_a_worker_killed_under_load_is_replaced_and_the_server_keeps_serving(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    # FakeEngines (lylm.testing.fake_server): the same server machinery, started in seconds.
    log = tmp_path_factory.mktemp("logs") / "fake_server.log"
    proc = ServerProcess("--token-delay", "0.02", log=log, module="lylm.testing.fake_server", workers=2)
    statuses: list[object] = []
    try:
        proc.wait_ready(timeout=120)
        _until(lambda: _total(proc.url, "lylm_workers_serving") == 2, 60)
        workers = _workers_of(proc)
        assert len(workers) == 2, workers

        def stream(i: int) -> None:
            body = {"model": "fake", "prompt": f"s{i}", "max_tokens": 150, "stream": True}
            try:
                with httpx.stream("POST", f"{proc.url}/v1/completions", json=body, timeout=60) as r:
                    lines = [line for line in r.iter_lines() if line]
                statuses.append(lines[-1] if lines else "empty")
            except httpx.TransportError as exc:  # the killed worker's connections drop
                statuses.append(type(exc).__name__)

        threads = [threading.Thread(target=stream, args=(i,)) for i in range(12)]
        for t in threads:
            t.start()
        _until(lambda: _total(proc.url, "lylm_in_flight_requests") == 12, 30)
        workers[0].kill()
        # Served meanwhile, on the other worker and then on the replacement too.
        served = []
        deadline = time.monotonic() + 60
        while _total(proc.url, "lylm_worker_replacements_total") < 1 or _total(proc.url, "lylm_workers_serving") < 2:
            assert time.monotonic() < deadline, proc.tail(40)
            r = httpx.post(f"{proc.url}/v1/completions", json={"model": "fake", "prompt": "hi", "max_tokens": 2}, timeout=30)
            served.append(r.status_code)
        assert served and set(served) == {200}
        for t in threads:
            t.join(60)
        lost = [s for s in statuses if s != "data: [DONE]"]
        assert 0 < len(lost) < 12, statuses  # those on the killed worker, and only those
        # The dead worker's requests were ended by the hub; nothing is left in flight.
        _until(lambda: _total(proc.url, "lylm_in_flight_requests") == 0, 10)
        assert _total(proc.url, "lylm_hub_reconciled_bookings_total") == len(lost)
        new = [w for w in _workers_of(proc) if w.pid != workers[0].pid and w.pid != workers[1].pid]
        assert len(new) == 1 and "replaced" in proc.tail(200)
    finally:
        proc.stop()


def test_without_a_spare_slot_the_server_serves_on_the_others_then_stops(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    log = tmp_path_factory.mktemp("logs") / "fake_server.log"
    proc = ServerProcess("--worker-replacements", "0", log=log, module="lylm.testing.fake_server", workers=2)
    try:
        proc.wait_ready(timeout=120)
        _until(lambda: _total(proc.url, "lylm_workers_serving") == 2, 60)
        workers = _workers_of(proc)
        workers[0].kill()
        _until(lambda: _total(proc.url, "lylm_workers_serving") == 1, 30)
        for _ in range(5):
            r = httpx.post(f"{proc.url}/v1/completions", json={"model": "fake", "prompt": "hi", "max_tokens": 2}, timeout=30)
            assert r.status_code == 200
        assert "no spare client slot left" in proc.tail(100)
        workers[1].kill()
        # None left serving: the server stops, with an error, and leaves nothing behind.
        assert proc.proc.wait(60) == 1
        assert "no front-end worker is left serving" in proc.tail(100)
        _until(lambda: not _gone(workers), 20)
    finally:
        proc.stop()


def test_a_worker_that_stops_answering_is_killed_and_replaced(tmp_path_factory: pytest.TempPathFactory) -> None:
    log = tmp_path_factory.mktemp("logs") / "fake_server.log"
    proc = ServerProcess("--worker-timeout", "2", log=log, module="lylm.testing.fake_server", workers=2)
    try:
        proc.wait_ready(timeout=120)
        _until(lambda: _total(proc.url, "lylm_workers_serving") == 2, 60)
        stopped = _workers_of(proc)[0]
        stopped.suspend()  # SIGSTOP: alive, but its event loop answers nothing
        started = time.monotonic()
        _until(lambda: _total(proc.url, "lylm_worker_replacements_total") == 1, 60)
        assert time.monotonic() - started >= 2.0
        _until(lambda: _total(proc.url, "lylm_workers_serving") == 2, 60)
        assert not _gone([stopped])  # killed, not left stopped
        r = httpx.post(f"{proc.url}/v1/completions", json={"model": "fake", "prompt": "hi", "max_tokens": 2}, timeout=30)
        assert r.status_code == 200
        assert "without answering the hub" in proc.tail(100)
    finally:
        proc.stop()


@pytest.mark.parametrize("workers", [1, 2], ids=["1 worker", "2 workers"])
def test_more_prompts_than_the_model_admits_is_a_400_with_any_worker_count(
    tmp_path_factory: pytest.TempPathFactory, workers: int
) -> None:
    # Issue 26: with workers it was a 429 with Retry-After, a retry that can never succeed.
    log = tmp_path_factory.mktemp("logs") / "fake_server.log"
    proc = ServerProcess("--max-in-flight", "8", log=log, module="lylm.testing.fake_server", workers=workers)
    try:
        proc.wait_ready(timeout=120)
        body = {"model": "fake", "prompt": [f"p{i}" for i in range(9)], "max_tokens": 2}
        for _ in range(4):  # new connections: whichever worker takes each
            r = httpx.post(f"{proc.url}/v1/completions", json=body, timeout=30)
            assert r.status_code == 400, r.text
            assert r.json()["error"]["code"] == "too_many_prompts" and "retry-after" not in r.headers
        r = httpx.post(f"{proc.url}/v1/completions", json={**body, "prompt": body["prompt"][:8]}, timeout=30)
        assert r.status_code == 200 and len(r.json()["choices"]) == 8
    finally:
        proc.stop()


@pytest.mark.parametrize("workers", [1, 2], ids=["1 worker", "2 workers"])
def test_streams_open_at_the_drain_deadline_end_with_an_error_event_and_done(
    tmp_path_factory: pytest.TempPathFactory, workers: int
) -> None:
    # Issue 15, item 11: ended like any other failure, not cut at the TCP level.
    # FakeEngines at 20 ms a token: a 2,000-token stream outlasts the 1 s drain.
    log = tmp_path_factory.mktemp("logs") / "fake_server.log"
    proc = ServerProcess(
        "--token-delay", "0.02", "--drain-timeout", "1", log=log, module="lylm.testing.fake_server", workers=workers
    )
    lines: list[list[str]] = [[], []]
    errors: list[BaseException] = []
    started = threading.Barrier(3)

    def stream(index: int) -> None:
        body = {"model": "fake", "prompt": "hi", "max_tokens": 2000, "stream": True}
        try:
            with httpx.stream("POST", f"{proc.url}/v1/completions", json=body, timeout=60) as response:
                for line in response.iter_lines():
                    if line:
                        lines[index].append(line)
                        if len(lines[index]) == 1:
                            started.wait(30)
        except BaseException as exc:  # an incomplete chunked read, a reset
            errors.append(exc)

    try:
        proc.wait_ready(timeout=120)
        threads = [threading.Thread(target=stream, args=(i,)) for i in range(2)]
        for thread in threads:
            thread.start()
        started.wait(30)  # both streams have tokens
        proc.proc.send_signal(signal.SIGTERM)
        for thread in threads:
            thread.join(60)
        assert errors == []
        for got in lines:
            assert got[-1] == "data: [DONE]", got[-3:]
            error = json.loads(got[-2].removeprefix("data: "))["error"]
            assert error["code"] == "shutting_down", error
            assert 10 < len(got) < 2000  # tokens came, and the stream was ended early
        assert proc.proc.wait(60) != 0
        assert "Traceback" not in proc.tail(400)
    finally:
        proc.stop()

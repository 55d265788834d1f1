"""Clients that hang up in the first milliseconds (load-balancer probes, impatient clients,
SDKs with short timeouts) leave nothing in the server's books, with 1, 2 and 4 front-end
workers, streamed and not (issue 26: with workers, 97% of such requests stayed in flight
for good). The real server over FakeEngines (``lylm.testing.fake_server``): the same
processes, hub and HTTP stack as ``lylm serve``, started in seconds."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import httpx
import pytest

from _server import ServerProcess, metric
from lylm.testing._hangups import hang_ups

pytestmark = pytest.mark.engines

DELAYS = (0.0, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05)


@pytest.fixture(scope="module", params=[1, 2, 4], ids=["1 worker", "2 workers", "4 workers"])
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    workers = request.param
    log = tmp_path_factory.mktemp("logs") / f"fake_server_{workers}.log"
    # 5 ms a token: a 100-token stream runs half a second, so every hang-up lands mid-request.
    proc = ServerProcess("--token-delay", "0.005", log=log, module="lylm.testing.fake_server", workers=workers)
    try:
        proc.wait_ready(timeout=180)
        yield proc
    finally:
        proc.stop()


def in_flight(url: str) -> tuple[float, float]:
    return sum(metric(url, "lylm_in_flight_requests").values()), sum(metric(url, "lylm_in_flight_tokens").values())


@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "not streamed"])
def test_early_hang_ups_leave_nothing_in_flight(server: ServerProcess, stream: bool) -> None:
    body = {"model": "fake", "prompt": "hello", "max_tokens": 100, "stream": stream}
    report = asyncio.run(
        hang_ups("127.0.0.1", server.port, "/v1/completions", body, delays=DELAYS, count=350, concurrency=32)
    )
    assert report.failed_to_connect == 0
    deadline = time.monotonic() + 15
    while in_flight(server.url) != (0, 0) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert in_flight(server.url) == (0, 0)
    text = httpx.get(f"{server.url}/metrics").text
    # Every booking was ended by the worker that held it, none by the hub's reconciliation.
    assert "lylm_hub_reconciled_bookings_total 0.0" in text or server.workers == 1
    ended = sum(metric(server.url, "lylm_requests_total").values())
    assert ended > 0  # the hang-ups reached the engines (most after their choice was made)
    r = httpx.post(f"{server.url}/v1/completions", json={**body, "stream": False, "max_tokens": 3}, timeout=30)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3

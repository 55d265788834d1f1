"""1,000 concurrent streams through the real HTTP server over FakeEngines, half of
the clients hanging up at random points, three rounds: nothing leaks."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Iterator

import httpx
import openai
import psutil
import pytest

from _server import ServerProcess

pytestmark = pytest.mark.engines

MODEL = "fake"
STREAMS = 1000
TOKENS = 40


@pytest.fixture(scope="module", params=[1, 2], ids=["1-worker", "2-workers"])
def server(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("logs") / "fake_server.log"
    proc = ServerProcess(
        "--token-delay", "0.1", log=log, module="lylm.testing.fake_server", workers=request.param
    )
    try:
        proc.wait_ready(timeout=120)
        yield proc
    finally:
        proc.stop()


def books(server: ServerProcess) -> dict[str, float]:
    """Sums over engines of the pool's books, from /metrics."""
    totals: dict[str, float] = {}
    for line in httpx.get(f"{server.url}/metrics", timeout=30).text.splitlines():
        for name in ("lylm_in_flight_requests", "lylm_in_flight_tokens", "lylm_requests_total"):
            if line.startswith(name + "{"):
                labels, value = line[len(name):].rsplit(" ", 1)
                key = name + ("" if "outcome" not in labels else ":" + labels.split('outcome="')[1].split('"')[0])
                totals[key] = totals.get(key, 0.0) + float(value)
    return totals


async def one_round(url: str, rng: random.Random) -> tuple[int, int, list[str]]:
    """Run the streams; return (completed in full, hung up, problems)."""
    limits = httpx.Limits(max_connections=STREAMS, max_keepalive_connections=STREAMS)
    http = httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(120))
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, http_client=http)
    plans = [rng.randint(1, TOKENS - 5) if rng.random() < 0.5 else None for _ in range(STREAMS)]
    problems: list[str] = []

    async def stream(hang_up_after: int | None) -> bool:
        got = 0
        reason = None
        try:
            response = await client.completions.create(
                model=MODEL, prompt="soak", max_tokens=TOKENS, stream=True
            )
            async for chunk in response:
                got += len(chunk.choices[0].text) if chunk.choices else 0
                reason = chunk.choices[0].finish_reason if chunk.choices else reason
                if hang_up_after is not None and got >= hang_up_after:
                    await response.close()  # the client disconnects mid-stream
                    return False
        except Exception as exc:  # any error is a problem: report, do not stop the round
            problems.append(f"{type(exc).__name__}: {exc}")
            return False
        if (got, reason) != (TOKENS, "length"):
            problems.append(f"incomplete stream: {got} tokens, finish_reason {reason}")
        return True

    async with http:
        done = await asyncio.gather(*(stream(p) for p in plans))
    return sum(done), sum(p is not None for p in plans), problems


def test_a_thousand_streams_with_half_hanging_up_leak_nothing(server: ServerProcess) -> None:
    rng = random.Random(1000)
    process = psutil.Process(server.proc.pid)
    rss: list[int] = []
    before = books(server)
    for round_ in range(4):  # the first round warms up: buffers and pools reach their size
        completed, hung_up, problems = asyncio.run(one_round(server.url, rng))
        assert problems == [], problems[:5]
        assert completed == STREAMS - hung_up
        # Every disconnect is noticed and aborted in its engine: the books return to zero.
        for _ in range(100):  # bounded: at most ~10 s
            now = books(server)
            if now["lylm_in_flight_requests"] == 0:
                break
            time.sleep(0.1)
        assert now["lylm_in_flight_requests"] == 0 and now["lylm_in_flight_tokens"] == 0, now
        ended = {k: now.get(k, 0) - before.get(k, 0) for k in now if k.startswith("lylm_requests_total")}
        assert ended.get("lylm_requests_total:failed", 0) == 0, ended
        assert ended["lylm_requests_total:completed"] + ended["lylm_requests_total:aborted"] == STREAMS, ended
        assert ended["lylm_requests_total:completed"] >= STREAMS - hung_up, ended
        before = now
        # The server's processes together: with workers, most of it is theirs.
        rss.append(sum(p.memory_info().rss for p in [process, *process.children(recursive=True)]))
        print(f"round {round_}: {completed} completed, {hung_up} hung up, {ended}, rss {rss[-1] / 2**20:.1f} MiB")
    measured = rss[1:]
    growth = measured[-1] - measured[0]
    assert growth <= max(0.05 * measured[0], 8 * 2**20), [f"{r / 2**20:.1f} MiB" for r in rss]

"""benchmarks/loadgen.py: its pure parts, and one run against a fake OpenAI server.

    .venv/bin/python -m pytest -q -p no:cacheprovider tests/test_loadgen.py

The fake server (starlette + uvicorn on 127.0.0.1, in a thread) streams OpenAI-shaped
SSE chunks with a usage chunk and [DONE]; no engine starts, so this stays fast.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import anyio
import numpy as np
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from _server import uvicorn_thread

ROOT = Path(__file__).resolve().parent.parent


def _load_loadgen() -> ModuleType:
    # benchmarks/ is not a package: load the script by path.
    spec = importlib.util.spec_from_file_location("loadgen", ROOT / "benchmarks" / "loadgen.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["loadgen"] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


loadgen = _load_loadgen()


# ----------------------------------------------------------------------------- pure parts


@pytest.mark.parametrize("q", [0, 1, 10, 50, 90, 99, 100])
@pytest.mark.parametrize("values", [[3.0], [1.0, 2.0], [5.0, 1.0, 4.0, 2.0, 3.0], [0.1 * i * i for i in range(37)]])
def test_percentile_matches_numpy_linear(values: list[float], q: float) -> None:
    assert loadgen.percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


def test_percentile_edges() -> None:
    assert loadgen.percentile([], 50) is None
    with pytest.raises(ValueError):
        loadgen.percentile([1.0], 101)


@pytest.mark.parametrize("kind", ["short", "long", "shared-prefix"])
def test_prompts_are_deterministic_per_seed(kind: str) -> None:
    a = loadgen.build_prompts(kind, 20, seed=1, long_words=50)
    assert a == loadgen.build_prompts(kind, 20, seed=1, long_words=50)
    assert a != loadgen.build_prompts(kind, 20, seed=2, long_words=50)
    assert len(a) == 20 and all(p.strip() for p in a)
    # A longer run starts with the same prompts: cells stay comparable across grids.
    assert loadgen.build_prompts(kind, 30, seed=1, long_words=50)[:20] == a


def test_prompt_sets_have_their_shapes() -> None:
    short = loadgen.build_prompts("short", 50, seed=0)
    assert all(4 <= len(p.split()) <= 12 and p.endswith("?") for p in short)
    long = loadgen.build_prompts("long", 5, seed=0, long_words=300)
    assert all(len(p.split()) == 300 for p in long)
    shared = loadgen.build_prompts("shared-prefix", 12, seed=0, long_words=100, groups=3)
    prefixes = [p.split("\n\n")[0] for p in shared]
    assert len(set(prefixes)) == 3
    assert prefixes[0] == prefixes[3] == prefixes[6] and prefixes[0] != prefixes[1]
    assert len(set(shared)) == 12  # each has its own question
    with pytest.raises(ValueError):
        loadgen.build_prompts("medium", 1)


def test_parse_grid() -> None:
    assert loadgen.parse_grid("1x4, 4x16,16X64") == [(1, 4), (4, 16), (16, 64)]
    for bad in ("", "4", "0x4", "4x0", "ax4"):
        with pytest.raises(ValueError):
            loadgen.parse_grid(bad)


def _req(ok: bool, e2e: float, tokens: int, ttft: float | None = 0.1, itl: list[float] | None = None) -> Any:
    return loadgen.RequestResult(ok, e2e, ttft, itl or [], tokens, None if ok else "boom")


def test_cell_summary_columns() -> None:
    cell = loadgen.CellResult(
        concurrency=2,
        total=4,
        wall_s=2.0,
        requests=[_req(True, 1.0, 10, 0.1, [0.01, 0.03]), _req(True, 2.0, 30, 0.3, [0.02]), _req(False, 0.5, 0), None],
    )
    s = cell.summary()
    assert s["success_rate"] == 0.5
    assert s["mean_e2e_s"] == pytest.approx(1.5)
    assert s["mean_completion_tokens"] == pytest.approx(20)
    assert s["per_request_tokens_per_s"] == pytest.approx((10 / 1.0 + 30 / 2.0) / 2)
    assert s["system_tokens_per_s"] == pytest.approx(40 / 2.0)
    assert s["ttft_p50_ms"] == pytest.approx(200)
    assert s["itl_p50_ms"] == pytest.approx(20)
    assert s["errors"] == {"boom": 1, "unfinished at the cell time limit": 1}


def test_markdown_table_format() -> None:
    summaries = [
        {"concurrency": 1, "total": 4, "success_rate": 1.0, "mean_e2e_s": 0.8234, "mean_completion_tokens": 133.0,
         "per_request_tokens_per_s": 161.372, "system_tokens_per_s": 422.561, "total_time_s": 1.256,
         "ttft_p50_ms": 12.34, "ttft_p90_ms": 20.0, "ttft_p99_ms": None, "itl_p50_ms": 5.0, "itl_p99_ms": 9.99},
    ]
    lines = loadgen.markdown_table(summaries).splitlines()
    assert lines[0].startswith("| conc | total | ok | e2e s | resp tok | req tok/s | sys tok/s | total s | TTFT p50 ms")
    assert lines[1] == "|" + "---|" * 13
    assert lines[2] == "| 1 | 4 | 100% | 0.82 | 133.00 | 161.37 | 422.56 | 1.26 | 12.3 | 20.0 | - | 5.0 | 10.0 |"


def test_payloads() -> None:
    chat = loadgen.LoadConfig("http://127.0.0.1:1/", "m", max_tokens=8, api="chat")
    assert chat.endpoint() == "http://127.0.0.1:1/v1/chat/completions"
    body = chat.payload("hi")
    assert body["messages"] == [{"role": "user", "content": "hi"}] and body["ignore_eos"] is True
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    plain = loadgen.LoadConfig("http://127.0.0.1:1", "m", ignore_eos=False)
    assert plain.endpoint().endswith("/v1/completions")
    assert plain.payload("hi")["prompt"] == "hi" and "ignore_eos" not in plain.payload("hi")


# ----------------------------------------------------------------------------- fake server

TOKEN_DELAY_S = 0.002


def _chunk(body: dict[str, Any], text: str | None, chat: bool, usage: dict[str, int] | None = None) -> bytes:
    payload: dict[str, Any] = {"id": "x", "created": 0, "model": body["model"]}
    if chat:
        payload["object"] = "chat.completion.chunk"
        payload["choices"] = [] if text is None else [{"index": 0, "delta": {"content": text}, "finish_reason": None}]
    else:
        payload["object"] = "text_completion"
        payload["choices"] = [] if text is None else [{"index": 0, "text": text, "finish_reason": None}]
    payload["usage"] = usage
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


class FakeBooks:
    """What the fake server saw: requests and the most it ever had in flight."""

    def __init__(self) -> None:
        self.requests = 0
        self.in_flight = 0
        self.peak = 0


def fake_app(books: FakeBooks) -> Starlette:
    async def generate(request: Request) -> Response:
        body = await request.json()
        chat = request.url.path.endswith("/chat/completions")
        if body.get("model") != "fake":
            return JSONResponse({"error": {"message": "unknown model"}}, status_code=404)
        n = int(body["max_tokens"])
        books.requests += 1

        async def stream() -> AsyncIterator[bytes]:
            books.in_flight += 1
            books.peak = max(books.peak, books.in_flight)
            try:
                if chat:  # OpenAI opens a chat stream with an empty role-only delta
                    yield _chunk(body, "", chat)
                for i in range(n):
                    await asyncio.sleep(TOKEN_DELAY_S)
                    yield _chunk(body, f" w{i}", chat)
                yield _chunk(body, None, chat, {"prompt_tokens": 3, "completion_tokens": n, "total_tokens": n + 3})
                yield b"data: [DONE]\n\n"
            finally:
                books.in_flight -= 1

        return StreamingResponse(stream(), media_type="text/event-stream")

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [{"id": "fake", "object": "model"}]})

    return Starlette(routes=[Route("/v1/completions", generate, methods=["POST"]),
                             Route("/v1/chat/completions", generate, methods=["POST"]),
                             Route("/v1/models", models)])


@pytest.fixture()
def fake_server() -> Iterator[tuple[str, FakeBooks]]:
    books = FakeBooks()
    with uvicorn_thread(fake_app(books)) as url:
        yield url, books


@pytest.mark.parametrize("api", ["completions", "chat"])
def test_run_grid_against_fake_server(fake_server: tuple[str, FakeBooks], api: str, tmp_path: Path) -> None:
    url, books = fake_server
    grid = [(1, 3), (4, 12)]
    cells = anyio.run(
        lambda: loadgen.run_grid(url, "fake", grid, max_tokens=5, api=api, warmup=2, progress=False,
                                 cell_timeout_s=20, request_timeout_s=10)
    )
    assert books.requests == 2 + 3 + 12 and books.peak <= 4
    assert [(c.concurrency, c.total) for c in cells] == grid
    for cell in cells:
        s = cell.summary()
        assert s["success_rate"] == 1.0 and s["errors"] == {}
        assert s["mean_completion_tokens"] == 5
        assert s["completion_tokens"] == 5 * cell.total
        assert s["ttft_p50_ms"] > 0 and s["itl_p50_ms"] > 0
        for r in cell.requests:
            assert r is not None and r.ok and len(r.itl_s) == 4  # 5 content chunks, 4 gaps
    json_path, md_path = loadgen.write_results(tmp_path / "run", cells, {"grid": ["1x3", "4x12"], "api": api})
    doc = json.loads(json_path.read_text())
    assert [c["total"] for c in doc["cells"]] == [3, 12] and "cpu_count" in doc["machine"]
    assert "| 4 | 12 | 100% |" in md_path.read_text()


def test_failures_are_recorded_not_raised(fake_server: tuple[str, FakeBooks]) -> None:
    url, _ = fake_server
    cells = anyio.run(lambda: loadgen.run_grid(url, "nope", [(2, 4)], max_tokens=3, progress=False))
    s = cells[0].summary()
    assert s["success_rate"] == 0.0 and s["mean_e2e_s"] is None
    (error,) = s["errors"]
    assert error.startswith("HTTP 404: ") and "unknown model" in error and s["errors"][error] == 4


def test_cell_time_limit(fake_server: tuple[str, FakeBooks]) -> None:
    url, _ = fake_server
    # 200 tokens at 2 ms each cannot finish in 0.1 s: every request is cut off.
    cells = anyio.run(
        lambda: loadgen.run_grid(url, "fake", [(2, 6)], max_tokens=200, progress=False, cell_timeout_s=0.1)
    )
    s = cells[0].summary()
    assert s["timed_out"] and s["success_rate"] == 0.0
    assert s["errors"] == {"unfinished at the cell time limit": 6}


def test_seed_table_reads_engine_metrics() -> None:
    spec = importlib.util.spec_from_file_location("seed_table", ROOT / "benchmarks" / "seed_table.py")
    assert spec is not None and spec.loader is not None
    seed_table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(seed_table)
    assert loadgen.parse_grid(seed_table.DEFAULT_GRID) == [
        (1, 4), (4, 16), (16, 64), (64, 256), (128, 256), (256, 512)
    ]
    text = (
        "# HELP lylm_engine_waiting Requests queued in the engine.\n"
        'lylm_engine_running{model="m",engine="0"} 64.0\n'
        'lylm_engine_waiting{model="m",engine="1"} 12.0\n'
        'lylm_requests_total{model="m",engine="0",outcome="completed"} 5.0\n'
        'lylm_requests_total{model="m",engine="0",outcome="failed"} 1.0\n'
        'lylm_requests_created{model="m",engine="0",outcome="failed"} 1.7e9\n'
    )
    assert seed_table.parse_engine_gauges(text) == {
        "running": {"0": 64.0}, "waiting": {"1": 12.0}, "ended": {"0": 6.0}
    }


def test_cli_writes_json_and_markdown(fake_server: tuple[str, FakeBooks], tmp_path: Path) -> None:
    url, books = fake_server
    # No --model: the CLI asks /v1/models.
    loadgen.main(["--url", url, "--grid", "2x4", "--max-tokens", "3", "--warmup", "0",
                  "--prompts", "shared-prefix", "--long-words", "20", "--no-progress", "--out", str(tmp_path / "r")])
    assert books.requests == 4
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["config"]["grid"] == ["2x4"] and doc["config"]["prompts"] == "shared-prefix"
    assert "| 2 | 4 | 100% |" in (tmp_path / "r.md").read_text()

"""A load generator that spreads one grid cell over several client processes.

On a GPU the engines stream tens of thousands of tokens per second; one Python
client parsing every SSE chunk can become the bottleneck and then measures itself.
Here a cell's concurrency is split over up to ``procs`` processes (spawned once,
reused for every cell), which start together at an agreed wall-clock time; each
runs the same per-request code as ``benchmarks/loadgen.py`` (streamed requests,
TTFT and inter-chunk gaps, tokens counted from the usage chunk) and also keeps the
usage's prompt and cached (prefix-cache hit) token counts. The cell's wall time
runs from the common start to the last process's end. Each process reports its CPU
time, so a saturated client shows in the results instead of being guessed at.

    with MultiClient(procs=4) as mc:
        cell = await mc.run(url, "completions", requests, concurrency=128)
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import anyio
import httpx

import harness  # noqa: F401  (sets sys.path for loadgen)
import loadgen


@dataclass
class Request(loadgen.RequestResult):
    """A loadgen RequestResult plus the usage's prompt and cached prompt tokens."""

    prompt_tokens: int | None = None
    cached_tokens: int | None = None
    tag: str | None = None


def body(model: str, api: str, prompt: Any, max_tokens: int, *, user: str | None = None,
         ignore_eos: bool = True) -> dict[str, Any]:
    """One streamed request body: ``prompt`` is text or token ids (completions) or text (chat)."""
    b: dict[str, Any] = {
        "model": model, "max_tokens": max_tokens, "stream": True,
        "stream_options": {"include_usage": True},
    }
    if api == "chat":
        b["messages"] = [{"role": "user", "content": prompt}]
    else:
        b["prompt"] = prompt
    if ignore_eos:
        b["ignore_eos"] = True
    if user is not None:
        b["user"] = user
    return b


async def one_request(client: httpx.AsyncClient, endpoint: str, api: str, payload: dict[str, Any],
                      timeout_s: float, tag: str | None = None) -> Request:
    """loadgen.one_request's measurement, for any body; never raises for HTTP or protocol errors."""
    start = time.perf_counter()
    ttft: float | None = None
    last: float | None = None
    gaps: list[float] = []
    chunks = 0
    usage: dict[str, Any] | None = None
    done = False
    try:
        with anyio.fail_after(timeout_s):
            async with client.stream("POST", endpoint, json=payload) as resp:
                if resp.status_code != 200:
                    text = (await resp.aread()).decode("utf-8", "replace")
                    return Request(False, time.perf_counter() - start, error=f"HTTP {resp.status_code}: {text[:200]}", tag=tag)
                async for data in loadgen.sse_data(resp.aiter_lines()):
                    if data == "[DONE]":
                        done = True
                        break
                    chunk = loadgen._loads(data)
                    if "error" in chunk:
                        return Request(False, time.perf_counter() - start, error=f"stream error: {str(chunk['error'])[:200]}", tag=tag)
                    if chunk.get("usage"):
                        usage = chunk["usage"]
                    if loadgen.chunk_text(chunk, api):
                        now = time.perf_counter()
                        if ttft is None:
                            ttft = now - start
                        else:
                            assert last is not None
                            gaps.append(now - last)
                        last = now
                        chunks += 1
    except TimeoutError:
        return Request(False, time.perf_counter() - start, ttft, gaps, error="request timeout", tag=tag)
    except (httpx.HTTPError, ValueError, KeyError, TypeError, AttributeError) as exc:
        return Request(False, time.perf_counter() - start, ttft, gaps, error=f"{type(exc).__name__}: {exc}"[:200], tag=tag)
    e2e = time.perf_counter() - start
    if not done:
        return Request(False, e2e, ttft, gaps, error="stream ended without [DONE]", tag=tag)
    tokens = int(usage.get("completion_tokens") or 0) if usage else chunks
    prompt_tokens = cached = None
    if usage:
        prompt_tokens = usage.get("prompt_tokens")
        details = usage.get("prompt_tokens_details") or {}
        cached = details.get("cached_tokens")
    return Request(True, e2e, ttft, gaps, tokens, prompt_tokens=prompt_tokens, cached_tokens=cached, tag=tag)


def _part(url: str, api: str, payloads: list[dict[str, Any]], tags: list[str | None], concurrency: int,
          start_at: float, cell_timeout_s: float, request_timeout_s: float) -> dict[str, Any]:
    """One client process's share of a cell (runs in a child process)."""
    endpoint = url.rstrip("/") + ("/v1/chat/completions" if api == "chat" else "/v1/completions")
    results: list[Request | None] = [None] * len(payloads)

    async def main() -> tuple[float, float, bool]:
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        timeout = httpx.Timeout(request_timeout_s, connect=30.0)
        async with httpx.AsyncClient(limits=limits, timeout=timeout, trust_env=False) as client:
            await anyio.sleep(max(0.0, start_at - time.time()))
            t0 = time.time()
            nxt = 0

            async def worker() -> None:
                nonlocal nxt
                while nxt < len(payloads):
                    i = nxt
                    nxt += 1
                    results[i] = await one_request(client, endpoint, api, payloads[i], request_timeout_s, tags[i])

            with anyio.move_on_after(cell_timeout_s) as scope:
                async with anyio.create_task_group() as tg:
                    for _ in range(min(concurrency, len(payloads))):
                        tg.start_soon(worker)
            return t0, time.time(), scope.cancelled_caught

    cpu0 = time.process_time()
    try:
        t0, t1, timed_out = anyio.run(main, backend_options={"use_uvloop": True})
    except ImportError:  # no uvloop
        t0, t1, timed_out = anyio.run(main)
    return {"t0": t0, "t1": t1, "timed_out": timed_out, "cpu_s": time.process_time() - cpu0, "results": results}


def _warm() -> bool:
    return True


class MultiClient:
    """A pool of spawned client processes that run grid cells together."""

    def __init__(self, procs: int = 4) -> None:
        self.procs = max(1, procs)
        ctx = multiprocessing.get_context("spawn")
        self._pool = concurrent.futures.ProcessPoolExecutor(max_workers=self.procs, mp_context=ctx)
        # Start every worker now, not inside the first measured cell.
        for f in [self._pool.submit(_warm) for _ in range(self.procs * 2)]:
            f.result()

    def __enter__(self) -> MultiClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self._pool.shutdown(cancel_futures=True)

    async def run(self, url: str, api: str, payloads: Sequence[dict[str, Any]], concurrency: int, *,
                  tags: Sequence[str | None] | None = None, cell_timeout_s: float = 300.0,
                  request_timeout_s: float = 300.0) -> loadgen.CellResult:
        """Send every payload once with at most ``concurrency`` in flight, over up to ``procs`` processes."""
        n = len(payloads)
        tags = list(tags) if tags is not None else [None] * n
        parts = min(self.procs, concurrency, max(n, 1))
        conc = [concurrency // parts + (1 if i < concurrency % parts else 0) for i in range(parts)]
        # Request j goes to the part whose share of requests is furthest below its share of concurrency.
        assigned: list[list[int]] = [[] for _ in range(parts)]
        for j in range(n):
            k = min(range(parts), key=lambda p: (len(assigned[p]) / conc[p], p))
            assigned[k].append(j)
        start_at = time.time() + 0.5
        futures = [
            self._pool.submit(_part, url, api, [payloads[j] for j in idx], [tags[j] for j in idx], conc[p],
                              start_at, cell_timeout_s, request_timeout_s)
            for p, idx in enumerate(assigned)
        ]
        outs = await anyio.to_thread.run_sync(lambda: [f.result() for f in futures])
        results: list[loadgen.RequestResult | None] = [None] * n
        for idx, out in zip(assigned, outs):
            for j, r in zip(idx, out["results"]):
                results[j] = r
        t0 = min(o["t0"] for o in outs)
        wall = max(o["t1"] for o in outs) - t0
        cell = loadgen.CellResult(concurrency, n, wall, results, timed_out=any(o["timed_out"] for o in outs))
        cell.extra["client_procs"] = parts
        cell.extra["client_cpu_share_max"] = max(o["cpu_s"] / max(o["t1"] - o["t0"], 1e-9) for o in outs)
        done = [r for r in results if isinstance(r, Request) and r.ok]
        prompt = sum(r.prompt_tokens or 0 for r in done)
        cached = [r.cached_tokens for r in done if r.cached_tokens is not None]
        cell.extra["prompt_tokens"] = prompt
        cell.extra["cached_tokens"] = sum(cached) if cached else None
        cell.extra["cache_hit_rate"] = (sum(cached) / prompt) if cached and prompt else None
        return cell

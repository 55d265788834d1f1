"""Reproduce the seed's (LyLM's) load-test table against any OpenAI-compatible server.

    flock /tmp/lylm-bench.lock .venv/bin/python benchmarks/seed_table.py --serve-demo \
        --max-tokens 64 --out benchmarks/results/seed_table_cpu

or, against a server that is already up:

    python benchmarks/seed_table.py --url http://127.0.0.1:8000 --model M --out benchmarks/results/x

Grid (``--grid`` to change it): concurrency 1, 4, 16, 64, 128, 256 with total
requests 4x the concurrency up to 64 and 2x above it:
1x4, 4x16, 16x64, 64x256, 128x256, 256x512. (The seed itself ran 128x512; 2x keeps
the CPU run short.) Columns: the seed's eight (conc, total, ok, e2e s, resp tok,
req tok/s, sys tok/s, total s) plus TTFT p50/p90/p99 and inter-token p50/p99.
Requests go to /v1/chat/completions (the seed's template served chat only), with
fixed ``max_tokens`` and ``ignore_eos`` so every row generates the same lengths.

``--serve-demo`` starts ``lylm serve`` with no config (the random-weight
tiny demo model on two CPU engines weighted 1:2) on 127.0.0.1 at a free port,
waits for /health to answer 200, runs the grid and stops it with SIGTERM. While
each cell runs it samples the server's /metrics (per-engine running/waiting
requests) so that queueing shows in the results rather than being guessed at.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import loadgen  # noqa: E402  (a sibling script, not a package)

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_GRID = "1x4,4x16,16x64,64x256,128x256,256x512"
DEMO_MODEL = "lylm-tiny-demo"
DEMO_WEIGHTS = (1, 2)  # lylm.cli.demo_config()
METRICS_PERIOD_S = 0.25


# ----------------------------------------------------------------------------- demo server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_healthy(url: str, proc: subprocess.Popen[bytes], timeout_s: float) -> None:
    """Poll ``/health`` until 200; fail early if the server process exits."""
    deadline = time.monotonic() + timeout_s
    with httpx.Client(timeout=5.0, trust_env=False) as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with status {proc.returncode} before it was healthy")
            try:
                if client.get(url + "/health").status_code == 200:
                    return
            except httpx.HTTPError:
                pass  # not listening yet: engines start before uvicorn binds
            time.sleep(1.0)
    raise TimeoutError(f"{url}/health did not answer 200 within {timeout_s:.0f} s")


def stop(proc: subprocess.Popen[bytes], timeout_s: float = 60.0) -> None:
    """SIGTERM (the server drains and shuts its engines down), SIGKILL if it hangs."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


@contextmanager
def demo_server(startup_timeout_s: float = 600.0) -> Iterator[str]:
    """`lylm serve`'s embedded demo on 127.0.0.1; yields its base URL."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tempfile.NamedTemporaryFile(prefix="seed_table_server_", suffix=".log", delete=False)
    cmd = [sys.executable, "-m", "lylm", "serve", "--host", "127.0.0.1",
           "--port", str(port), "--log-level", "warning"]
    print(f"starting {' '.join(cmd)} (log: {log.name})", file=sys.stderr)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ), stdout=log, stderr=subprocess.STDOUT)
    try:
        t0 = time.monotonic()
        wait_healthy(url, proc, startup_timeout_s)
        print(f"server healthy after {time.monotonic() - t0:.0f} s", file=sys.stderr)
        yield url
    except BaseException:
        tail = Path(log.name).read_text(errors="replace")[-3000:]
        print(f"--- server log tail ---\n{tail}", file=sys.stderr)
        raise
    finally:
        stop(proc)
        log.close()


# ----------------------------------------------------------------------------- /metrics sampling

_SAMPLE = re.compile(r"^(lylm_engine_running|lylm_engine_waiting|lylm_requests_total)\{([^}]*)\}\s+(\S+)$")
_ENGINE = re.compile(r'engine="([^"]*)"')
_GAUGES = {"lylm_engine_running": "running", "lylm_engine_waiting": "waiting", "lylm_requests_total": "ended"}


def parse_engine_gauges(text: str) -> dict[str, dict[str, float]]:
    """``{"running"|"waiting"|"ended": {engine: value}}`` from a Prometheus exposition.

    ``ended`` sums lylm_requests_total over its outcomes (completed, failed, aborted).
    """
    out: dict[str, dict[str, float]] = {"running": {}, "waiting": {}, "ended": {}}
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        engine = _ENGINE.search(m.group(2)) if m else None
        if m and engine:
            per_engine = out[_GAUGES[m.group(1)]]
            per_engine[engine.group(1)] = per_engine.get(engine.group(1), 0.0) + float(m.group(3))
    return out


async def _scrape(client: httpx.AsyncClient, url: str) -> dict[str, dict[str, float]]:
    try:
        return parse_engine_gauges((await client.get(url + "/metrics")).text)
    except httpx.HTTPError:
        return {"running": {}, "waiting": {}, "ended": {}}


def metrics_monitor(url: str) -> loadgen.CellMonitor:
    """Per cell: each engine's peak running and waiting counts, and how many requests it served."""

    @asynccontextmanager
    async def monitor(concurrency: int, total: int) -> AsyncIterator[dict[str, Any]]:
        peaks: dict[str, dict[str, float]] = {"running": {}, "waiting": {}}
        extra: dict[str, Any] = {}

        async def sample(client: httpx.AsyncClient) -> None:
            while True:  # ends when the cell does (cancelled below)
                gauges = await _scrape(client, url)
                for kind in peaks:
                    for engine, value in gauges[kind].items():
                        peaks[kind][engine] = max(peaks[kind].get(engine, 0.0), value)
                await anyio.sleep(METRICS_PERIOD_S)

        async with httpx.AsyncClient(timeout=5.0, trust_env=False) as client:
            before = (await _scrape(client, url))["ended"]
            async with anyio.create_task_group() as tg:
                tg.start_soon(sample, client)
                try:
                    yield extra
                finally:
                    tg.cancel_scope.cancel()
            after = (await _scrape(client, url))["ended"]
        extra["peak_running_per_engine"] = dict(sorted(peaks["running"].items()))
        extra["peak_waiting_per_engine"] = dict(sorted(peaks["waiting"].items()))
        extra["requests_per_engine"] = {e: int(after[e] - before.get(e, 0.0)) for e in sorted(after)}

    return monitor


# ----------------------------------------------------------------------------- notes


def demo_notes(summaries: list[dict[str, Any]]) -> str:
    """What the demo run measures, and the engine facts its numbers should be read against."""
    from lylm.testing import TINY_MODEL_ENGINE_ARGS

    max_seqs = int(TINY_MODEL_ENGINE_ARGS["max_num_seqs"])
    share = DEMO_WEIGHTS[1] / sum(DEMO_WEIGHTS)
    lines = [
        "## What this measures",
        "",
        f"The model is `{DEMO_MODEL}`, lylm's embedded demo: a tiny Qwen2-shaped model (2 layers,",
        "hidden size 128, vocabulary 512) with RANDOM weights, served by `lylm serve` with no",
        f"config on two vLLM CPU engines weighted {DEMO_WEIGHTS[0]}:{DEMO_WEIGHTS[1]} (weighted-random balancing).",
        "Tokens/s here measure the serving machinery (HTTP, SSE, the pool, vLLM's scheduler) plus a",
        "tiny model, not a real LLM; compare rows with each other, not with the seed's GPU numbers.",
        "The load generator, the server and both engines share the same CPUs.",
        "",
        "Engine facts (lylm/testing/_tiny_model.py, TINY_MODEL_ENGINE_ARGS):",
        f"max_num_seqs={max_seqs} per engine, so the pool runs at most {2 * max_seqs} sequences at once;",
        f"max_model_len={TINY_MODEL_ENGINE_ARGS['max_model_len']}; "
        f"kv_cache_memory_bytes={TINY_MODEL_ENGINE_ARGS['kv_cache_memory_bytes']} (~130k tokens per engine,",
        f"far more than {max_seqs} short prompts plus their max_tokens need); "
        f"enforce_eager={TINY_MODEL_ENGINE_ARGS['enforce_eager']}.",
        f"Weighted random sends ~{share:.0%} of requests to engine 1, so that engine alone passes",
        f"{max_seqs} in flight once concurrency exceeds ~{max_seqs / share:.0f} (earlier, with random fluctuation);",
        "requests beyond max_num_seqs wait in its queue while engine 0 still has free slots.",
        f"Peak running/waiting per engine, sampled from the server's /metrics every {METRICS_PERIOD_S} s:",
        "",
        "| conc | total | requests served (engine 0, 1) | peak running (engine 0, 1) | peak waiting (engine 0, 1) |",
        "|---|---|---|---|---|",
    ]
    for s in summaries:
        cols = [s.get(k) or {} for k in ("requests_per_engine", "peak_running_per_engine", "peak_waiting_per_engine")]
        lines.append(
            f"| {s['concurrency']} | {s['total']} | "
            + " | ".join(", ".join(f"{v:.0f}" for v in col.values()) or "-" for col in cols)
            + " |"
        )
    lines += ["", *observations(summaries, max_seqs)]
    return "\n".join(lines) + "\n"


def observations(summaries: list[dict[str, Any]], max_seqs: int) -> list[str]:
    """Plain statements read off the numbers: the throughput peak, and where queues formed."""
    rates = [(s["system_tokens_per_s"] or 0.0, s) for s in summaries]
    if not rates:
        return []
    best_rate, best = max(rates, key=lambda r: r[0])
    out = [
        "## Observations (computed from the rows above)",
        "",
        f"- System throughput peaks at {best_rate:.0f} tok/s at concurrency {best['concurrency']}.",
    ]
    last_rate, last = rates[-1]
    if last is not best and best_rate:
        out.append(
            f"- At concurrency {last['concurrency']} it is {last_rate:.0f} tok/s "
            f"({(1 - last_rate / best_rate):.0%} below the peak) while TTFT p50 is "
            f"{last['ttft_p50_ms'] or 0:.0f} ms against {best['ttft_p50_ms'] or 0:.0f} ms at the peak."
        )
    for s in summaries:
        waiting = s.get("peak_waiting_per_engine") or {}
        served = s.get("requests_per_engine") or {}
        if not any(waiting.values()):
            continue
        queued = ", ".join(f"engine {e}: {v:.0f}" for e, v in waiting.items() if v)
        line = (
            f"- {s['concurrency']}x{s['total']}: requests queued inside the engines (peak waiting {queued}; "
            f"max_num_seqs={max_seqs} running per engine)"
        )
        if served and sum(served.values()):
            waves = ", ".join(f"engine {e}: {n} requests = {n / max_seqs:.1f} batches of {max_seqs}"
                              for e, n in served.items())
            line += (
                f"; served {waves}. With equal slots, the engine holding more of the work has the longer"
                " queue and is still draining it after the other has run out of requests"
            )
        out.append(line + ".")
    return out


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Reproduce the seed's concurrency table.")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--url", help="base URL of a running OpenAI-compatible server")
    target.add_argument("--serve-demo", action="store_true", help="start lylm serve's embedded demo")
    parser.add_argument("--grid", default=DEFAULT_GRID, help=f"CONCxTOTAL cells (default {DEFAULT_GRID})")
    parser.add_argument("--no-metrics", dest="metrics", action="store_false", help="do not sample /metrics")
    loadgen.add_load_arguments(parser, default_api="chat")
    parser.set_defaults(max_tokens=64)
    args = parser.parse_args(argv)
    grid = loadgen.parse_grid(args.grid)

    def run(url: str) -> None:
        model = args.model or loadgen.first_model(url)
        monitor = metrics_monitor(url) if args.metrics else None
        cells = anyio.run(loadgen.run_from_args, args, url, model, grid, monitor)
        summaries = [c.summary() for c in cells]
        print(loadgen.markdown_table(summaries), end="")
        if args.out:
            config = loadgen.run_config(args, url, model, grid)
            config["server"] = "lylm serve (embedded demo)" if args.serve_demo else url
            notes = demo_notes(summaries) if args.serve_demo else ""
            paths = loadgen.write_results(args.out, cells, config, notes=notes)
            print(f"wrote {paths[0]} and {paths[1]}", file=sys.stderr)

    if args.serve_demo:
        with demo_server() as url:
            run(url)
    else:
        run(args.url)


if __name__ == "__main__":  # the demo server spawns vLLM engine processes
    main()

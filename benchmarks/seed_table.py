"""Reproduce the seed's (LyLM's) load-test table against any OpenAI-compatible server.

    python benchmarks/seed_table.py --serve-demo [--device cpu|gpu] [--model-dir DIR] [--shape NAME] \
        [--engine-args JSON] [--gpu-mem 0.4] [--max-tokens 64] [--out benchmarks/results/seed_table_cpu]

(on a shared machine inside ``flock /tmp/lylm-bench.lock``), or, against a server that is already up:

    python benchmarks/seed_table.py --url http://127.0.0.1:8000 --model M [--device cpu|gpu] \
        [--engine-args JSON] --out benchmarks/results/x

Grid (``--grid`` to change it): concurrency 1, 4, 16, 64, 128, 256 with total
requests 4x the concurrency up to 64 and 2x above it:
1x4, 4x16, 16x64, 64x256, 128x256, 256x512. (The seed itself ran 128x512; 2x keeps
the CPU run short.) Columns: the seed's eight (conc, total, ok, e2e s, resp tok,
req tok/s, sys tok/s, total s) plus TTFT p50/p90/p99 and inter-token p50/p99.
Requests go to /v1/chat/completions (the seed's template served chat only), with
fixed ``max_tokens`` and ``ignore_eos`` so every row generates the same lengths.

``--serve-demo`` starts ``lylm serve`` with the embedded demo's pool on the target
(``harness``): two instances of the target's model weighted 1:2 (weighted-random
balancing). On ``--device cpu`` (the default without a GPU) that is exactly the demo
(``lylm serve`` with no config): the tiny random-weight model on two CPU engines with
the tests' engine args, served as ``lylm-tiny-demo``; on ``--device gpu --model-dir DIR``
both instances share GPU 0 with ``gpu_memory_utilization`` = ``--gpu-mem`` each. It
waits for /health, runs the grid and stops the server with SIGTERM. While each cell
runs it samples the server's /metrics (per-engine running/waiting requests) so that
queueing shows in the results rather than being guessed at. With ``--url`` nothing
starts; ``--device`` and ``--engine-args`` then only record where the server runs and
how (a client cannot see them; left out, they are recorded as not known).

Results go through ``harness.save_results``: OUT.json (provenance block first), OUT.md,
OUT.png and, with ``--serve-demo``, OUT_logs.tar.gz (the server's log).
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import loadgen  # noqa: E402  (a sibling script, not a package)

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


def demo_notes(summaries: list[dict[str, Any]], engine_args: dict[str, Any], device: str, served: str) -> str:
    """What the demo run measures, and the engine facts its numbers should be read against."""
    max_seqs = int(engine_args.get("max_num_seqs") or 0)
    share = DEMO_WEIGHTS[1] / sum(DEMO_WEIGHTS)
    where = "two vLLM CPU engines" if device == "cpu" else "two vLLM engines sharing GPU 0"
    lines = ["## What this measures", ""]
    if device == "cpu" and engine_args.get("load_format") == "dummy":
        lines += [
            f"The model is `{served}`, lylm's embedded demo: a tiny Qwen2-shaped model (2 layers,",
            "hidden size 128, vocabulary 512) with RANDOM weights, served by `lylm serve` on",
            f"{where} weighted {DEMO_WEIGHTS[0]}:{DEMO_WEIGHTS[1]} (weighted-random balancing).",
            "Tokens/s here measure the serving machinery (HTTP, SSE, the pool, vLLM's scheduler) plus a",
            "tiny model, not a real LLM; compare rows with each other, not with the seed's GPU numbers.",
            "The load generator, the server and both engines share the same CPUs.",
        ]
    else:
        lines += [
            f"The model is `{engine_args.get('model')}` (served as `{served}`), served by `lylm serve` on",
            f"{where} weighted {DEMO_WEIGHTS[0]}:{DEMO_WEIGHTS[1]} (weighted-random balancing).",
        ]
    lines += [
        "",
        "Engine facts (the engine args in this file's provenance block):",
        f"max_num_seqs={max_seqs} per engine, so the pool runs at most {2 * max_seqs} sequences at once;",
        f"max_model_len={engine_args.get('max_model_len')}; "
        f"kv_cache_memory_bytes={engine_args.get('kv_cache_memory_bytes')}; "
        f"enforce_eager={engine_args.get('enforce_eager')}.",
    ]
    if max_seqs:
        lines += [
            f"Weighted random sends ~{share:.0%} of requests to engine 1, so that engine alone passes",
            f"{max_seqs} in flight once concurrency exceeds ~{max_seqs / share:.0f} (earlier, with random "
            "fluctuation);",
            "requests beyond max_num_seqs wait in its queue while engine 0 still has free slots.",
        ]
    lines += [
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
        if served and sum(served.values()) and max_seqs:
            waves = ", ".join(f"engine {e}: {n} requests = {n / max_seqs:.1f} batches of {max_seqs}"
                              for e, n in served.items())
            line += (
                f"; served {waves}. With equal slots, the engine holding more of the work has the longer"
                " queue and is still draining it after the other has run out of requests"
            )
        out.append(line + ".")
    return out


# ----------------------------------------------------------------------------- main


def with_progress(monitor: loadgen.CellMonitor | None, progress: Any) -> loadgen.CellMonitor:
    """``monitor`` (or none), then one ``progress`` step as each cell ends."""

    @asynccontextmanager
    async def wrapped(concurrency: int, total: int) -> AsyncIterator[dict[str, Any]]:
        if monitor is None:
            yield {}
        else:
            async with monitor(concurrency, total) as extra:
                yield extra
        progress.step(f"{concurrency}x{total}")

    return wrapped


def main(argv: list[str] | None = None) -> None:
    import harness  # not at the top: harness imports this module (free_port, stop, wait_healthy)

    parser = argparse.ArgumentParser(description="Reproduce the seed's concurrency table.")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--url", help="base URL of a running OpenAI-compatible server")
    target.add_argument("--serve-demo", action="store_true",
                        help="start lylm serve with the demo's pool (two instances, weights 1:2) on the target")
    parser.add_argument("--grid", default=DEFAULT_GRID, help=f"CONCxTOTAL cells (default {DEFAULT_GRID})")
    parser.add_argument("--no-metrics", dest="metrics", action="store_false", help="do not sample /metrics")
    parser.add_argument("--gpu-mem", type=float, default=0.4,
                        help="--serve-demo on a GPU: gpu_memory_utilization of each of the two instances")
    parser.add_argument("--log-dir", default=None, help="--serve-demo: the server's log (default: a temp dir)")
    harness.add_target_arguments(parser)
    loadgen.add_load_arguments(parser, default_api="chat")
    parser.set_defaults(max_tokens=64)
    args = parser.parse_args(argv)
    grid = loadgen.parse_grid(args.grid)
    progress = harness.Progress(len(grid), "seed_table")

    def run(url: str, engine_args: dict[str, Any] | None, log_dir: Path | None) -> None:
        model = args.model or loadgen.first_model(url)
        monitor = with_progress(metrics_monitor(url) if args.metrics else None, progress)
        cells = anyio.run(loadgen.run_from_args, args, url, model, grid, monitor)
        summaries = [c.summary() for c in cells]
        print(loadgen.markdown_table(summaries), end="")
        if not args.out:
            return
        config = loadgen.run_config(args, url, model, grid)
        config["server"] = "lylm serve (the demo's pool: two instances, weights 1:2)" if args.serve_demo else url
        if args.serve_demo:
            config["shape"] = args.shape if args.device == "gpu" else None
        notes = demo_notes(summaries, engine_args or {}, args.device, model) if args.serve_demo else ""
        result, md = loadgen.results_doc(cells, config, notes=notes, machine=harness.device_info())
        harness.save_results(args.out, result, md, log_dir, engine_args=engine_args,
                             sampling=loadgen.sampling_settings(config), client=loadgen.client_settings(config))
        print(f"wrote {args.out}.json and {args.out}.md", file=sys.stderr)

    if not args.serve_demo:
        # Nothing starts: the target arguments only record what the caller says about the server.
        harness.DEVICE = args.device
        overrides = json.loads(args.engine_args)
        run(args.url, overrides or None, None)
        return
    harness.resolve_target(args)
    served = DEMO_MODEL if args.device == "cpu" else args.shape
    eargs = harness.engine_args(args.model_dir, json.loads(args.engine_args), gpu_memory_utilization=args.gpu_mem)
    log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="seed-table-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    instances = [{"devices": harness.devices(weight=w), "engine_args": eargs} for w in DEMO_WEIGHTS]
    config_path = harness.write_lylm_config(log_dir / "lylm.json", served, instances)
    port = free_port()
    with harness.server("lylm", harness.lylm_serve_command(config_path, port), log_dir, port, timeout_s=600) as url:
        run(url, eargs, log_dir)


if __name__ == "__main__":  # the demo server spawns vLLM engine processes
    main()

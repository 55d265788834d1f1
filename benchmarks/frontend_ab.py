"""Two checkouts of lylm side by side: the server's CPU per request and throughput, rounds alternating.

    git worktree add /tmp/lylm-base BASE_COMMIT
    python benchmarks/frontend_ab.py --a /tmp/lylm-base --b . [--server fake|tiny] [--workers 2] \
        [--requests 1500] [--concurrency 32] [--max-tokens 8] [--rounds 4] [--out PREFIX]

Each checkout serves on its own port at the same time (``--server fake``: ``python -m
lylm.testing.fake_server``, FakeEngines, so the numbers are the front end's alone;
``tiny``: ``lylm serve`` over one engine of the tiny test model on the CPU build, where
the engine core dominates). One asyncio client (httpx) sends ``--requests`` streamed
completions of 32 token ids and ``--max-tokens`` tokens (``ignore_eos``), ``--concurrency``
at a time, to one server then the other, the order alternating per round; per round:
requests per second, the client's TTFT p50, and the server's CPU (its process tree:
main process, hub, workers, and with ``tiny`` the engine) per request. For a change to
the per-request path, where one machine's noise is larger than the change, the CPU per
request is the number to read.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

import harness


async def load(port: int, model: str, n: int, concurrency: int, tokens: int) -> tuple[float, float]:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    ttfts: list[float] = []
    async with httpx.AsyncClient(limits=limits, timeout=60, trust_env=False) as client:
        slots = asyncio.Semaphore(concurrency)

        async def one() -> None:
            async with slots:
                body = {"model": model, "prompt": list(range(1, 33)), "max_tokens": tokens, "ignore_eos": True,
                        "stream": True, "temperature": 0.7}
                started, first = time.monotonic(), None
                async with client.stream("POST", f"http://127.0.0.1:{port}/v1/completions", json=body) as r:
                    async for line in r.aiter_lines():
                        if first is None and line.startswith("data: {"):
                            first = time.monotonic() - started
                if first is not None:
                    ttfts.append(first)

        t0 = time.monotonic()
        await asyncio.gather(*(one() for _ in range(n)))
        return n / (time.monotonic() - t0), statistics.median(ttfts) * 1e3


def per_round(rounds: list[dict[str, float]]) -> str:
    return ", ".join(f"{x['server_cpu_ms_per_request']:.2f}" for x in rounds)


def command(server: str, port: int, workers: int, config: Path) -> list[str]:
    if server == "fake":
        return [sys.executable, "-m", "lylm.testing.fake_server", "--port", str(port), "--workers", str(workers)]
    return [*harness.lylm_serve_command(config, port), "--workers", str(workers)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--a", required=True, help="a checkout of lylm (the base)")
    parser.add_argument("--b", required=True, help="another checkout (the change)")
    parser.add_argument("--server", choices=["fake", "tiny"], default="fake")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--requests", type=int, default=1500)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--out", default=str(harness.BENCH / "results" / "frontend_ab"))
    args = parser.parse_args()
    harness.DEVICE = "cpu"
    log_dir = Path(tempfile.mkdtemp(prefix="frontend-ab-"))
    config = log_dir / "tiny.json"
    model = "fake"
    if args.server == "tiny":
        from lylm.testing import TINY_MODEL_ENGINE_ARGS, build_tiny_model

        tiny = build_tiny_model(log_dir / "model")
        model = "m"
        config.write_text(json.dumps({"models": {model: [{"engine_args": {"model": str(tiny), **TINY_MODEL_ENGINE_ARGS}}]}}))
    arms = {"a": str(Path(args.a).resolve()), "b": str(Path(args.b).resolve())}
    ports = {name: harness.free_port() for name in arms}
    procs: dict[str, subprocess.Popen[bytes]] = {}
    rows: dict[str, list[dict[str, float]]] = {name: [] for name in arms}
    try:
        for name, root in arms.items():
            log = open(log_dir / f"{name}.log", "wb")
            procs[name] = subprocess.Popen(command(args.server, ports[name], args.workers, config), cwd=root,
                                           env={**os.environ, "PYTHONPATH": root}, stdout=log, stderr=subprocess.STDOUT)
            harness.wait_healthy(f"http://127.0.0.1:{ports[name]}", procs[name], timeout_s=300)
            asyncio.run(load(ports[name], model, 300, args.concurrency, args.max_tokens))  # warm-up
        for r in range(args.rounds):
            for name in (list(arms) if r % 2 == 0 else list(reversed(arms))):
                cpu0 = harness.tree_cpu(procs[name].pid)
                rps, ttft = asyncio.run(load(ports[name], model, args.requests, args.concurrency, args.max_tokens))
                cpu_ms = (harness.tree_cpu(procs[name].pid) - cpu0) / args.requests * 1e3
                rows[name].append({"requests_per_s": rps, "ttft_p50_ms": ttft, "server_cpu_ms_per_request": cpu_ms})
                print(f"round {r} {name}: {rps:.0f} requests/s, TTFT p50 {ttft:.1f} ms, "
                      f"server CPU {cpu_ms:.2f} ms a request", flush=True)
    finally:
        for proc in procs.values():
            harness.stop(proc, timeout_s=60)
    med = {name: {k: statistics.median(x[k] for x in rs) for k in rs[0]} for name, rs in rows.items()}
    md = (
        f"{args.server} server, {args.workers} workers, {args.requests} x {args.max_tokens}-token streams, "
        f"{args.concurrency} at a time, {args.rounds} rounds\n\n"
        "| checkout | requests/s | TTFT p50 ms | server CPU ms a request (per round) |\n|---|---|---|---|\n"
        + "".join(
            f"| {name} ({Path(arms[name]).name}) | {m['requests_per_s']:.0f} | {m['ttft_p50_ms']:.1f} | "
            f"{m['server_cpu_ms_per_request']:.2f} ({per_round(rows[name])}) |\n"
            for name, m in med.items()
        )
    )
    print(md)
    commits = {}
    for name, root in arms.items():
        out = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True)
        commits[name] = out.stdout.strip() or None
    client = {"kind": "one asyncio process, httpx", "requests": args.requests, "concurrency": args.concurrency,
              "rounds": args.rounds}
    harness.save_results(args.out, {"settings": vars(args), "commits": commits, "rounds": rows, "medians": med}, md,
                         engine_args=None, sampling={"max_tokens": args.max_tokens, "ignore_eos": True, "stream": True},
                         client=client)


if __name__ == "__main__":
    main()

"""The most streamed tokens/s one lylm server process sustains, with zero-latency
FakeEngines behind it, and where its time goes (a pyinstrument profile).

    flock /tmp/lylm-bench.lock python benchmarks/frontend_ceiling.py \
        [--grid 16x128,64x256,256x512] [--max-tokens 256] [--engines 2] [--no-profile] \
        [--out benchmarks/results/frontend_ceiling]

The server (``python -m lylm.testing.fake_server``) runs under pyinstrument in its own process
(``--no-profile``: without it, e.g. where pyinstrument is not installed);
the load generator runs in this one. On a 2-core machine the two share the CPU,
so the ceiling is a lower bound of what a dedicated core would give.

No vLLM engine starts (FakeEngines answer at once), so there is no ``--device``: the
numbers are the front end's on this machine's CPU. Writes OUT.json (the harness's
provenance block first), OUT.md, OUT.png and OUT_profile.txt.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import signal
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio

import harness
import loadgen
from seed_table import free_port, wait_healthy


def trim_profile(path: str, share: float = 0.01) -> str:
    """pyinstrument's call tree, keeping frames that took at least ``share`` of the run."""
    lines = open(path).read().splitlines()
    total = None
    kept = []
    for line in lines:
        match = re.search(r"(\d+\.\d+) ", line)
        if match is None or "Recorded:" in line or "Duration:" in line:
            kept.append(line)
            continue
        seconds = float(match.group(1))
        total = total or seconds
        if seconds >= share * total:
            kept.append(line)
    return "\n".join(kept) + "\n"


def cell_progress(progress: harness.Progress) -> loadgen.CellMonitor:
    """A loadgen cell monitor that only reports each cell's end."""

    @asynccontextmanager
    async def monitor(concurrency: int, total: int) -> AsyncIterator[dict[str, Any]]:
        yield {}
        progress.step(f"{concurrency}x{total}")

    return monitor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", default="16x128,64x256,256x512")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=8, help="unrecorded requests sent first")
    parser.add_argument("--engines", type=int, default=2, help="FakeEngines behind the server")
    parser.add_argument("--no-profile", dest="profile", action="store_false",
                        help="run the server without pyinstrument")
    parser.add_argument("--out", default=str(harness.BENCH / "results" / "frontend_ceiling"))
    args = parser.parse_args()
    harness.DEVICE = "cpu"  # no engine: the front end and its FakeEngines run on this machine's CPU
    if args.profile and importlib.util.find_spec("pyinstrument") is None:
        raise SystemExit("pyinstrument is not installed (pip install pyinstrument, or the bench extra); "
                         "or run with --no-profile")
    grid = loadgen.parse_grid(args.grid)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    profile = os.path.join(tempfile.gettempdir(), "lylm-frontend-profile.txt")
    server = ["-m", "lylm.testing.fake_server", "--port", str(port), "--engines", str(args.engines)]
    profiler = [sys.executable, "-m", "pyinstrument", "-r", "text", "--show-all", "-o", profile]
    command = [*profiler, *server] if args.profile else [sys.executable, *server]
    progress = harness.Progress(len(grid), "frontend_ceiling")
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(command, cwd=harness.ROOT, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_healthy(url, proc, timeout_s=120)
            cells = anyio.run(
                lambda: loadgen.run_grid(url, "fake", grid, max_tokens=args.max_tokens, warmup=args.warmup,
                                         monitor=cell_progress(progress))
            )
        finally:
            proc.send_signal(signal.SIGINT)  # uvicorn exits cleanly; pyinstrument writes the profile
            proc.wait(120)
    if args.profile:
        with open(args.out + "_profile.txt", "w") as f:
            f.write(trim_profile(profile))
    config = {"grid": args.grid, "max_tokens": args.max_tokens, "warmup": args.warmup, "engines": args.engines,
              "profiled": args.profile, "server": " ".join(command[1:]), "model": "FakeEngines"}
    result, _ = loadgen.results_doc(cells, config)
    summaries = result["cells"]
    md = loadgen.markdown_table(summaries)
    best = max(s["system_tokens_per_s"] or 0 for s in summaries)
    md += (f"\nCeiling: {best:.0f} streamed tokens/s from one server process "
           f"(FakeEngines, {args.engines} engines{', under pyinstrument' if args.profile else ''}).\n")
    print(md)
    sampling = {"api": "completions", "prompts": "short", "seed": 0, "max_tokens": args.max_tokens,
                "ignore_eos": True, "stream": True, "tokens": "the FakeEngines' scripted tokens, no delay"}
    client = {"kind": "loadgen.run_grid (one process, httpx)", "url": url, "grid": args.grid, "warmup": args.warmup}
    harness.save_results(args.out, result, md, engine_args=None, sampling=sampling, client=client)


if __name__ == "__main__":
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    main()

"""The most streamed tokens/s one lylm server process sustains, with zero-latency
FakeEngines behind it, and where its time goes (a pyinstrument profile).

    flock /tmp/lylm-bench.lock python benchmarks/frontend_ceiling.py \
        [--grid 16x128,64x256,256x512] [--max-tokens 256] [--out benchmarks/results/frontend_ceiling]

The server (benchmarks/fake_server.py) runs under pyinstrument in its own process;
the load generator runs in this one. On a 2-core machine the two share the CPU,
so the ceiling is a lower bound of what a dedicated core would give.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import anyio

import loadgen
from seed_table import free_port, wait_healthy

ROOT = Path(__file__).resolve().parent.parent


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", default="16x128,64x256,256x512")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--out", default="benchmarks/results/frontend_ceiling")
    args = parser.parse_args()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    profile = os.path.join(tempfile.gettempdir(), "lylm-frontend-profile.txt")
    command = [
        sys.executable, "-m", "pyinstrument", "-r", "text", "--show-all", "-o", profile,
        str(ROOT / "benchmarks" / "fake_server.py"), "--port", str(port),
    ]
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_healthy(url, proc, timeout_s=120)
            cells = anyio.run(
                lambda: loadgen.run_grid(url, "fake", loadgen.parse_grid(args.grid), max_tokens=args.max_tokens, warmup=8)
            )
        finally:
            proc.send_signal(signal.SIGINT)  # uvicorn exits cleanly; pyinstrument writes the profile
            proc.wait(120)
    with open(args.out + "_profile.txt", "w") as f:
        f.write(trim_profile(profile))
    summaries = [c.summary() for c in cells]
    md = loadgen.markdown_table(summaries)
    best = max(s["system_tokens_per_s"] or 0 for s in summaries)
    md += f"\nCeiling: {best:.0f} streamed tokens/s from one server process (FakeEngines, 2 engines).\n"
    print(md)
    with open(args.out + ".json", "w") as f:
        json.dump({"config": vars(args), "machine": loadgen.machine_info(), "cells": summaries}, f, indent=2)
    with open(args.out + ".md", "w") as f:
        f.write(md)


if __name__ == "__main__":
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    main()

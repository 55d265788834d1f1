"""Memory of a full PrefixAware: its block table at max_blocks and its sessions at max_sessions.

    python benchmarks/prefix_memory.py [--scale 1.0] [--out benchmarks/results/prefix_memory]

Drives a default ``PrefixAware`` (max_blocks 65,536, max_sessions 65,536) through
``choose()`` on 8 engines with twice as much as each bound holds: distinct
1,024-token prompts (the table), then one new session key per request (the
sessions). What it holds at the end is measured with tracemalloc (the requests are
built before measuring: the pool holds them anyway), with the largest size seen on
the way, which must not pass the bound. ``--scale`` shrinks both bounds (and the
requests with them) for a quick check; the published numbers use 1.0.

No engine (FakeEngines, this process's Python heap), so there is no ``--device``. Writes
OUT.json (the harness's provenance block first) and OUT.md.
"""

from __future__ import annotations

import argparse
import platform
import random
import tracemalloc
from collections.abc import Callable
from typing import Any

import harness
from lylm import EngineSpec, Instance, RequestInfo
from lylm.balancers import PrefixAware
from lylm.testing import FakeEngine


def measure(
    balancer: PrefixAware, engines: list[Instance], requests: list[RequestInfo], size: Callable[[], int]
) -> tuple[int, int]:
    """Bytes the balancer holds after ``requests``, and the largest size seen meanwhile."""
    tracemalloc.start()
    start, _ = tracemalloc.get_traced_memory()
    largest = 0
    for r in requests:
        balancer.choose(engines, r)
        largest = max(largest, size())
    held, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return held - start, largest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=1.0, help="multiply max_blocks and max_sessions (default 1)")
    parser.add_argument("--out", default=str(harness.BENCH / "results" / "prefix_memory"))
    args = parser.parse_args()
    harness.DEVICE = "cpu"  # no engine: the balancer's memory in this process
    progress = harness.Progress(2, "prefix_memory")
    rng = random.Random(0)
    engines = []
    for i in range(8):
        engine = FakeEngine()
        engine.started = True
        engines.append(Instance(EngineSpec(model="m", engine_args={"model": "x"}, index=i), engine))
    result: dict[str, Any] = {"python": platform.python_version()}
    bounds: dict[str, Any] = {}
    if args.scale != 1.0:
        defaults = PrefixAware()
        bounds = {"max_blocks": max(int(defaults.table.max_blocks * args.scale), 64),
                  "max_sessions": max(int(defaults.max_sessions * args.scale), 64)}
    result["bounds"] = bounds or "the defaults"

    # 1. The block table alone: distinct 1,024-token prompts, no session keys.
    balancer = PrefixAware(rng=random.Random(0), **bounds)
    per_request = 1024 // balancer.block_size
    n = 2 * balancer.table.max_blocks // per_request
    requests = [
        RequestInfo(model="m", request_id=str(i), prompt_tokens=1024, max_tokens=16,
                    prompt_token_ids=[rng.randrange(512) for _ in range(1024)])
        for i in range(n)
    ]
    held, largest = measure(balancer, engines, requests, lambda: len(balancer.table))
    result["table"] = {
        "requests": n, "max_blocks": balancer.table.max_blocks, "entries": len(balancer.table),
        "largest_seen": largest, "evictions": balancer.table.evictions,
        "held_mib": round(held / 2**20, 2), "bytes_per_entry": round(held / len(balancer.table), 1),
    }
    progress.step(f"block table: {result['table']['held_mib']} MiB")

    # 2. Sessions alone: short prompts (no full block), one new session key each.
    balancer = PrefixAware(rng=random.Random(0), **bounds)
    n = 2 * balancer.max_sessions
    requests = [
        RequestInfo(model="m", request_id=str(i), prompt_tokens=8, max_tokens=16,
                    prompt_token_ids=[1] * 8, session_key=f"user-{i:06d}")
        for i in range(n)
    ]
    held, largest = measure(balancer, engines, requests, lambda: balancer.sessions)
    result["sessions"] = {
        "requests": n, "max_sessions": balancer.max_sessions, "entries": balancer.sessions,
        "largest_seen": largest, "held_mib": round(held / 2**20, 2),
        "bytes_per_entry": round(held / balancer.sessions, 1),
        "note": "the key strings are allocated before measuring, as the pool holds them anyway",
    }
    progress.step(f"sessions: {result['sessions']['held_mib']} MiB")
    md = ["| what | bound | requests | entries at the end | largest seen | held MiB | bytes per entry |",
          "|---|---|---|---|---|---|---|"]
    for key, bound in (("table", "max_blocks"), ("sessions", "max_sessions")):
        r = result[key]
        md.append(f"| {key} | {r[bound]} | {r['requests']} | {r['entries']} | {r['largest_seen']} | "
                  f"{r['held_mib']} | {r['bytes_per_entry']} |")
    print("\n".join(md))
    client = {"kind": "in-process PrefixAware.choose() calls on 8 idle FakeEngine instances",
              "table_prompts": "distinct 1,024-token prompts", "session_prompts": "8 tokens, a new session key each",
              "requests": "twice what each bound holds", "measured_with": "tracemalloc"}
    harness.save_results(args.out, result, "\n".join(md) + "\n", engine_args=None, sampling=None, client=client)


if __name__ == "__main__":
    main()

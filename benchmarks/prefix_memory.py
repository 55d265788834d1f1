"""Memory of a full PrefixAware: its block table at max_blocks and its sessions at max_sessions.

    python benchmarks/prefix_memory.py [--out benchmarks/results/prefix_memory]

Drives a default ``PrefixAware`` (max_blocks 65,536, max_sessions 65,536) through
``choose()`` on 8 engines with twice as much as each bound holds: distinct
1,024-token prompts (the table), then one new session key per request (the
sessions). What it holds at the end is measured with tracemalloc (the requests are
built before measuring: the pool holds them anyway), with the largest size seen on
the way, which must not pass the bound.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import tracemalloc
from collections.abc import Callable

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
    parser.add_argument("--out", default="benchmarks/results/prefix_memory")
    args = parser.parse_args()
    rng = random.Random(0)
    engines = []
    for i in range(8):
        engine = FakeEngine()
        engine.started = True
        engines.append(Instance(EngineSpec(model="m", engine_args={"model": "x"}, index=i), engine))
    result: dict[str, object] = {"python": platform.python_version()}

    # 1. The block table alone: distinct 1,024-token prompts, no session keys.
    balancer = PrefixAware(rng=random.Random(0))
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

    # 2. Sessions alone: short prompts (no full block), one new session key each.
    balancer = PrefixAware(rng=random.Random(0))
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
    print(json.dumps(result, indent=1))
    with open(args.out + ".json", "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()

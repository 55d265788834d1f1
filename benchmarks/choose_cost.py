"""Cost of one Balancer.choose() call, per built-in balancer, at 2, 8 and 64 engines.

    python benchmarks/choose_cost.py [--out benchmarks/results/choose_cost]

Candidates are real lylm Instances (on idle FakeEngines) with random books, so the
policies do their full work; the median of many timed batches is reported in
microseconds per call. Target (BENCHMARKS.md): <= 10 us at 64 engines.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import time

from lylm import EngineSpec, Instance, RequestInfo
from lylm.balancers import BALANCERS, resolve_balancer
from lylm.testing import FakeEngine

SIZES = (2, 8, 64)
TARGET_US = 10.0


def make_instances(n: int, rng: random.Random) -> list[Instance]:
    out = []
    for i in range(n):
        engine = FakeEngine()
        engine.started = True
        spec = EngineSpec(model="m", engine_args={"model": "x"}, weight=rng.choice([1.0, 2.0]), index=i)
        inst = Instance(spec, engine)
        inst.in_flight_requests = rng.randrange(0, 64)
        inst.in_flight_tokens = rng.randrange(0, 50_000)
        out.append(inst)
    return out


def measure(name: str, n: int, *, calls: int = 2000, batches: int = 25) -> float:
    rng = random.Random(n)
    balancer = resolve_balancer(name, rng=random.Random(0))
    candidates = make_instances(n, rng)
    request = RequestInfo(model="m", request_id="r", prompt_tokens=200, max_tokens=128)
    choose = balancer.choose
    samples = []
    for _ in range(batches):
        start = time.perf_counter()
        for _ in range(calls):
            choose(candidates, request)
        samples.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/choose_cost")
    args = parser.parse_args()
    rows = []
    for name in sorted(BALANCERS):
        row = {"balancer": name}
        for n in SIZES:
            row[f"{n}_engines_us"] = round(measure(name, n), 3)
        rows.append(row)
    lines = [
        "| balancer | " + " | ".join(f"{n} engines (us)" for n in SIZES) + " | target at 64 |",
        "|---|" + "---|" * (len(SIZES) + 1),
    ]
    for row in rows:
        at64 = row["64_engines_us"]
        verdict = "met" if at64 <= TARGET_US else "missed"
        cells = " | ".join(f"{row[f'{n}_engines_us']:.2f}" for n in SIZES)
        lines.append(f"| {row['balancer']} | {cells} | <= {TARGET_US:g} us: {verdict} |")
    table = "\n".join(lines)
    print(table)
    meta = {"python": platform.python_version(), "machine": platform.machine(), "processor": platform.processor()}
    with open(args.out + ".json", "w") as f:
        json.dump({"meta": meta, "rows": rows, "target_us": TARGET_US}, f, indent=2)
    with open(args.out + ".md", "w") as f:
        f.write(table + "\n")


if __name__ == "__main__":
    main()

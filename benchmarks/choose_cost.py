"""Cost of one Balancer.choose() call, per built-in balancer, at 2, 8 and 64 engines.

    python benchmarks/choose_cost.py [--batches 25] [--out benchmarks/results/choose_cost]

No engine: in-process calls on this machine's CPU, so there is no ``--device``; the result
files (OUT.json with the harness's provenance block, OUT.md) record the CPU.

Candidates are real lylm Instances (on idle FakeEngines) with random books, so the
policies do their full work; the median of many timed batches is reported in
microseconds per call. Target (BENCHMARKS.md): <= 10 us at 64 engines.

The first table gives every balancer the same request without token ids. A
second one times ``prefix_aware`` on requests that carry their prompt's token ids,
hashing included: 256 requests drawn from 32 shared prefixes (3/4 of the prompt)
plus a unique tail, cycled, so the table holds matches as it would in service;
and the block hashing alone, for the same prompts.
"""

from __future__ import annotations

import argparse
import platform
import random
import statistics
import time

import harness
from lylm import EngineSpec, Instance, RequestInfo
from lylm.balancers import BALANCERS, PrefixAware, resolve_balancer
from lylm.balancers._prefix_table import block_hashes
from lylm.testing import FakeEngine

SIZES = (2, 8, 64)
PROMPT_LENGTHS = (256, 1024, 4096)
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


def prefix_requests(length: int, rng: random.Random, *, groups: int = 32, count: int = 256) -> list[RequestInfo]:
    """``count`` requests of ``length`` tokens: one of ``groups`` shared prefixes + a unique tail."""
    shared = length * 3 // 4
    prefixes = [[rng.randrange(512) for _ in range(shared)] for _ in range(groups)]
    out = []
    for i in range(count):
        ids = rng.choice(prefixes) + [rng.randrange(512) for _ in range(length - shared)]
        out.append(RequestInfo(model="m", request_id=f"r{i}", prompt_tokens=length, max_tokens=128,
                               prompt_token_ids=ids))
    return out


def measure_prefix(n: int, length: int, *, batches: int = 25) -> tuple[float, float]:
    """(choose us, hashing-only us) for PrefixAware on ``length``-token prompts at ``n`` engines."""
    rng = random.Random(n * 7919 + length)
    balancer = PrefixAware(rng=random.Random(0))
    candidates = make_instances(n, rng)
    requests = prefix_requests(length, rng)
    calls = max(200, 200_000 // length)
    choose = balancer.choose
    for r in requests:  # warm: the table holds every prefix, as in steady service
        choose(candidates, r)
    picks = [requests[i % len(requests)] for i in range(calls)]
    samples, hashing = [], []
    for _ in range(batches):
        start = time.perf_counter()
        for r in picks:
            choose(candidates, r)
        samples.append((time.perf_counter() - start) / calls * 1e6)
        start = time.perf_counter()
        for r in picks:
            block_hashes(r.prompt_token_ids, balancer.block_size, balancer.max_prefix_blocks)
        hashing.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(samples), statistics.median(hashing)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=25, help="timed batches per cell (the median is reported)")
    parser.add_argument("--calls", type=int, default=2000, help="choose() calls per batch (first table)")
    parser.add_argument("--out", default=str(harness.BENCH / "results" / "choose_cost"))
    args = parser.parse_args()
    harness.DEVICE = "cpu"  # no engine: everything runs on this machine's CPU
    progress = harness.Progress(len(BALANCERS) * len(SIZES) + len(PROMPT_LENGTHS) * len(SIZES), "choose_cost")
    rows = []
    for name in sorted(BALANCERS):
        row = {"balancer": name}
        for n in SIZES:
            row[f"{n}_engines_us"] = round(measure(name, n, calls=args.calls, batches=args.batches), 3)
            progress.step(f"{name} at {n} engines")
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
    prefix_rows = []
    for length in PROMPT_LENGTHS:
        row = {"prompt_tokens": length}
        for n in SIZES:
            us, hash_us = measure_prefix(n, length, batches=args.batches)
            row[f"{n}_engines_us"] = round(us, 3)
            row[f"{n}_engines_hashing_us"] = round(hash_us, 3)
            progress.step(f"prefix_aware, {length}-token prompts, {n} engines")
        prefix_rows.append(row)
    lines += [
        "",
        "prefix_aware with prompt token ids (hashing included; hashing alone in parentheses):",
        "",
        "| prompt tokens | " + " | ".join(f"{n} engines (us)" for n in SIZES) + " |",
        "|---|" + "---|" * len(SIZES),
    ]
    for row in prefix_rows:
        cells = " | ".join(
            f"{row[f'{n}_engines_us']:.1f} ({row[f'{n}_engines_hashing_us']:.1f})" for n in SIZES
        )
        lines.append(f"| {row['prompt_tokens']} | {cells} |")
    table = "\n".join(lines)
    print(table)
    meta = {"python": platform.python_version(), "machine": platform.machine(), "processor": platform.processor()}
    result = {"meta": meta, "rows": rows, "prefix_aware_rows": prefix_rows, "target_us": TARGET_US}
    client = {"kind": "in-process Balancer.choose() calls, one thread", "sizes": list(SIZES),
              "calls_per_batch": args.calls, "batches": args.batches, "prompt_lengths": list(PROMPT_LENGTHS),
              "candidates": "lylm Instances on idle FakeEngines with random books"}
    harness.save_results(args.out, result, table + "\n", engine_args=None, sampling=None, client=client)


if __name__ == "__main__":
    main()

"""What the hub costs one request: a worker's pool against a plain pool, over a zero-latency FakeEngine.

    flock /tmp/lylm-bench.lock python benchmarks/hub_roundtrip.py [--requests 3000] [--rounds 5] \
        [--out benchmarks/results/hub_roundtrip]

Both pools serve the same one-token requests one after another on one event loop:
``EnginePool`` (admission, choice and books in process) and ``WorkerPool`` (the same,
asked of a hub over ZeroMQ IPC: one round trip to choose, one batched end message).
The hub runs in a separate process, as in a server with workers, so the numbers
include both processes' event-loop turns. Rounds alternate the order. Reported:
median microseconds per request for each, and their difference (the hub's cost per
request; tokens never cross it).

No vLLM engine (FakeEngines on this machine's CPU), so there is no ``--device``. Writes
OUT.json (the harness's provenance block first) and OUT.md.
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import tempfile
import time
from typing import Any

import anyio

import harness
import loadgen
from lylm import EnginePool, EngineSpec, PoolConfig
from lylm.server._hub import Hub
from lylm.server._hub_client import HubClient
from lylm.server._worker_pool import WorkerPool
from lylm.testing import FakeEngine, FakeSamplingParams


def config() -> PoolConfig:
    return PoolConfig.from_specs([EngineSpec(model="m", engine_args={"model": "fake"})])


def make_engine(spec: EngineSpec) -> FakeEngine:
    engine = FakeEngine()
    engine.handle = None  # type: ignore[attr-defined]
    return engine


def run_hub(address: str, ready: Any, stop: Any) -> None:
    async def main() -> None:
        pool = EnginePool(config(), engine_factory=make_engine)
        await pool.start()
        hub = Hub(pool, address=address)
        hub.bind()
        for instance in pool.instances():
            hub.core_started(instance.name, None)
        async with anyio.create_task_group() as tg:
            tg.start_soon(hub.serve)
            ready.set()
            await anyio.to_thread.run_sync(stop.wait)
            tg.cancel_scope.cancel()
        hub.close()
        await pool.aclose()

    anyio.run(main)


async def timed(pool: EnginePool, n: int) -> float:
    params = FakeSamplingParams(max_tokens=1)
    t0 = time.perf_counter()
    for i in range(n):
        async for _ in pool.generate("m", [1, 2, 3, 4], params):
            pass
    return (time.perf_counter() - t0) / n * 1e6


async def measure(args: argparse.Namespace, address: str, progress: harness.Progress) -> dict[str, list[float]]:
    local = EnginePool(config(), engine_factory=make_engine)
    client = HubClient(address, slot=0)
    await client.connect()
    worker = WorkerPool(config(), hub=client, attach=lambda spec, handle: FakeEngine())
    out: dict[str, list[float]] = {"local": [], "worker": []}
    async with local, worker:
        await timed(local, 200)
        await timed(worker, 200)
        for r in range(args.rounds):
            for name, pool in ([("local", local), ("worker", worker)] if r % 2 == 0 else [("worker", worker), ("local", local)]):
                out[name].append(await timed(pool, args.requests))
            progress.step(f"round {r}: plain {out['local'][-1]:.0f} us, worker {out['worker'][-1]:.0f} us")
    await client.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", default=str(harness.BENCH / "results" / "hub_roundtrip"),
                        help="result prefix: OUT.json, OUT.md")
    args = parser.parse_args()
    args.out = args.out.removesuffix(".json")
    harness.DEVICE = "cpu"  # no engine: both pools and the hub run on this machine's CPU
    address = f"ipc://{tempfile.mkdtemp(prefix='lylm-hub-bench-')}/hub"
    ctx = multiprocessing.get_context("spawn")
    ready, stop = ctx.Event(), ctx.Event()
    hub = ctx.Process(target=run_hub, args=(address, ready, stop))
    hub.start()
    try:
        if not ready.wait(60):
            raise SystemExit("the hub did not start")
        out = anyio.run(measure, args, address, harness.Progress(args.rounds, "hub_roundtrip"))
    finally:
        stop.set()
        hub.join(10)
    local, worker = statistics.median(out["local"]), statistics.median(out["worker"])
    line = (f"per request, median of {args.rounds} rounds of {args.requests}: plain pool {local:.0f} us, "
            f"worker pool {worker:.0f} us, the hub's share {worker - local:.0f} us")
    print(line)
    print({k: [round(v) for v in vs] for k, vs in out.items()})
    result = {"machine": loadgen.machine_info(), "settings": vars(args), "us_per_request": out,
              "median_local_us": local, "median_worker_us": worker}
    md = (
        "| pool | median us per request | rounds (us) |\n|---|---|---|\n"
        + "".join(f"| {label} | {statistics.median(out[k]):.0f} | {', '.join(f'{v:.0f}' for v in out[k])} |\n"
                  for k, label in (("local", "EnginePool (plain)"), ("worker", "WorkerPool (hub over ZeroMQ IPC)")))
        + f"\n{line}.\n"
    )
    client = {"kind": "one-token requests one after another on one event loop", "requests_per_round": args.requests,
              "rounds": args.rounds, "prompt": [1, 2, 3, 4], "engines": "one FakeEngine (zero latency)"}
    harness.save_results(args.out, result, md, engine_args=None, sampling={"max_tokens": 1}, client=client)


if __name__ == "__main__":
    main()

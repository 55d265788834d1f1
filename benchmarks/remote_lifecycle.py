"""A remote instance's life on real hardware: attach, crash, a silent core, a pool restart.

    python benchmarks/remote_lifecycle.py [--device cpu|gpu] [--model-dir DIR] [--streams 16] [--out PREFIX]

One pool in this process with a local instance and a remote one whose engine core runs
under ``lylm core`` in another process (its own session; on 127.0.0.1), both on GPU 0.
Measured, each under ``--streams`` streams of long generations:

* ``join``: seconds from ``lylm core``'s start to the remote instance serving;
* ``crash``: the engine core SIGKILLed: seconds to ejection (its host closes the
  connections) and until ``lylm core`` has it serving again;
* ``silent``: the engine core SIGSTOPped (connections open, nothing answered): seconds
  to ejection by the heartbeats (``remote.heartbeat``), then SIGCONT: seconds until the
  orphaned core was replaced by ``lylm core`` and serves again;
* ``pool restart``: the pool closed and a new one opened: seconds until the remote serves.

Every phase also records the requests that ended on each instance and how (none may be
left in flight). On vLLM 0.26 this checks the socket hook that sets the heartbeats.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import psutil

import harness

MODEL = "m"


def core_command(eargs: dict[str, Any], port: int) -> list[str]:
    """``lylm core`` for the instance's engine args, attaching to 127.0.0.1:``port``."""
    from lylm.engines._core_host import serve_flags

    return [sys.executable, "-m", "lylm", "core", "--pool", f"127.0.0.1:{port}", "--grace", "1",
            "--restart-delay", "0.5", eargs["model"], *serve_flags(eargs)]


def stop_core_host(host: subprocess.Popen[bytes]) -> None:
    """Stop ``lylm core`` (it stops its core), or kill its process group after 60 s."""
    host.send_signal(signal.SIGTERM)
    try:
        host.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(host.pid, signal.SIGKILL)


def engine_cores(host: subprocess.Popen[bytes]) -> list[psutil.Process]:
    return [p for p in psutil.Process(host.pid).children(recursive=True) if "EngineCore" in p.name()]


def core_tree(host: subprocess.Popen[bytes]) -> list[psutil.Process]:
    """The engine core and its workers (not lylm core itself)."""
    return [p for p in psutil.Process(host.pid).children(recursive=True)]


async def until(condition: Any, timeout: float, what: str) -> float:
    began = time.monotonic()
    with anyio.fail_after(timeout):
        while not condition():
            await anyio.sleep(0.005)
    return time.monotonic() - began


async def phase(pool: Any, remote: Any, streams: int, max_tokens: int, event: Any) -> dict[str, Any]:
    """Run ``streams`` long generations; once tokens flow on the remote, call ``event()``
    (which returns a coroutine measuring what follows); stop the load; return the books."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    stop = anyio.Event()
    outcomes: dict[str, int] = {}

    async def one() -> None:
        while not stop.is_set():
            try:
                async for _ in pool.generate(MODEL, [9, 10, 11, 12], params):
                    pass
                outcomes["completed"] = outcomes.get("completed", 0) + 1
            except Exception as exc:
                outcomes[type(exc).__name__] = outcomes.get(type(exc).__name__, 0) + 1

    measured: dict[str, Any] = {}
    async with anyio.create_task_group() as tg:
        for _ in range(streams):
            tg.start_soon(one)
        streamed = remote.generated_tokens
        await until(lambda: remote.in_flight_requests > 0 and remote.generated_tokens > streamed + 4 * max_tokens,
                    120, "tokens on the remote")
        measured = await event()
        stop.set()
    left = sum(i.in_flight_requests for i in pool.instances(MODEL))
    return {**measured, "outcomes": outcomes, "left_in_flight": left}


async def run(args: argparse.Namespace, eargs: dict[str, Any], port: int, log: Path) -> dict[str, Any]:
    from lylm import EnginePool, RestartPolicy

    config = {"models": {MODEL: [
        {"engine_args": eargs, "devices": harness.devices()},
        {"engine_args": eargs, "remote": {"address": "127.0.0.1", "port": port, "timeout": 30}},
    ]}}
    restart = RestartPolicy(initial_backoff=0.1, jitter=0)
    result: dict[str, Any] = {}
    with open(log, "ab") as out:
        began = time.monotonic()
        host = subprocess.Popen(core_command(eargs, port), stdout=out, stderr=subprocess.STDOUT,
                                process_group=0,
                                env={**os.environ, "CUDA_VISIBLE_DEVICES": "0"} if harness.DEVICE == "gpu" else None)
    try:
        async with EnginePool.from_config(config, restart=restart, health_interval=0.1) as pool:
            local, remote = pool.instances(MODEL)
            await until(lambda: remote.state == "healthy", 600, "the remote attached")
            result["join_s"] = time.monotonic() - began
            print(f"joined after {result['join_s']:.1f} s", flush=True)

            async def crash() -> dict[str, Any]:
                (core,) = engine_cores(host)
                core.kill()
                ejected = await until(lambda: remote.state != "healthy", 30, "ejected")
                back = await until(lambda: remote.state == "healthy", 600, "serving again")
                return {"ejected_s": ejected, "serving_again_s": ejected + back}

            result["crash"] = await phase(pool, remote, args.streams, args.max_tokens, crash)
            print("crash", result["crash"], flush=True)

            async def silent() -> dict[str, Any]:
                tree = core_tree(host)
                for p in tree:
                    p.suspend()
                ejected = await until(lambda: remote.state != "healthy", 30, "ejected")
                for p in tree:
                    p.resume()
                resumed = time.monotonic()
                await until(lambda: remote.state == "healthy", 600, "serving again")
                return {"ejected_s": ejected, "serving_again_after_resume_s": time.monotonic() - resumed,
                        "heartbeat_s": 1.2}

            result["silent"] = await phase(pool, remote, args.streams, args.max_tokens, silent)
            print("silent", result["silent"], flush=True)
        closed = time.monotonic()
        async with EnginePool.from_config(config, restart=restart, health_interval=0.1) as pool:
            _, remote = pool.instances(MODEL)
            await until(lambda: remote.state == "healthy", 600, "the remote attached to the new pool")
            result["pool_restart_s"] = time.monotonic() - closed
            print(f"pool restart: serving after {result['pool_restart_s']:.1f} s", flush=True)
        result["lylm_core_starts"] = Path(log).read_text(errors="replace").count("engine core started (pid")
    finally:
        stop_core_host(host)
    result["lylm_core_exit"] = host.returncode
    return result


def table(result: dict[str, Any]) -> str:
    crash, silent = result["crash"], result["silent"]
    rows = [
        ("join (lylm core start -> serving)", f"{result['join_s']:.1f} s", ""),
        ("crash: SIGKILL -> ejected", f"{crash['ejected_s']:.3f} s", f"{crash['outcomes']}, left {crash['left_in_flight']}"),
        ("crash: SIGKILL -> serving again", f"{crash['serving_again_s']:.1f} s", ""),
        ("silent: SIGSTOP -> ejected", f"{silent['ejected_s']:.3f} s",
         f"{silent['outcomes']}, left {silent['left_in_flight']}"),
        ("silent: SIGCONT -> serving again", f"{silent['serving_again_after_resume_s']:.1f} s", ""),
        ("pool restart -> serving", f"{result['pool_restart_s']:.1f} s", ""),
    ]
    lines = ["| event | time | requests |", "|---|---:|---|"] + [f"| {a} | {b} | {c} |" for a, b, c in rows]
    lines.append(f"\nlylm core started the engine core {result['lylm_core_starts']} times; exited {result['lylm_core_exit']}.")
    return "\n".join(lines)


def run_and_save(parser: argparse.ArgumentParser, run: Any, table: Any, name: str) -> None:
    """The scripts of a remote instance under ``lylm core``: parse, fix the target, run
    ``run(args, engine_args, port, log)`` (``log``: lylm core's, beside the results), print
    and save ``table(result)``. ``name``: the results' default prefix (then the shape)."""
    args = parser.parse_args()
    harness.resolve_target(args)
    if getattr(args, "perf", False) and shutil.which("perf") is None:
        raise SystemExit("--perf needs perf (linux-tools) on the PATH")
    args.out = args.out or str(harness.BENCH / "results" / f"{name}_{args.shape}")
    eargs = harness.engine_args(args.model_dir, json.loads(args.engine_args), gpu_memory_utilization=args.gpu_mem)
    log = Path(args.out + "_lylm_core.log")
    log.parent.mkdir(parents=True, exist_ok=True)
    result = anyio.run(run, args, eargs, harness.free_port(), log)
    md = table(result)
    print(md)
    client = {"in_process": True, "streams": args.streams, "max_tokens": args.max_tokens}
    harness.save_results(args.out, result, md, engine_args=eargs, sampling={"max_tokens": args.max_tokens,
                         "ignore_eos": True}, client=client)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    harness.add_target_arguments(parser, shape=True)
    parser.add_argument("--gpu-mem", type=float, default=0.4, help="gpu: gpu_memory_utilization of each engine")
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--out", default=None, help="result prefix (default: benchmarks/results/remote_lifecycle_<shape>)")
    run_and_save(parser, run, table, "remote_lifecycle")


if __name__ == "__main__":  # vLLM spawns engine processes: the guard is required
    main()
